"""Every watched server announces itself on the user's own machine: a private Unix socket per server.

    $XDG_RUNTIME_DIR/loopwatch/<pid>.<n>.sock     (or ~/.cache/loopwatch/run/, a 0700 directory)

`loopwatch top` and `loopwatch ls` find the servers there. The socket (mode 0600, in a directory only the user
can enter) is answered by a thread of its own that never waits on the server's loop: name, pid, command,
transport, the snapshot, the loop thread's stack right now, and a stream of events. It is bound under a
temporary name and renamed once it listens, so a socket a reader finds that refuses connections belongs to a
process that died (SIGKILL leaves it behind): readers remove it.

Idle cost: none. The thread sleeps in `select` on the socket and a wake-up pipe with no timeout (no periodic
wake-ups); the loop only starts and stops it. While a reader asks, each answer takes the GIL for a moment.
Per-call cost: none. The socket is put up while the loop waits for it, once as the loop starts (tens of
microseconds; at most START_WAIT): a thread that took the GIL back after each of its set-up's system calls
from a loop busy serving calls would have made every call pay for as long as it waited (see START_WAIT).
Off with `announce=False`, `loopwatch run --no-announce`, or LOOPWATCH_NO_ANNOUNCE=1.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._events import BlockEvent, Event, Frame, any_thread

logger = logging.getLogger("loopwatch")

PROTOCOL = 1
SUFFIX = ".sock"
MAX_REQUEST = 64 * 1024
SEND_TIMEOUT = 2.0
"""Seconds a reader may take to read an answer before its connection is dropped."""
BLOCKS_KEPT = 1000
"""Block events each server keeps for `top`'s last minute and for profiles of a running server."""
WINDOW = 60.0
ENV_OFF = "LOOPWATCH_NO_ANNOUNCE"
MAX_DIR_BYTES = 80
"""Longest directory a socket is put in: sun_path holds 107 bytes, and `/<pid>.<n>.sock` needs up to 27."""
START_WAIT = 0.05
"""Seconds the loop waits, once as it starts, for its socket to listen (never more than half the block threshold).

The set-up is a handful of system calls, each of which gives the GIL up. On a thread of its own while the loop
runs on, each time it wants the GIL back it waits on a loop that drops and retakes it on every turn (each
select of the loop's), and every one of those drops wakes it to no avail: the calls served meanwhile paid
13-20% (bench_overhead.py's short sessions, whose announcement was often not up when the session ended). While
the loop waits here, the thread has the GIL to itself: microseconds. A slow filesystem costs the loop at most
this; the thread then goes on alone."""

_counter = itertools.count(1)


def disabled_by_env() -> bool:
    return os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no", "off")


# -- where announcements live --------------------------------------------------------------------------


def candidate_dirs() -> list[Path]:
    """Where servers announce, in order of preference; readers look in all of them (a server started by a
    desktop client may not have the terminal's XDG_RUNTIME_DIR)."""
    dirs: list[Path] = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append(Path(runtime) / "loopwatch")
    user_run = Path(f"/run/user/{os.getuid()}")
    if user_run.is_dir() and (user_run / "loopwatch") not in dirs:
        dirs.append(user_run / "loopwatch")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(cache) / "loopwatch" / "run")
    return dirs


def private_dir(path: Path) -> bool:
    """The directory exists, is a real directory owned by this user, and nobody else may enter it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    if info.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)  # ours but too open (an old umask): close it rather than refuse
        except OSError:
            return False
    return True


def announce_dir() -> Path | None:
    """The first candidate that is, or can be made, a private directory."""
    for path in candidate_dirs():
        parent = path.parent
        if path.name == "loopwatch" and not parent.is_dir():
            continue  # an XDG_RUNTIME_DIR that does not exist is not ours to create
        if len(os.fsencode(path)) > MAX_DIR_BYTES:
            continue  # a socket's path has at most 107 bytes on Linux: its name must still fit
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if private_dir(path):
            return path
        logger.warning("%s is not a private directory of this user; not announcing there", path)
    return None


# -- what a server says about itself (on the announcement's threads) ----------------------------------


class BlockLog:
    """The last blocks, for the last minute's count and share, and for profiles of a running server.

    A listener: called on the watchdog thread, never on the loop."""

    def __init__(self, size: int = BLOCKS_KEPT) -> None:
        self.blocks: deque[BlockEvent] = deque(maxlen=size)

    @any_thread
    def __call__(self, event: Event) -> None:
        if isinstance(event, BlockEvent):
            self.blocks.append(event)

    def window(self, now: float, seconds: float = WINDOW) -> tuple[int, float]:
        """Blocks that ended within the last `seconds`, and the seconds of them inside the window."""
        count, blocked = 0, 0.0
        for event in list(self.blocks):
            end = event.time + event.duration_s
            if end >= now - seconds:
                count += 1
                blocked += end - max(event.time, now - seconds)
        return count, blocked


def _frames(frames: Any) -> list[dict[str, Any]]:
    return [{"file": f.file, "line": f.line, "function": f.function} for f in frames]


def _call(call: Any) -> dict[str, Any] | None:
    if call is None:
        return None
    since = time.perf_counter() - call.started if call.started else None
    request = None if call.request_id is None else str(call.request_id)
    return {"method": call.method, "tool": call.tool, "request_id": request,
            "for_s": None if since is None else round(since, 3)}


def guess_transport() -> str:
    """For servers nobody told: stdio when fd 0 is a pipe or socket (as MCP clients start them), else HTTP when
    an ASGI server is loaded."""
    stdio = sys.modules.get("mcp.server.stdio")
    if 0 in (getattr(stdio, "_claims", None) or ()):  # mcp 2.x's stdio transport moved fd 0 off the wire
        return "stdio"
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "stdio"
    return "http" if any(name in sys.modules for name in ("uvicorn", "hypercorn")) else "unknown"


def loop_stack(monitor: Any) -> dict[str, Any]:
    """The loop thread's stack right now, the call it serves, its culprit line, a module it imports."""
    from ._blame import culprit_frame, sample_frame

    thread_id = monitor.loop_thread_id
    frames = sys._current_frames() if thread_id is not None else {}
    frames.pop(threading.get_ident(), None)  # this very frame: in the dict, a cycle of the two
    sample = sample_frame(frames.get(thread_id)) if thread_id is not None else None
    del frames
    if sample is None:
        return {"stack": [], "serving": None, "culprit": None, "importing": None}
    stack = tuple(Frame(*raw) for raw in sample.stack)
    home = monitor._tool_home(sample.call) if sample.call is not None else None  # the tool's own code, as in reports
    culprit = culprit_frame(stack, home) if stack else None
    return {
        "stack": _frames(stack),
        "serving": _call(sample.call),
        "culprit": _frames([culprit])[0] if culprit else None,
        "importing": sample.module,
    }


class Announcement:
    """One server's socket and the thread that answers it, for one run of the server's loop."""

    def __init__(self, handle: Any, directory: Path, log: BlockLog) -> None:
        self.handle = handle
        self.monitor = handle.monitor
        self.log = log
        self.directory = directory
        self.path = directory / f"{os.getpid()}.{next(_counter)}{SUFFIX}"
        self.started = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._streams: set[queue.SimpleQueue[Event | None]] = set()
        self._thread = threading.Thread(target=self._run, name="loopwatch-announce", daemon=True)

    # -- lifecycle (start and stop on the loop thread: cheap, nothing waits there) ------------------
    def start(self) -> None:
        self.monitor.add_listener(self._fan_out)
        _live.add(self)
        self._thread.start()
        self.started.wait(min(START_WAIT, self.monitor.options.threshold / 2))  # see START_WAIT

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            connections, streams = list(self._connections), list(self._streams)
        self.monitor.remove_listener(self._fan_out)
        _live.discard(self)
        self._unlink()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        for stream in streams:
            stream.put(None)
        for conn in connections:
            _shutdown(conn)
        if self._thread.ident is not None:
            self._thread.join(timeout=1.0)
        if not self._thread.is_alive():  # closed only once the thread is done with it: a reused fd is not ours
            self._close_pipe()

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.debug("cannot remove %s: %s", self.path, exc)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            listener = self._listen()
        except _StoppedFirst:  # a server that ran for less than its set-up took: nothing went wrong
            logger.debug("the server stopped before its announcement at %s was up", self.path)
            return
        except OSError as exc:
            logger.warning("cannot announce this server at %s: %s", self.path, exc)
            return
        finally:
            self.started.set()
        try:
            self._accept_loop(listener)
        finally:
            listener.close()

    def _listen(self) -> socket.socket:
        """Bound under a temporary name and renamed once it listens: a `.sock` that refuses is stale."""
        temporary = self.path.with_suffix(".tmp")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_quietly(temporary)
            listener.bind(str(temporary))
            os.chmod(temporary, 0o600)
            listener.listen(8)
            with self._lock:
                if self._closing:
                    raise _StoppedFirst
                os.rename(temporary, self.path)
        except BaseException:
            listener.close()
            _remove_quietly(temporary)
            raise
        return listener

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([listener, self._wake_r], [], [])  # no timeout: no idle wake-ups
            if self._wake_r in ready or self._closing:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if not _same_user(conn):
                conn.close()
                continue
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="loopwatch-announce-reader", daemon=True).start()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- one reader's connection -------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        try:
            for request in _lines(conn):  # the next request may come much later: waited for with no timeout
                conn.settimeout(SEND_TIMEOUT)  # a reader that does not read its answer is dropped
                if request.get("op") == "events":
                    self._stream(conn, int(request.get("replay") or 0))
                    return
                conn.sendall(_encode(self._answer(request)))
                conn.settimeout(None)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "state":
                return {"ok": True, **self.state(bool(request.get("detail")), int(request.get("blocks") or 10))}
            if op == "profile":
                return {"ok": True, "name": self.name, "pid": os.getpid(),
                        "blocks": [e.to_dict() for e in list(self.log.blocks)]}
        except Exception as exc:  # a bug here must not end the reader's connection, nor the server
            logger.debug("announcement answer failed", exc_info=True)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": False, "error": f"unknown op {op!r}; known: state, profile, events"}

    def _stream(self, conn: socket.socket, replay: int) -> None:
        stream: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        with self._lock:
            if self._closing:
                return
            self._streams.add(stream)
        try:
            for event in list(self.monitor.recent)[-replay:] if replay > 0 else ():
                conn.sendall(_encode(event.to_dict()))
            while (event := stream.get()) is not None:  # blocks without a timeout: no wake-ups between events
                conn.sendall(_encode(event.to_dict()))
        finally:
            with self._lock:
                self._streams.discard(stream)

    @any_thread
    def _fan_out(self, event: Event) -> None:
        """A listener, on the watchdog thread: hand the event to each streaming reader, never wait."""
        for stream in list(self._streams):
            stream.put(event)

    # -- what it says ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        server = self.handle.server
        return getattr(server, "name", None) or type(server).__name__

    def state(self, detail: bool = False, blocks: int = 10) -> dict[str, Any]:
        """What `top` shows of a server. Without `detail`, no per-tool percentiles (they sort every tool's
        durations): a reader's look holds the GIL, which the loop may be waiting for, as briefly as it can."""
        monitor = self.monitor
        lag_now = _lag_now(monitor)
        blocked = lag_now is not None and lag_now >= monitor.options.threshold
        rows = list(monitor.stats.tools.items())
        methods = list(monitor.stats.methods.values())
        state: dict[str, Any] = {
            "protocol": PROTOCOL,
            "name": self.name,
            "pid": os.getpid(),
            "command": list(getattr(sys, "orig_argv", sys.argv)),
            "transport": getattr(self.handle, "transport", None) or guess_transport(),
            "backend": monitor.backend,
            "started_at": monitor.started_at,
            "now": time.time(),
            "threshold_s": monitor.options.threshold,
            "lag_now_s": None if lag_now is None else round(lag_now, 4),
            "blocked": blocked,
            "minute": self._minute(lag_now if blocked else None),
            "in_flight": sum(r.in_flight for _, r in rows) + sum(r.in_flight for r in methods),
            "off_loop": sorted(name for name, _ in rows if monitor.where(name) != "loop"),
            "lag": {k: v for k, v in monitor.lag.to_dict().items() if k != "histogram"},
        }
        if blocked or detail:
            state.update(loop_stack(monitor))
        if detail:
            snapshot = monitor.snapshot()
            recent = snapshot.pop("recent_events")
            state["snapshot"] = snapshot
            state["recent_blocks"] = [e for e in recent if e["event"] == "loop_blocked"][-blocks:]
            state["recent_offloads"] = [e for e in recent if e["event"] != "loop_blocked"][-blocks:]
        return state

    def _minute(self, ongoing: float | None) -> dict[str, Any]:
        """Blocks in the last minute (of the server's life, when younger) and the share of it spent blocked;
        a block going on counts as it goes."""
        now = time.time()
        count, seconds = self.log.window(now)
        seconds += min(ongoing or 0.0, WINDOW)
        window = max(min(WINDOW, now - (self.monitor.started_at or now)), 1e-9)
        return {"blocks": count, "blocked_s": round(seconds, 4), "window_s": round(window, 3),
                "share": round(min(1.0, seconds / window), 4)}


class _StoppedFirst(Exception):
    """The server stopped before its announcement was up."""


def _lag_now(monitor: Any) -> float | None:
    heartbeat = monitor.heartbeat
    if heartbeat is None or not monitor.active:
        return None
    return max(0.0, time.monotonic() - heartbeat.beat[1] - heartbeat.interval)


def _same_user(conn: socket.socket) -> bool:
    """The directory already keeps others out; the peer's credentials say so again where Linux tells them."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return True
    try:
        import struct

        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i")))
    except OSError:
        return True
    return uid in (os.getuid(), 0)


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _encode(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, separators=(",", ":"), default=str) + "\n").encode()


def _lines(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """JSON requests, one a line, until the reader hangs up."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_REQUEST:
                raise ValueError("request too long")
        line, buffer = buffer.split(b"\n", 1)
        if line.strip():
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            yield request


_live: set[Announcement] = set()


@atexit.register
def _remove_at_exit() -> None:
    """A server that exits without its loop's clean-up (sys.exit in a tool) still takes its socket away."""
    for announcement in list(_live):
        announcement._unlink()


# -- the integration ---------------------------------------------------------------------------------


class AnnounceIntegration:
    """What `install()` returns: a new announcement each time the server's loop starts, gone when it stops."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.log = BlockLog()
        self.current: Announcement | None = None

    def start(self) -> None:
        directory = announce_dir()
        if directory is None:
            logger.warning("no private directory to announce this server in; `loopwatch top` "
                           "will not see it (set XDG_RUNTIME_DIR, or pass --no-announce)")
            return
        self.current = Announcement(self.handle, directory, self.log)
        self.current.start()

    def stop(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.stop()

    def close(self) -> None:
        monitor = self.handle.monitor
        for hooks, hook in ((monitor.start_hooks, self.start), (monitor.stop_hooks, self.stop)):
            if hook in hooks:
                hooks.remove(hook)
        monitor.remove_listener(self.log)
        self.stop()


def install(handle: Any) -> AnnounceIntegration:
    integration = AnnounceIntegration(handle)
    handle.monitor.add_listener(integration.log)
    handle.monitor.start_hooks.append(integration.start)
    handle.monitor.stop_hooks.append(integration.stop)
    return integration


def integration_of(handle: Any) -> AnnounceIntegration | None:
    return next((e for e in handle.extensions if isinstance(e, AnnounceIntegration)), None)


# -- readers: `loopwatch top`, `loopwatch ls`, `loopwatch report --server` -----------------------------


class Link:
    """A reader's connection to one server's socket: one JSON line asked, one answered."""

    def __init__(self, path: Path, timeout: float = 1.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self._sock, self._buffer = sock, b""

    def ask(self, **request: Any) -> dict[str, Any]:
        """Raises OSError (refused, gone, timed out) or ValueError (not an answer)."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(_encode(request))
            return json.loads(self._read_line())
        except BaseException:
            self.close()  # a late answer must not be read as the next one's
            raise

    def stream(self, replay: int = 0) -> Iterator[dict[str, Any]]:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(_encode({"op": "events", "replay": replay}))
        while True:
            yield json.loads(self._read_line())

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pid_of(path: Path) -> int | None:
    head = path.name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sockets(dirs: list[Path] | None = None) -> list[Path]:
    """Every announced socket in the private directories, oldest first."""
    found: list[Path] = []
    for directory in dirs if dirs is not None else candidate_dirs():
        if not private_dir(directory):
            continue
        try:
            found.extend(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
        except OSError:
            continue
    return sorted(dict.fromkeys(found), key=lambda p: (pid_of(p) or 0, p.name))


def is_stale(path: Path, error: OSError) -> bool:
    """Nobody listens: refused (its process died, or stopped without clean-up), or the process is gone."""
    if isinstance(error, ConnectionRefusedError):
        return True
    return not isinstance(error, FileNotFoundError) and not pid_alive(pid_of(path))


def clean(path: Path) -> bool:
    """Remove a stale announcement; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.debug("cannot remove stale %s: %s", path, exc)
        return False
    return True
