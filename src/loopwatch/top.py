"""`loopwatch top`: every watched server on this machine, live, read from their announcements.

    loopwatch top            # full screen (pip install 'loopwatch[top]'): q quit, s sort, / filter, w profile
    loopwatch top --once     # one plain-text snapshot, for scripts and bug reports
    loopwatch ls             # one line per server

A server blocked right now is listed first, in red, with the call and the line it is stuck in, refreshed
while it stays stuck. Each server is asked on a thread of the reader's own with a short timeout: a server
that does not answer (its loop thread holds the GIL in a native call, or the process is stopped) is shown as
such, never waited for. Sockets left by killed servers are removed as they are found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._announce import Link, clean, is_stale, pid_of, sockets
from .report import blocks_from_dicts, short_path, source_line, write_profiles

ASK_TIMEOUT = 0.5
SORTS = ("state", "lag", "blocks", "name", "pid")


@dataclass
class Server:
    """What one announcement said at the last look (or before, when it stopped answering)."""

    path: Path
    state: dict[str, Any] | None
    error: str | None = None
    silent_since: float | None = None

    @property
    def pid(self) -> int | None:
        return self.state.get("pid") if self.state else pid_of(self.path)

    @property
    def name(self) -> str:
        return str(self.state.get("name")) if self.state else "?"

    @property
    def blocked(self) -> bool:
        return bool(self.state and self.state.get("blocked"))

    @property
    def stuck(self) -> bool:
        """Blocked now, or not answering at all (a native call holding the GIL answers nobody)."""
        return self.blocked or self.error is not None

    def status(self) -> str:
        if self.error is not None:
            return "NO ANSWER"
        if self.blocked:
            return "BLOCKED"
        if self.state is not None and self.state.get("lag_now_s") is None:
            return "stopped"
        return "ok"


@dataclass
class Poller:
    """Asks every announced server for its state, in parallel, each with a timeout."""

    dirs: list[Path] | None = None
    timeout: float = ASK_TIMEOUT
    links: dict[Path, Link] = field(default_factory=dict)
    known: dict[Path, Server] = field(default_factory=dict)
    cleaned: list[str] = field(default_factory=list)
    """One line per stale socket removed (its server was killed), for the reader to show."""
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, "loopwatch-top"))

    def poll(self, detail: Path | None = None, clock: Callable[[], float] = time.monotonic) -> list[Server]:
        paths = sockets(self.dirs)
        for gone in set(self.links) - set(paths):
            self.links.pop(gone).close()
            self.known.pop(gone, None)
        futures = {path: self._pool.submit(self._ask, path, path == detail) for path in paths}
        servers = []
        for path, future in futures.items():
            server = self._result(path, future.result(), clock())
            if server is not None:
                servers.append(server)
        return servers

    def _ask(self, path: Path, detail: bool) -> dict[str, Any] | OSError | ValueError:
        link = self.links.get(path)
        if link is None:
            link = self.links[path] = Link(path, self.timeout)
        try:
            return link.ask(op="state", detail=detail)
        except (OSError, ValueError) as exc:
            return exc

    def _result(self, path: Path, answer: Any, now: float) -> Server | None:
        if isinstance(answer, dict) and answer.get("ok"):
            server = self.known[path] = Server(path, answer)
            return server
        if isinstance(answer, OSError) and is_stale(path, answer):
            self.links.pop(path, None)
            self.known.pop(path, None)
            if clean(path):
                self.cleaned.append(f"removed a stale announcement: {path} (pid {pid_of(path)} no longer listens)")
            return None
        if isinstance(answer, FileNotFoundError):  # stopped between the listing and the look
            return None
        before = self.known.get(path)
        since = before.silent_since if before is not None and before.silent_since is not None else now
        reason = answer.get("error") if isinstance(answer, dict) else type(answer).__name__
        server = Server(path, before.state if before else None, f"no answer ({reason})", since)
        self.known[path] = server
        return server

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        self._pool.shutdown(wait=False)


def sort_servers(servers: Sequence[Server], by: str = "state") -> list[Server]:
    """Stuck servers first, always (the longest stuck at the very top); then by the key asked for."""
    def key(s: Server) -> tuple[Any, ...]:
        st = s.state or {}
        lag = st.get("lag_now_s") or 0.0
        if by == "lag":
            rest: tuple[Any, ...] = (-(_lag(st, "p99_s") or 0.0),)
        elif by == "blocks":
            rest = (-(st.get("minute") or {}).get("blocks", 0), -(st.get("minute") or {}).get("blocked_s", 0))
        elif by == "pid":
            rest = (s.pid or 0,)
        else:
            rest = ()
        return (not s.stuck, -lag if s.stuck else 0.0, *rest, s.name.lower(), s.pid or 0)

    return sorted(servers, key=key)


def matches(server: Server, text: str) -> bool:
    if not text:
        return True
    st = server.state or {}
    hay = " ".join([server.name, str(server.pid), str(st.get("transport", "")), " ".join(st.get("command") or ())])
    return text.lower() in hay.lower()


# -- what a row says ---------------------------------------------------------------------------------

COLUMNS = ("name", "pid", "transport", "state", "lag now", "p99", "max", "in flight", "blocks/min", "% blocked",
           "off loop", "command")


def _lag(state: dict[str, Any], key: str) -> float | None:
    value = (state.get("lag") or (state.get("snapshot") or {}).get("lag") or {}).get(key)
    return value if isinstance(value, int | float) else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def command_text(state: dict[str, Any], width: int = 60) -> str:
    words = [w for w in state.get("command") or () if w]
    text = " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words))
    return text if len(text) <= width else text[: width - 1] + "…"


def row(server: Server) -> list[str]:
    st = server.state or {}
    minute = st.get("minute") or {}
    off = st.get("off_loop") or []
    lag_now = st.get("lag_now_s")
    if server.error is not None and server.silent_since is not None:
        lag_now = None
    return [
        server.name,
        str(server.pid or "?"),
        str(st.get("transport") or "?"),
        server.status(),
        duration(lag_now),
        duration(_lag(st, "p99_s")),
        duration(_lag(st, "max_s")),
        str(st.get("in_flight", "-")),
        str(minute.get("blocks", "-")),
        f"{minute.get('share', 0.0):.0%}" if minute else "-",
        str(len(off)) if off else "-",
        command_text(st),
    ]


def frame_text(frame: dict[str, Any] | None) -> str:
    if not frame:
        return "?"
    return f"{short_path(str(frame.get('file', '')))}:{frame.get('line')} in {frame.get('function')}"


def call_text(call: dict[str, Any] | None) -> str:
    if not call:
        return "no call (the loop is not serving a request)"
    target = f" {call['tool']}" if call.get("tool") else ""
    rid = f" (request {call['request_id']})" if call.get("request_id") is not None else ""
    return f"{call.get('method')}{target}{rid}"


def stuck_lines(server: Server, frames: int = 6) -> list[str]:
    """What a stuck server is doing: for how long, the call, the line, and the innermost frames."""
    st = server.state or {}
    if server.error is not None:
        head = f"NO ANSWER  {server.name} (pid {server.pid}): {server.error}"
        return [head, "           its loop thread may hold the GIL in a native call, or the process is stopped"]
    since = duration(st.get("lag_now_s"))
    lines = [f"BLOCKED {since:>7}  {server.name} (pid {server.pid})  {call_text(st.get('serving'))}"]
    stack = st.get("stack") or []
    culprit = st.get("culprit")
    if stack:
        leaf = stack[-1]
        at = frame_text(leaf) + (f" <- {frame_text(culprit)}" if culprit and culprit != leaf else "")
        lines.append(f"          at {at}")
        code = source_line(_triple(culprit or leaf))
        if code:
            lines.append(f"             {code}")
        if st.get("importing"):
            lines.append(f"          importing {st['importing']}")
        telling = _telling(stack, culprit)[-frames:]
        for frame in telling if len(telling) > 1 else ():
            mark = "->" if frame == culprit else "  "
            lines.append(f"          {mark} {frame_text(frame)}")
    return lines


def _triple(frame: dict[str, Any]) -> tuple[str, int, str]:
    line = frame.get("line")
    return str(frame.get("file", "")), line if isinstance(line, int) else 0, str(frame.get("function", ""))


def _telling(stack: Sequence[dict[str, Any]], culprit: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The frames worth a line: the application's, the culprit and the leaf (the SDK's own are left out)."""
    from ._blame import is_framework

    last = len(stack) - 1
    return [f for i, f in enumerate(stack) if i == last or f == culprit or not is_framework(str(f.get("file", "")))]


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = {4, 5, 6, 7, 8, 9, 10}
    return "\n".join(
        "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
        for r in rows
    )


def once_text(servers: Sequence[Server]) -> str:
    """`loopwatch top --once`: stuck servers first with their call and stack, then the table."""
    ordered = sort_servers(servers)
    stuck = [s for s in ordered if s.stuck]
    out = [f"loopwatch top  {time.strftime('%Y-%m-%d %H:%M:%S')}  {len(servers)} server"
           f"{'s' if len(servers) != 1 else ''}, {len(stuck)} stuck"]
    for server in stuck:
        out.append("")
        out.extend(stuck_lines(server))
    if ordered:
        out.append("")
        out.append(table([tuple(c.upper() for c in COLUMNS), *map(row, ordered)]))
    else:
        out.append("no watched servers announce themselves here (is `loopwatch run` or instrument() running, "
                   "without --no-announce?)")
    return "\n".join(out)


def ls_text(servers: Sequence[Server]) -> str:
    header = ("PID", "NAME", "TRANSPORT", "STATE", "UP", "COMMAND", "SOCKET")
    rows = [header]
    for s in sorted(servers, key=lambda s: (s.pid or 0, s.path.name)):
        st = s.state or {}
        up = st.get("now", 0) - st["started_at"] if st.get("started_at") else None
        rows.append((str(s.pid or "?"), s.name, str(st.get("transport") or "?"), s.status(),
                     uptime(up), command_text(st, 50), str(s.path)))
    lines = []
    if len(rows) == 1:
        lines.append("no watched servers")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def detail_lines(server: Server) -> dict[str, list[str]]:
    """The selected server: its tools, its recent blocks with their lines, its loop thread's stack now."""
    st = server.state or {}
    tools = [("tool", "calls", "errors", "now", "p50", "p99", "blocks", "blocked s", "runs on")]
    for name, t in sorted(((st.get("snapshot") or {}).get("tools") or {}).items()):
        tools.append((name, str(t["calls"]), str(t["errors"]), str(t["in_flight"]), duration(t["p50_s"]),
                      duration(t["p99_s"]), str(t["blocks"]), f"{t['blocked_s']:.3f}", str(t["executes"])))
    blocks = []
    for event in reversed(st.get("recent_blocks") or []):
        clock = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
        who = f"{event.get('method')} {event.get('tool') or ''}".strip() if event.get("method") else "outside any call"
        frames = event.get("frames") or []
        at = frame_text(frames[-1]) if frames else "no sample"
        culprit = event.get("culprit")
        if culprit and frames and culprit != frames[-1]:
            at += f" <- {frame_text(culprit)}"
        blocks.append(f"{clock}  {duration(event.get('duration_s'))} [{event.get('kind')}] {who} at {at}")
    stack = [("-> " if f == st.get("culprit") else "   ") + frame_text(f) for f in st.get("stack") or []]
    head = [f"{server.name} (pid {server.pid}), {st.get('transport')} on {st.get('backend')}: {server.status()}",
            f"serving: {call_text(st.get('serving'))}", f"command: {' '.join(st.get('command') or ())}"]
    return {"head": head, "tools": [" | ".join(r) for r in tools] if len(tools) > 1 else ["no tool calls yet"],
            "tool_rows": tools, "blocks": blocks or ["no blocks yet"], "stack": stack or ["(no Python frame)"]}


def write_server_profile(server: Server, directory: Path = Path(".")) -> list[str]:
    """Ask a running server for its recent blocks and write them as speedscope JSON and folded stacks."""
    with Link(server.path, timeout=2.0) as link:
        answer = link.ask(op="profile")
    if not answer.get("ok"):
        raise OSError(answer.get("error") or "the server did not answer")
    base = directory / f"loopwatch-{_safe(server.name)}-{server.pid}"
    blocks = blocks_from_dicts(answer.get("blocks") or [])
    name = f"{server.name} (pid {server.pid}): blocked loop time"
    return write_profiles(blocks, f"{base}.speedscope.json", f"{base}.folded", name)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "server"


def snapshot(dirs: list[Path] | None = None, timeout: float = ASK_TIMEOUT) -> tuple[list[Server], list[str]]:
    poller = Poller(dirs, timeout)
    try:
        return poller.poll(), poller.cleaned
    finally:
        poller.close()


def run_tui(interval: float = 0.5, dirs: list[Path] | None = None) -> int:
    from ._top_app import TopApp

    TopApp(Poller(dirs), interval).run()
    return 0
