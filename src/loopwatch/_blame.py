"""Who was running: from a sampled frame of the loop thread to a stack and the call being served.

Frames are read without touching source files (no linecache I/O while holding the GIL).
The call being served is found by walking outward to a frame whose code object is registered
as a call frame and reading its `_lw_call` local.
"""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from ._events import REPORT_TEXT_MAX, Frame, report_text

MAX_DEPTH = 128
"""Frames kept of a sampled stack: the outermost `OUTER_KEPT` inward of the loop's dispatch (the tool's own
frame among them) and the innermost rest (the leaf's side); the walk to find the call goes on to the root."""
OUTER_KEPT = 32
MAX_WALK = 100_000
"""Frames walked at most looking for the call being served (a recursion limit raised that far)."""
OMITTED = "<loopwatch: frames omitted>"
CALL_LOCAL = "_lw_call"
TOOL_NAME_MAX = REPORT_TEXT_MAX
"""Characters of a client-sent tool name kept in reports."""

CallReader = Callable[[FrameType], "CallRecord | None"]
_call_codes: dict[CodeType, CallReader] = {}


def register_call_frame(code: CodeType, reader: CallReader | None = None) -> None:
    """Frames running `code` identify the call being served: by default through their `_lw_call` local."""
    _call_codes[code] = reader or _read_call


class CallRecord:
    """One request being served: what blame needs, and nothing computed on the hot path."""

    __slots__ = ("method", "tool", "label", "request_id", "ctx", "started", "blocked_s", "execution", "span")

    def __init__(self, method: str, tool: str | None, request_id: Any, ctx: Any, label: str = "") -> None:
        # The one place client-chosen strings enter loopwatch's tables and reports: each is cut and escaped here.
        self.method = report_text(method)
        self.tool = tool
        """The tool name the client sent (cut and escaped by `report_text`), for reports."""
        self.label = label
        """The bounded label for metrics: a registered tool name, `_OTHER`, or "" outside tools/call."""
        self.request_id = request_id if request_id is None or request_id.__class__ is int else report_text(request_id)
        """The id as reports carry it: an int, or the client's string cut and escaped."""
        self.ctx = ctx
        self.started = 0.0
        self.blocked_s = 0.0
        """Loop time this call blocked, added by the watchdog thread as blocks are found."""
        self.execution = "loop"
        self.span: Any = None
        """Slot for an integration (OpenTelemetry keeps the request's span here)."""

    def transport(self) -> str:
        """`pipe` for stdio and in-memory, `tcp` when an HTTP request carried the call."""
        return "pipe" if getattr(self.ctx, "request", None) is None else "tcp"

    def session_id(self) -> str | None:
        request = getattr(self.ctx, "request", None)
        headers = getattr(request, "headers", None)
        if headers is None:
            return None
        try:
            session = headers.get("mcp-session-id")
        except Exception:
            return None
        return None if session is None else report_text(session)

    def arguments(self) -> dict[str, Any] | None:
        params = getattr(self.ctx, "params", None) or {}
        args = params.get("arguments") if hasattr(params, "get") else None
        return dict(args) if isinstance(args, dict) else None


RawFrame = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the loop thread: its stack outermost first, the call it serves, a module it imports."""

    stack: tuple[RawFrame, ...]
    call: CallRecord | None
    module: str | None = None
    elsewhere: tuple[Sample, ...] = ()
    """Samples of the threads running offloaded calls, taken at the same moment."""
    loop_only: bool = False
    """Only the event loop's own machinery ran: no task, no callback of Python code (`sample_frame`)."""


def loop_base() -> RawFrame | None:
    """On the loop thread, in a task: the frame the loop's dispatch returns to between callbacks, the first
    frame outward of the task's coroutines. On uvloop, whose loop is C, that is the frame that started the loop
    (asyncio's runner): between callbacks it is the leaf of the loop thread's stack. On a Python loop it is a
    dispatch frame (asyncio's `Handle._run`, trio's run loop)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not frame.f_code.co_flags & _COROUTINE_FLAGS:
        frame = frame.f_back  # the caller's own frames, to its coroutine
    if frame is None:
        return None  # not in a task
    while frame is not None and frame.f_code.co_flags & _COROUTINE_FLAGS:
        frame = frame.f_back
    if frame is None:
        return None
    return (frame.f_code.co_filename, frame.f_lineno or 0, frame.f_code.co_name)


_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def sample_frame(leaf: FrameType | None, base: RawFrame | None = None, seen: list[Any] | None = None) -> Sample | None:
    """Read a frame chain (from `sys._current_frames()`) into a Sample. None when there is no frame.

    The call is found however deep the stack is; the frames kept are bounded (`bound_stack`). `base` is the
    loop's (`loop_base`): the frames outward of it are not the task's, and a sample that stops there, or at
    a Python loop's dispatch frame, is the loop's own. `seen`: each frame read is appended to it (a thread
    with a descriptor table of its own hands them to `_fdtable.hold`)."""
    if leaf is None:
        return None
    raw: list[RawFrame] = []
    call: CallRecord | None = None
    call_at = -1
    module: str | None = None
    frame: FrameType | None = leaf
    while frame is not None and len(raw) < MAX_WALK:
        if seen is not None:
            seen.append(frame)
        code = frame.f_code
        raw.append((code.co_filename, frame.f_lineno or 0, code.co_name))
        if call is None:
            reader = _call_codes.get(code)
            if reader is not None:
                call = reader(frame)
                call_at = len(raw) - 1
        if code.co_name == "_find_and_load" and code.co_filename.startswith("<frozen importlib"):
            module = _read_local(frame, "name") or module
        frame = frame.f_back
    raw.reverse()
    task = trim_to_task(raw, base)
    anchor = None if call_at < 0 else len(raw) - 1 - call_at - (len(raw) - len(task))
    kept = drop_own_leaf(task)
    if call is None and (not kept or is_dispatch(kept[-1]) or kept[-1] == base):
        # Only the leaf: outward of the loop is the script that started it, no line to fix.
        return Sample(tuple(kept[-1:]), None, module, loop_only=True)
    return Sample(bound_stack(kept, anchor=anchor), call, module)


def bound_stack(raw: Sequence[RawFrame], depth: int = MAX_DEPTH, anchor: int | None = None) -> tuple[RawFrame, ...]:
    """At most `depth` frames: the root's first few; from the call's frame (`anchor`) to a few frames past the
    tool's own (the first frame inward of it that is not the framework's); the innermost rest (the leaf's
    side); a marker where frames were left out, saying how many."""
    if len(raw) <= depth:
        return tuple(raw)
    start = anchor if anchor is not None and 0 <= anchor < len(raw) else 0
    tool = next((i for i in range(start, len(raw)) if not is_framework(raw[i][0])), start)
    end = min(len(raw), tool + 8)
    if end - start > OUTER_KEPT:  # a long framework chain between the call's frame and the tool: its two ends
        ranges = [(0, min(4, start)), (start, start + 8), (end - OUTER_KEPT + 9, end)]
    else:
        ranges = [(0, min(4, start)), (start, end)]
    room = depth - sum(b - a for a, b in ranges) - len(ranges)
    ranges.append((max(end, len(raw) - room), len(raw)))
    kept: list[RawFrame] = []
    last = 0
    for a, b in ranges:
        if a > last:
            kept.append((OMITTED, a - last, "..."))
        kept.extend(raw[max(a, last) : b])
        last = max(last, b)
    return tuple(kept)


def drop_own_leaf(raw: Sequence[RawFrame]) -> Sequence[RawFrame]:
    """Without loopwatch's own frames at the leaf (its gc callback, its sampler): never a leaf or a culprit."""
    end = len(raw)
    while end > 0 and is_loopwatch(raw[end - 1][0]):
        end -= 1
    return raw[:end] if end < len(raw) else raw


_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_loopwatch(file: str) -> bool:
    """loopwatch's own code (its demo is application code)."""
    return file.startswith(_HERE) and _DEMO not in file


def _read_local(frame: FrameType, name: str) -> Any:
    try:
        return frame.f_locals.get(name)
    except Exception:
        return None


def _read_call(frame: FrameType) -> CallRecord | None:
    value = _read_local(frame, CALL_LOCAL)
    return value if isinstance(value, CallRecord) else None


def current_call() -> CallRecord | None:
    """On the loop, in a call's task: the call being served, as the watchdog would read it."""
    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None and depth < MAX_WALK:
        reader = _call_codes.get(frame.f_code)
        if reader is not None:
            call = reader(frame)
            if call is not None:
                return call
        frame, depth = frame.f_back, depth + 1
    return None


OFFLOADED_CALLS: dict[int, list[CallRecord | None]] = {}
"""Thread id -> the offloaded calls running there now (a worker loop may run several)."""
OFFLOAD_SPANS: deque[tuple[float, float, CallRecord | None]] = deque(maxlen=256)
"""(start, end) on the monotonic clock of recent offloaded calls, running ones with end = inf."""


async def serve_offloaded(record: CallRecord | None, fn: Callable[[], Any]) -> Any:
    """Run an offloaded call in its worker thread, so samples of that thread (and its garbage collections)
    know the call they serve."""
    _lw_call = record  # noqa: F841 - read by blame through the frame
    if record is not None:
        record.execution = "thread"
    running = OFFLOADED_CALLS.setdefault(threading.get_ident(), [])
    running.append(record)
    span = [time.monotonic(), float("inf"), record]
    OFFLOAD_SPANS.append(span)  # type: ignore[arg-type]
    try:
        result = fn()
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        span[1] = time.monotonic()
        running.remove(record)
        if not running:
            OFFLOADED_CALLS.pop(threading.get_ident(), None)


def offloaded_during(start: float, end: float) -> list[CallRecord]:
    """The offloaded calls that ran at some point between `start` and `end` (monotonic)."""
    for _ in range(3):
        try:
            spans = tuple(OFFLOAD_SPANS)
            break
        except RuntimeError:
            continue
    else:
        return []
    return [call for began, ended, call in spans if call is not None and began < end and ended > start]


register_call_frame(serve_offloaded.__code__)


def record_from_context(ctx: Any) -> CallRecord | None:
    """A CallRecord for an SDK request context, for servers loopwatch's middleware is not on."""
    method = getattr(ctx, "method", None)
    if not isinstance(method, str):
        return None
    params = getattr(ctx, "params", None) or {}
    name = params.get("name") if method == "tools/call" and hasattr(params, "get") else None
    tool = report_text(name) if isinstance(name, str) else None
    return CallRecord(method, tool, getattr(ctx, "request_id", None), ctx)


def _read_sdk_request(frame: FrameType) -> CallRecord | None:
    return record_from_context(_read_local(frame, "ctx"))


def register_sdk_frames() -> None:
    """Blame through the SDK's own request frame, so un-instrumented servers are blamed too."""
    try:
        from mcp.server.runner import ServerRunner
    except Exception:  # mcp 1.x: no runner; its Server._handle_request frame names the request
        from .servers.mcp1 import register_sdk_frames as register_mcp1_frames

        register_mcp1_frames()
        return
    register_call_frame(ServerRunner._on_request.__code__, _read_sdk_request)


def _dir_of(module: Any) -> str:
    return os.path.dirname(getattr(module, "__file__", "") or "") + os.sep


_DISPATCH_FUNCS = {
    "_run",
    "_run_once",
    "run_forever",
    "run_until_complete",
    "__step",
    "__step_run_and_handle_result",
    "unrolled_run",
}


def _dispatch_dirs() -> tuple[str, ...]:
    import asyncio

    dirs = [_dir_of(asyncio)]
    for name in ("trio._core", "uvloop"):
        mod = sys.modules.get(name)
        if mod is not None:
            dirs.append(_dir_of(mod))
    return tuple(dirs)


def is_dispatch(frame: RawFrame) -> bool:
    file, _, func = frame
    return func in _DISPATCH_FUNCS and file.startswith(_dispatch_dirs())


def trim_to_task(raw: Sequence[RawFrame], base: RawFrame | None = None) -> Sequence[RawFrame]:
    """Drop the event loop's own frames: keep what runs inward of the innermost dispatch frame, or of the loop's
    `base` (uvloop's dispatch is C: what started the loop, asyncio's runner and the script, is outward)."""
    for index in range(len(raw) - 1, -1, -1):
        if is_dispatch(raw[index]) or raw[index] == base:
            return raw[index + 1 :] or raw
    return raw


_FRAMEWORK_PACKAGES = (
    "mcp",
    "mcp_types",
    "fastmcp",
    "anyio",
    "starlette",
    "pydantic",
    "pydantic_core",
    "loopwatch",
    "trio",
    "uvloop",
    "sniffio",
    "opentelemetry",
    "uvicorn",
    "sse_starlette",
    "_pytest",
    "pytest_asyncio",
)


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib")} | {
        paths[k] + os.sep for k in ("stdlib", "platstdlib")
    })


def _framework_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _FRAMEWORK_PACKAGES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            dirs.append(_dir_of(mod))
    return tuple(dirs + [_HERE])


_DEMO = os.sep + os.path.join("loopwatch", "demo") + os.sep


def _package_of(file: str) -> str | None:
    """The top-level package of a file installed under site-packages or dist-packages."""
    for marker in ("site-packages", "dist-packages"):
        index = file.rfind(marker + os.sep)
        if index >= 0:
            rest = file[index + len(marker) + 1 :]
            return rest.split(os.sep, 1)[0].removesuffix(".py")
    return None


def is_framework(file: str, _cache: dict[str, bool] = {}) -> bool:  # noqa: B006 - a deliberate memo
    """Stdlib, the frozen import machinery, and the packages between the transport and a tool."""
    known = _cache.get(file)
    if known is None:
        package = _package_of(file)
        if _DEMO in file:
            known = False  # the bundled demo is application code, though it ships inside loopwatch
        elif package is not None:
            known = package in _FRAMEWORK_PACKAGES
        else:
            known = file.startswith("<") or file.startswith(_stdlib_dirs()) or file.startswith(_framework_dirs())
        if len(_cache) < 4096:
            _cache[file] = known
    return known


def is_application(file: str) -> bool:
    """Code of the project being watched: not the standard library, not an installed package."""
    if file.startswith("<") or _package_of(file) is not None and _DEMO not in file:
        return False
    return _DEMO in file or not file.startswith(_stdlib_dirs() + _framework_dirs())


def home_of(file: str) -> str:
    """Where the code of `file` lives, as "own code" for blame: an installed package's folder (its top-level
    package under site-packages; a single-module distribution: the module), else the file's directory."""
    package = _package_of(file)
    if package is None or _DEMO in file:
        return os.path.dirname(file) + os.sep
    folder = file[: file.index(os.sep + package, file.rfind("-packages" + os.sep)) + 1] + package + os.sep
    return folder if file.startswith(folder) else file


def is_own(file: str, home: str) -> bool:
    """Code of the project whose home is `home`: under it, and not a package installed inside it (a venv)."""
    return file.startswith(home) and _package_of(file) == _package_of(home) and not is_loopwatch(file)


def tool_frame(stack: Sequence[Frame]) -> Frame | None:
    """The tool's own function in a stack, as well as a stack tells: its outermost frame that is not the
    framework's (transport, SDK, validation, loopwatch)."""
    return next((frame for frame in stack if not is_framework(frame.file)), None)


def culprit_frame(stack: Sequence[Frame], home: str | None = None) -> Frame | None:
    """The line to fix: the innermost frame of the server's own code on the way to the leaf.

    Own code is decided from `home` (where the blamed tool's function is defined, see `home_of`), else from
    the tool's frame in the stack. Inside an import, the frame that executed the `import` statement."""
    import_at = _import_statement(stack)
    if import_at is not None:
        return import_at
    if home is None:
        entry = tool_frame(stack)
        home = home_of(entry.file) if entry is not None else None
    if home is not None:
        own = next((frame for frame in reversed(stack) if is_own(frame.file, home)), None)
        if own is not None:
            return own
    return _entry_of_innermost_block(stack)


def _entry_of_innermost_block(stack: Sequence[Frame]) -> Frame | None:
    index = len(stack) - 1
    while index >= 0 and is_framework(stack[index].file):
        index -= 1
    entry = None
    while index >= 0 and not is_framework(stack[index].file):
        entry = stack[index]
        index -= 1
    return entry


def short_path(file: str) -> str:
    """A file as a report shows it: an installed package's path from its package (`regex/_main.py`), a
    standard library module's from the library (`json/decoder.py`), else the file's name."""
    for marker in ("site-packages", "dist-packages"):
        index = file.rfind(marker + os.sep)
        if index >= 0:
            return file[index + len(marker) + 1 :]
    for stdlib in _stdlib_dirs():
        if file.startswith(stdlib):
            return file[len(stdlib) :]
    return os.path.basename(file)


def _import_statement(stack: Sequence[Frame]) -> Frame | None:
    """For a block inside an import, the frame that executed the `import` statement."""
    for index, frame in enumerate(stack):
        if frame.file.startswith("<frozen importlib") and index > 0:
            return stack[index - 1]
    return None


def is_import(stack: Sequence[RawFrame]) -> bool:
    return any(file.startswith("<frozen importlib") for file, _, _ in stack)


def call_key(call: CallRecord) -> int:
    """Samples of one request agree on this, whichever frame their record was read from."""
    return id(call.ctx) if call.ctx is not None else id(call)


def richer(kept: CallRecord | None, seen: CallRecord | None) -> CallRecord | None:
    """Of two records of one call (one `call_key`), the one to keep: `kept`, unless `seen` was made or read by
    loopwatch's middleware (it has `started`, and a tool's label) and `kept` only from the SDK's frame. A
    sample taken before the middleware's frame ran or set its locals (right after a collection that began in
    the SDK's code, on a loaded machine) finds the call only through the SDK's frame: a call blamed through
    that record had no label, so the offloader never counted its blocks, and it had none of the call's hooks'
    state (its span, its blocked time)."""
    if kept is None or (seen is not None and _made_by_middleware(seen) > _made_by_middleware(kept)):
        return seen
    return kept


def _made_by_middleware(call: CallRecord) -> tuple[bool, bool]:
    return call.started > 0, bool(call.label)


@dataclass(frozen=True, slots=True)
class Profile:
    """What a series of samples during one block says."""

    stack: tuple[Frame, ...]
    call: CallRecord | None
    samples: int
    importing: bool
    module: str | None


def summarize(samples: Sequence[Sample]) -> Profile:
    """The hottest stack, and the call that held the loop in most samples (a majority, or nobody)."""
    if not samples:
        return Profile((), None, 0, False, None)
    stacks = Counter(s.stack for s in samples)
    hottest = max(stacks.items(), key=lambda item: item[1])[0]
    calls = Counter(call_key(s.call) for s in samples if s.call is not None)
    call = None
    if calls:
        best, count = calls.most_common(1)[0]
        if count * 2 > len(samples):
            for s in samples:
                if s.call is not None and call_key(s.call) == best:
                    call = richer(call, s.call)
    importing = sum(1 for s in samples if is_import(s.stack)) * 2 > len(samples)
    module = next((s.module for s in reversed(samples) if s.module), None) if importing else None
    frames = tuple(Frame(f, ln, fn) for f, ln, fn in hottest)
    return Profile(frames, call, len(samples), importing, module)
