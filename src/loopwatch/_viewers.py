"""The bodies of `loopwatch top`, `loopwatch ls` and `loopwatch report` (their arguments are in cli.py)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .report import ReportError, blocks_from_dicts, load_events, summary, write_profiles
from .top import ls_text, once_text, run_tui, snapshot


def run_viewer(args: argparse.Namespace) -> int:
    try:
        if args.command == "top":
            return _top(args)
        if args.command == "ls":
            servers, cleaned = snapshot()
            _say_cleaned(cleaned)
            print(ls_text(servers))
            return 0
        return _report(args)
    except ReportError as exc:
        print(f"loopwatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _top(args: argparse.Namespace) -> int:
    if args.once:
        servers, cleaned = snapshot()
        _say_cleaned(cleaned)
        print(once_text(servers))
        return 0
    if importlib.util.find_spec("textual") is None:
        print("loopwatch: the live view needs textual: pip install 'loopwatch[top]' "
              "(or `loopwatch top --once` for a plain-text snapshot)", file=sys.stderr)
        return 2
    return run_tui(args.interval)


def _say_cleaned(cleaned: list[str]) -> None:
    """Stale announcements removed on the way: said on stderr, so that stdout is the table alone."""
    for line in cleaned:
        print(f"loopwatch: {line}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    if bool(args.events) == (args.server is not None):
        raise ReportError("give events files or --server NAME|PID (one of them)")
    if args.server is not None:
        blocks, source, name = _live_blocks(args.server)
    else:
        blocks, skipped = [], 0
        for path in args.events:  # FILE.2 FILE.1 FILE: a rotated file's blocks, oldest first
            loaded = load_events(path)
            blocks += loaded.blocks
            skipped += loaded.skipped
        files = ", ".join(args.events)
        name = f"{files}: blocked loop time"
        source = files + (f"; {skipped} unreadable lines skipped" if skipped else "")
    print(summary(blocks, args.lines, source))
    for line in write_profiles(blocks, args.speedscope, args.folded, name):
        print(line)
    return 0


def _live_blocks(which: str) -> tuple[list, str, str]:
    from ._announce import Link

    servers, _ = snapshot()
    chosen = [s for s in servers if str(s.pid) == which or s.name == which]
    if not chosen:
        names = ", ".join(f"{s.name} ({s.pid})" for s in servers) or "none"
        raise ReportError(f"no watched server named or numbered {which!r}; running: {names}")
    if len(chosen) > 1:
        pids = ", ".join(str(s.pid) for s in chosen)
        raise ReportError(f"{len(chosen)} servers are named {which!r}: give a pid ({pids})")
    server = chosen[0]
    try:
        with Link(server.path, timeout=2.0) as link:
            answer = link.ask(op="profile")
    except OSError as exc:
        raise ReportError(f"{server.name} (pid {server.pid}) did not answer: {exc}") from None
    blocks = blocks_from_dicts(answer.get("blocks") or [])
    label = f"{server.name} (pid {server.pid})"
    return blocks, f"{label}, its last {len(blocks)} blocks", f"{label}: blocked loop time"
