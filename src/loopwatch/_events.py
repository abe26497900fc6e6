"""Event types and their fan-out: block events, offload decisions, JSON lines."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ._courier import say

logger = logging.getLogger("loopwatch")

BlockKind = Literal["cpu", "wait", "gil", "import", "gc", "unknown"]

REPORT_TEXT_MAX = 200
"""Characters of a client-chosen string (method, tool name, request id) kept in tables and reports."""


def report_text(value: Any, limit: int = REPORT_TEXT_MAX) -> str:
    """A client-chosen string as reports carry it: cut at `limit` characters, control characters escaped.

    A request id or name is the client's to choose: raw, a newline in it forges a log line, a terminal escape
    reaches the operator's terminal, a megabyte of it sits in every table and report. The common case (short,
    printable) is returned as it is, after one C-level check.
    """
    text = value if value.__class__ is str else _as_text(value)
    if len(text) <= limit and text.isprintable():
        return text
    cut = text[:limit]
    return cut if cut.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in cut)


def _as_text(value: Any) -> str:
    try:
        return str(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return f"<an integer of {value.bit_length()} bits>"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@dataclass(frozen=True, slots=True)
class Frame:
    file: str
    line: int
    function: str

    def short(self) -> str:
        """`regex/_main.py:288 in sub`: an installed package's file with its package, an application's by name."""
        from ._blame import short_path

        return f"{short_path(self.file)}:{self.line} in {self.function}"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """The loop did not run for `duration_s`; who was on it, and how it spent the time."""

    time: float
    duration_s: float
    kind: BlockKind
    tool: str | None
    method: str | None
    request_id: str | None
    session_id: str | None
    cpu_s: float
    samples: int
    frames: tuple[Frame, ...] = ()
    culprit: Frame | None = None
    module: str | None = None
    arguments: dict[str, Any] | None = None
    gc_s: float = 0.0
    """Seconds of it the garbage collector ran (collections of 1 ms or more)."""
    released_at: Frame | None = None
    """For a `gil` block: the frame where the GIL was let go, read as the watchdog got it back (the native call
    that held it)."""
    offloaded: bool = False
    """The blamed call ran off the loop, in a worker thread: the loop waited for the GIL it held (`gil`) or for
    a collection it triggered (`gc`)."""
    event: str = field(default="loop_blocked", init=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["frames"] = [asdict(f) for f in self.frames]
        data["culprit"] = asdict(self.culprit) if self.culprit else None
        if self.module is None:
            del data["module"]
        if self.arguments is None:
            del data["arguments"]
        if self.released_at is None:
            del data["released_at"]
        else:
            data["released_at"] = asdict(self.released_at)
        if not self.offloaded:
            del data["offloaded"]
        return data

    def describe(self) -> str:
        """The one log line a person reads."""
        ms = round(self.duration_s * 1000)
        if self.offloaded and self.method is not None:
            return f"loop blocked {ms} ms [{self.kind}]: {self._offloaded_text()}"
        who = "outside any call"
        if self.kind == "gil" and self.method is None:
            who = "by a call it could not see"
        if self.method is not None:
            who = f"{'during' if self.kind == 'gc' else 'by'} {self._call_text()}"
        return f"loop blocked {ms} ms [{self.kind}] {who}{self._where()}"

    def _call_text(self) -> str:
        target = f" {self.tool}" if self.tool else ""
        rid = f" (request {self.request_id})" if self.request_id is not None else ""
        return f"{self.method}{target}{rid}"

    def _offloaded_text(self) -> str:
        at = f" at {self._chain()}" if self.frames else ""
        if self.kind == "gc":
            return (f"the garbage collector ran {round(self.gc_s * 1000)} ms of it, in the thread of "
                    f"{self._call_text()} (offloaded){at}")
        return f"the loop waited for the GIL held by {self._call_text()} (offloaded){at}"

    def _where(self) -> str:
        if self.kind == "gc":
            return f": the garbage collector ran {round(self.gc_s * 1000)} ms of it (the heap's cost, not the caller's)"
        gc_note = f" (garbage collection {round(self.gc_s * 1000)} ms)" if self.gc_s * 10 >= self.duration_s else ""
        return self._frames_text() + gc_note

    def _samples_text(self) -> str:
        return f"{self.samples} sample{'' if self.samples == 1 else 's'}"

    def _frames_text(self) -> str:
        if self.kind == "gil" and self.frames:
            return f": a native call at {self._chain()} held the GIL ({self._samples_text()})"
        if self.kind == "gil":
            return f": the watchdog could not sample ({self._samples_text()}), a native call held the GIL"
        if not self.frames:
            return ": no sample"
        text = " at " + self._chain()
        if self.module:
            text += f" (importing {self.module})"
        return text

    def _chain(self) -> str:
        return " <- ".join(f.short() for f in _where_frames(self.frames, self.culprit))


def _where_frames(frames: tuple[Frame, ...], culprit: Frame | None) -> list[Frame]:
    """The leaf, then the culprit (the line to fix in the server's own code) when it is another frame."""
    leaf = frames[-1]
    return [leaf] if culprit is None or culprit == leaf else [leaf, culprit]


@dataclass(frozen=True, slots=True)
class OffloadEvent:
    """A decision about where a tool runs."""

    time: float
    tool: str
    action: Literal["offloaded", "restored", "pinned", "advised"]
    """A decision, or (`advised`) advice about one: a CPU-bound tool on a thread that a process would cure."""
    reason: str
    blocks: int
    event: str = field(default="offloaded", init=False)
    executes: str = "thread"
    """Where the tool runs after this decision: loop, thread or process."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["event"] = self.action
        return data

    def describe(self) -> str:
        pinned = "is pinned to threads" if self.executes == "thread" else "is pinned to the loop"
        where = {"offloaded": f"now runs off the loop (in a {self.executes})", "restored": "runs on the loop again",
                 "pinned": pinned, "advised": f"runs in a {self.executes}"}[self.action]
        return f"tool {self.tool} {where}: {self.reason} ({self.blocks} blocks so far)"


Event = BlockEvent | OffloadEvent
Listener = Callable[[Event], None]


def any_thread(function: Any) -> Any:
    """Marks a listener or hook that touches no descriptor (no file, socket, log line, thread or process
    started): the watchdog may call it itself, with a descriptor table of its own, at once. Everything else
    goes through the courier (`_courier`), on a thread of the process's table."""
    function.any_thread = True
    return function


def is_any_thread(function: Any) -> bool:
    return getattr(function, "any_thread", False) is True


class Listeners:
    """Fan events out to callables. One that raises is logged and dropped, never retried."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Listener] = []

    def add(self, listener: Listener) -> None:
        with self._lock:
            if listener not in self._items:
                self._items.append(listener)

    def remove(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._items:
                self._items.remove(listener)

    def emit(self, event: Event, deliver: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Each listener now, or, with `deliver`, those not marked `any_thread` through it."""
        with self._lock:
            items = list(self._items)
        for listener in items:
            if deliver is None or is_any_thread(listener):
                self._call(listener, event)
            else:
                deliver(functools.partial(self._call, listener, event))

    def _call(self, listener: Listener, event: Event) -> None:
        if listener not in self._items:
            return  # removed since it was handed to the courier (it raised on an earlier event)
        try:
            listener(event)
        except Exception as exc:
            say(logging.ERROR, "listener %r raised; it is removed", listener, exc_info=exc)
            self.remove(listener)


EVENTS_MAX_BYTES = 50_000_000
"""Default size at which the events file is rotated (about 18,000 block events)."""
EVENTS_BACKUPS = 3
"""Default rotated files kept beside it: `events.jsonl.1` (newest) to `events.jsonl.3`."""


class JsonLinesWriter:
    """Append each event as one JSON object per line. A write that fails is reported once, never raised.

    Every line in the file is whole JSON: an event is one `write`, and a write the disk cuts short is
    truncated back to the last whole line (the next event would otherwise be glued onto the half). The
    file is opened for each event, so renaming or deleting it (logrotate) just starts a new one; past
    `max_bytes` (0: no limit) it is rotated to `path.1` ... `path.N`, N = `backups` (0: it starts over).
    """

    def __init__(self, path: str, max_bytes: int = EVENTS_MAX_BYTES, backups: int = EVENTS_BACKUPS) -> None:
        self.path = os.path.abspath(path)  # once, now: the server may chdir() later
        self.max_bytes = max_bytes
        self.backups = backups
        self.context: dict[str, Any] = {}
        """Fields every line carries besides the pid (the server's name): several servers, several
        processes may write one file."""
        self._failed = False
        self._lock = threading.Lock()
        try:  # fail now, with a clear error, if the file can't be opened at all
            fd = self._open()
            try:
                os.lseek(fd, 0, os.SEEK_END)  # refuses what is no file to append to (/proc/version)
            except OSError as exc:
                if exc.errno != errno.ESPIPE:  # a pipe or terminal (/dev/stderr) appends without seeking
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            refused = OSError(f"--events {path}: cannot append events to it: {exc.strerror or exc}")
            refused.errno = exc.errno
            raise refused from None

    def _open(self) -> int:
        flags = os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags | os.O_RDWR, 0o600)  # read too: to find the last whole line
        except PermissionError:
            return os.open(self.path, flags | os.O_WRONLY, 0o600)

    def __call__(self, event: Event) -> None:
        data = {**event.to_dict(), "pid": os.getpid(), **self.context}
        line = (json.dumps(data, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")
        with self._lock:
            try:
                self._append(line)
            except OSError as exc:
                if not self._failed:
                    logger.error("cannot write events to %s: %s (further failures are silent)",
                                 self.path, exc)
                self._failed = True
                return
            if self._failed:
                logger.warning("writes events to %s again", self.path)
            self._failed = False

    def _append(self, line: bytes) -> None:
        fd = self._open()
        try:
            end = self._whole_end(fd)
            if self.max_bytes and end and end + len(line) > self.max_bytes:
                os.close(fd)
                fd = -1
                self._rotate()
                fd = self._open()
                end = 0
            try:
                written = os.write(fd, line)
            except OSError:
                _truncate(fd, end)
                raise
            if written != len(line):
                _truncate(fd, end)
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written (disk full?)")
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _whole_end(fd: int) -> int:
        """The file's size, after cutting a half line left at its end (a crash, another writer, an old loopwatch)."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return 0
        size = info.st_size
        try:
            if os.pread(fd, 1, size - 1) == b"\n":
                return size
            end = _last_newline_end(fd, size)
        except OSError:  # opened write-only (a file the user may write but not read): trust it
            return size
        _truncate(fd, end)
        return end

    def _rotate(self) -> None:
        """`path` -> `path.1` -> ... -> `path.N`; the oldest goes. With no backups the file starts over."""
        if self.backups == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        for index in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")


def _last_newline_end(fd: int, size: int, chunk: int = 65536) -> int:
    """Offset just past the last newline before `size` (0 when there is none)."""
    position = size
    while position > 0:
        start = max(0, position - chunk)
        data = os.pread(fd, position - start, start)
        found = data.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def _truncate(fd: int, end: int) -> None:
    """Cut a half-written line off a regular file; on a device (/dev/full) there is nothing to cut."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, end)


def log_event(event: Event) -> None:
    logger.warning(event.describe())


class BlockLog:
    """The stderr listener: one line per event, except that blocks of one kind blamed on one tool repeating
    within `window` seconds are told once, then as one line with a count (an offloaded conversion's
    collections made fourteen lines)."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.window = window
        self._clock = clock or time.monotonic
        self._open: dict[tuple[str, str | None, str | None], list[Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if not isinstance(event, BlockEvent) or event.tool is None:
            log_event(event)
            return
        key, now = (event.kind, event.method, event.tool), self._clock()
        with self._lock:
            self._flush(now)
            entry = self._open.get(key)
            if entry is None:
                self._open[key] = [now, 0, 0.0, event]
            else:
                entry[1] += 1
                entry[2] += event.duration_s
                return
        log_event(event)

    @property
    def waiting(self) -> bool:
        """Whether a window is open (a later `flush` may have a count to tell)."""
        return bool(self._open)

    def flush(self, now: float | None = None) -> None:
        """Tell the counts of windows that are over (all of them with `now=inf`)."""
        with self._lock:
            self._flush(self._clock() if now is None else now)

    def _flush(self, now: float) -> None:
        for key, (began, count, seconds, first) in list(self._open.items()):
            if now - began < self.window:
                continue
            del self._open[key]
            if count:
                where = " (offloaded)" if first.offloaded else ""
                logger.warning("loop blocked %d more time%s [%s] by %s%s in the %.0f s after it (%d ms in all)",
                               count, "" if count == 1 else "s", first.kind, first._call_text().split(" (request")[0],
                               where, self.window, round(seconds * 1000))
