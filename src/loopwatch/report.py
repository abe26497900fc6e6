"""Block profiles: a summary per tool, and the blocked time as flame graphs people open with tools they have.

    loopwatch report events.jsonl                        # per tool: blocks, blocked seconds, lines to fix
    loopwatch report events.jsonl --speedscope out.json  # open in https://www.speedscope.app
    loopwatch report events.jsonl --folded out.folded    # flamegraph.pl out.folded > out.svg (or inferno)
    loopwatch report --server NAME                       # the same for a running server (its announcement)

Each block weighs its duration. A stack's root is the call it is blamed on (`tools/call NAME`, or
`(outside any call)`), so the flame graph splits by tool first. Blocks with no stack (a native call that held
the GIL throughout, a collection) get one frame that says so. Reading source lines for the summary happens
here, in the reader's process, never in the watched server.
"""

from __future__ import annotations

import json
import linecache
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"
OUTSIDE = "(outside any call)"


class ReportError(Exception):
    """The input can't be read; the message is the one line a user sees."""


@dataclass(frozen=True)
class Block:
    """One block as the report needs it, from a `loop_blocked` event."""

    root: str
    duration_s: float
    kind: str
    time: float
    frames: tuple[tuple[str, int, str], ...]
    culprit: tuple[str, int, str] | None

    def stack(self) -> tuple[tuple[str, int, str], ...]:
        """Frames outermost first; a placeholder frame for blocks nobody could sample."""
        if self.frames:
            return self.frames
        if self.kind == "gc":
            return (("", 0, "(garbage collector)"),)
        if self.kind == "gil":
            return (("", 0, "(no sample: a native call held the GIL)"),)
        return (("", 0, "(no sample)"),)

    def fix_line(self) -> tuple[str, int, str] | None:
        """Where to look: the culprit (the application's frame that led there), else the leaf."""
        return self.culprit or (self.frames[-1] if self.frames else None)


def _frame(data: Any) -> tuple[str, int, str] | None:
    if not isinstance(data, dict):
        return None
    line = data.get("line")
    number = int(line) if isinstance(line, int | float) else 0
    return str(data.get("file", "")), number, str(data.get("function", "?"))


def block_from_event(event: dict[str, Any]) -> Block | None:
    """None for anything that is not a block event (offload decisions, garbage)."""
    if event.get("event") != "loop_blocked":
        return None
    duration = event.get("duration_s")
    if not isinstance(duration, int | float) or duration < 0:
        return None
    method, tool = event.get("method"), event.get("tool")
    root = f"{method} {tool}" if method and tool else (method or OUTSIDE)
    frames = tuple(f for f in map(_frame, event.get("frames") or ()) if f is not None)
    when = event.get("time")
    return Block(
        root=root,
        duration_s=float(duration),
        kind=str(event.get("kind") or "unknown"),
        time=float(when) if isinstance(when, int | float) else 0.0,
        frames=frames,
        culprit=_frame(event.get("culprit")),
    )


@dataclass
class Loaded:
    blocks: list[Block] = field(default_factory=list)
    skipped: int = 0
    """Lines that were not JSON objects (a line being written as the file was read, a foreign line)."""
    other_events: int = 0


def load_events(path: str | os.PathLike[str]) -> Loaded:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ReportError(f"cannot read {path}: no such file") from None
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_events(text.splitlines())


def parse_events(lines: Iterable[str]) -> Loaded:
    loaded = Loaded()
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            loaded.skipped += 1
            continue
        if not isinstance(event, dict):
            loaded.skipped += 1
            continue
        block = block_from_event(event)
        if block is None:
            loaded.other_events += 1
        else:
            loaded.blocks.append(block)
    return loaded


def blocks_from_dicts(events: Iterable[dict[str, Any]]) -> list[Block]:
    return [b for b in map(block_from_event, events) if b is not None]


# -- the summary -------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def short_path(file: str) -> str:
    """A file as people name it: from the package inside site-packages, else the last two parts."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            return file.split(marker, 1)[1]
    parts = file.split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else file


def where(frame: tuple[str, int, str]) -> str:
    file, line, function = frame
    return f"{file}:{line} in {function}" if file else function


def source_line(frame: tuple[str, int, str]) -> str:
    file, line, _ = frame
    if not file or file.startswith("<") or line <= 0:
        return ""
    return linecache.getline(file, line).strip()


def summary(blocks: Sequence[Block], lines_per_tool: int = 3, source: str = "") -> str:
    """Per tool (most blocked time first): blocks, blocked seconds, kinds, and the lines to fix."""
    if not blocks:
        return f"no blocks{' in ' + source if source else ''}"
    total = sum(b.duration_s for b in blocks)
    by_tool: dict[str, list[Block]] = defaultdict(list)
    for block in blocks:
        by_tool[block.root].append(block)
    out = [f"{len(blocks)} block{'s' if len(blocks) != 1 else ''}, {_seconds(total)} of loop time blocked"
           + (f" ({source})" if source else "")]
    ranked = sorted(by_tool.items(), key=lambda item: -sum(b.duration_s for b in item[1]))
    for root, group in ranked:
        blocked = sum(b.duration_s for b in group)
        kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(b.kind for b in group).most_common())
        longest = max(b.duration_s for b in group)
        out.append("")
        out.append(f"{root}: {len(group)} block{'s' if len(group) != 1 else ''}, {_seconds(blocked)} blocked "
                   f"({blocked / total:.0%}), longest {_seconds(longest)}; {kinds}")
        out.extend(_fix_lines(group, lines_per_tool))
    return "\n".join(out)


def _fix_lines(group: Sequence[Block], count: int) -> list[str]:
    spent: dict[tuple[str, int, str] | None, list[Block]] = defaultdict(list)
    for block in group:
        spent[block.fix_line()].append(block)
    lines = []
    for frame, hits in sorted(spent.items(), key=lambda item: -sum(b.duration_s for b in item[1]))[:count]:
        seconds = sum(b.duration_s for b in hits)
        if frame is None:
            lines.append(f"  {_seconds(seconds):>8}  {len(hits):>3}x  {hits[0].stack()[-1][2]}")
            continue
        text = source_line(frame)
        leaf = hits[0].frames[-1] if hits[0].frames else None
        via = f"  (in {where((short_path(leaf[0]), leaf[1], leaf[2]))})" if leaf and leaf != frame else ""
        lines.append(f"  {_seconds(seconds):>8}  {len(hits):>3}x  {where(frame)}{via}")
        if text:
            lines.append(f"                   {text}")
    return lines


# -- flame graphs ------------------------------------------------------------------------------------


def _folded_name(frame: tuple[str, int, str]) -> str:
    file, line, function = frame
    name = f"{function} ({short_path(file)}:{line})" if file else function
    return name.replace(";", ",").replace("\n", " ")


def folded(blocks: Sequence[Block]) -> str:
    """Brendan Gregg's folded stacks: `root;outer;...;leaf WEIGHT` a line, weights in milliseconds (integers,
    as flamegraph.pl and inferno read them), identical stacks merged."""
    weights: Counter[str] = Counter()
    for block in blocks:
        names = [block.root.replace(";", ",")] + [_folded_name(f) for f in block.stack()]
        weights[";".join(names)] += max(1, round(block.duration_s * 1000))
    return "".join(f"{stack} {weight}\n" for stack, weight in sorted(weights.items()))


def speedscope(blocks: Sequence[Block], name: str = "loopwatch: blocked loop time") -> dict[str, Any]:
    """A speedscope file: one sampled profile of every block (weights in milliseconds), then one per tool."""
    frames: list[dict[str, Any]] = []
    index: dict[tuple[str, int, str], int] = {}

    def frame_index(frame: tuple[str, int, str]) -> int:
        found = index.get(frame)
        if found is None:
            file, line, function = frame
            entry: dict[str, Any] = {"name": function}
            if file:
                entry["file"], entry["line"] = file, line
            found = index[frame] = len(frames)
            frames.append(entry)
        return found

    def profile(title: str, group: Sequence[Block]) -> dict[str, Any]:
        ordered = sorted(group, key=lambda b: b.time)
        samples = [[frame_index(("", 0, b.root))] + [frame_index(f) for f in b.stack()] for b in ordered]
        weights = [round(b.duration_s * 1000, 3) for b in ordered]
        return {"type": "sampled", "name": title, "unit": "milliseconds", "startValue": 0,
                "endValue": round(sum(weights), 3), "samples": samples, "weights": weights}

    by_tool: dict[str, list[Block]] = defaultdict(list)
    for block in blocks:
        by_tool[block.root].append(block)
    profiles = [profile("all blocks", blocks)]
    profiles += [profile(root, group) for root, group in sorted(by_tool.items())]
    from . import __version__

    return {"$schema": SPEEDSCOPE_SCHEMA, "shared": {"frames": frames}, "profiles": profiles, "name": name,
            "activeProfileIndex": 0, "exporter": f"loopwatch@{__version__}"}


def write_profiles(blocks: Sequence[Block], speedscope_path: str | None, folded_path: str | None,
                   name: str = "loopwatch: blocked loop time") -> list[str]:
    """Write the files asked for; returns one line per file written."""
    written = []
    if speedscope_path:
        _write(speedscope_path, json.dumps(speedscope(blocks, name), separators=(",", ":")))
        written.append(f"speedscope profile: {speedscope_path} (open it at https://www.speedscope.app)")
    if folded_path:
        _write(folded_path, folded(blocks))
        written.append(f"folded stacks: {folded_path} (flamegraph.pl or inferno-flamegraph make an SVG of it)")
    return written


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from None
