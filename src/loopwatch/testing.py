"""Assertions about event-loop blocking, for a project's own async tests.

    from loopwatch.testing import collect_blocks, no_blocking

    async def test_search_never_blocks():
        async with no_blocking(threshold=0.05):          # LoopBlockedError if the loop stalls
            async with Client(server) as client:
                await client.call_tool("search", {"query": "x"})

    async def test_crunch_is_blamed():
        async with collect_blocks(threshold=0.05) as blocks:
            async with Client(server) as client:
                await client.call_tool("crunch", {})
        assert [block.tool for block in blocks] == ["crunch"]

Both watch the loop they are entered on (asyncio, uvloop or trio) with their own sentinel and
watchdog, so the server under test needs no instrumentation. A block is reported by the watchdog
only once the loop has recovered; on a normal exit both wait, with a bound, until every block that
ended inside the `async with` has arrived.
"""

from __future__ import annotations

import linecache
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, overload

import anyio

from ._blame import is_framework
from ._events import BlockEvent, Event, Frame, any_thread
from ._monitor import Monitor
from ._watch import watch

DEFAULT_THRESHOLD = 0.05
SETTLE_TIMEOUT = 2.0
"""Seconds to wait at most for the watchdog to report blocks that already ended."""
DETAILED = 3
"""Blocks reported with their frames; further ones get one line each."""

# For each `no_blocking` (and the pytest plugin's watch) around the running code, the wall-clock
# windows in which a `collect_blocks` collected blocks for the test's own assertions: blocks in them
# are the test's to judge, not a failure.
_claims: ContextVar[tuple[list[tuple[float, float]], ...]] = ContextVar("loopwatch_claims", default=())


class LoopBlockedError(AssertionError):
    """The event loop was blocked for `threshold` seconds or more; `blocks` are the reports."""

    def __init__(self, blocks: Sequence[BlockEvent], threshold: float) -> None:
        self.blocks = tuple(blocks)
        self.threshold = threshold
        super().__init__(_format_blocks(self.blocks, threshold))


class BlockCollector(Sequence[BlockEvent]):
    """The blocks seen so far, in order. The watchdog thread appends; read it on the loop.

    Blocks the garbage collector held (kind `gc`) are left out unless `gc` is true: a collection's
    cost is the whole process heap's, so it says nothing about the code under test, and it comes
    at whatever moment the test process's allocations add up.
    """

    def __init__(self, monitor: Monitor, gc: bool = False) -> None:
        self.monitor = monitor
        self.threshold = monitor.options.threshold
        self.gc = gc
        self.collections: list[BlockEvent] = []
        """The `gc` blocks left out."""
        self._events: list[BlockEvent] = []
        self._beats = 0
        self._late = 0
        monitor.add_listener(self._on_event)
        monitor.lag_observers.append(self._on_lag)

    @any_thread
    def _on_event(self, event: Event) -> None:
        if isinstance(event, BlockEvent):
            if event.kind == "gc" and not self.gc:
                self.collections.append(event)
            else:
                self._events.append(event)

    @any_thread
    def _on_lag(self, lag: float) -> None:
        # Every beat the sentinel found late becomes exactly one BlockEvent: counting them here
        # tells `settle()` how many events are still on their way.
        self._late += lag >= self.threshold
        self._beats += 1

    @overload
    def __getitem__(self, index: int) -> BlockEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[BlockEvent]: ...

    def __getitem__(self, index: int | slice) -> BlockEvent | list[BlockEvent]:
        return self._events[index]

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[BlockEvent]:
        return iter(list(self._events))

    def __repr__(self) -> str:
        return f"BlockCollector({self._events!r})"

    def tools(self) -> list[str | None]:
        """The tool each block is blamed on (None outside a tool call), in order."""
        return [event.tool for event in self._events]

    def report(self) -> str:
        """The blocks as the failure message of `no_blocking` shows them."""
        return _format_blocks(self._events, self.threshold)

    async def settle(self) -> None:
        """Wait until every block that ended before this call is collected (at most SETTLE_TIMEOUT s)."""
        heartbeat = self.monitor.heartbeat
        if heartbeat is None or not self.monitor.active:
            return
        # The beat after this moment records any block that just ended. Every late beat becomes
        # exactly one event: once the late beats up to it are counted, the missing events are known.
        target = heartbeat.beat[0] + 1
        await _wait_until(lambda: heartbeat.beat[0] >= target and self._pending() == 0, heartbeat.interval)

    def _pending(self) -> int | None:
        """Late beats recorded so far without their event yet; None while that can't be told.

        Lags the watchdog has taken in are counted by `_on_lag`; the rest still sit in the heartbeat.
        Read on the loop, so the sentinel stands still; the watchdog may move a lag from one to the
        other meanwhile, which shows as a total that is not the beat count: then ask again later
        (the watchdog wakes only about once per threshold period while the loop is healthy).
        """
        heartbeat = self.monitor.heartbeat
        assert heartbeat is not None
        counted = self._beats
        try:
            waiting = heartbeat.lags.copy()
        except RuntimeError:  # mutated while copied
            return None
        if self._beats != counted or counted + len(waiting) != heartbeat.beat[0]:
            return None
        late = self._late + sum(lag >= self.threshold for lag in waiting)
        return max(0, late - len(self._events) - len(self.collections))

    async def _started(self) -> None:
        """Wait for the sentinel's first run: a block before it would shift its baseline unseen."""
        heartbeat = self.monitor.heartbeat
        if heartbeat is None:
            return
        created = heartbeat.beat
        await _wait_until(lambda: heartbeat.beat != created, heartbeat.interval)


async def _wait_until(done: Callable[[], bool], interval: float) -> None:
    """Poll `done` on the loop: a few bare checkpoints, then every `interval`, for SETTLE_TIMEOUT at most."""
    with anyio.move_on_after(SETTLE_TIMEOUT):
        attempt = 0
        while not done():
            await anyio.sleep(0 if attempt < 3 else interval)
            attempt += 1


_warm = False
_TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {"result": {"type": "array", "items": {"type": "string"}}},
    "required": ["result"],
}


def _warm_up() -> None:
    """Do the MCP client's one-time lazy set-up now, before any watch.

    The client imports jsonschema and loads its metaschemas on the first call of a tool with an
    output schema: tens of milliseconds on the loop, in the test's harness rather than in the
    server under test, that would fail whichever honest test happens to run first.
    """
    global _warm
    if _warm or "mcp.client.session" not in sys.modules:
        return
    try:
        from jsonschema.validators import validator_for

        validator_for(_TYPICAL_SCHEMA).check_schema(_TYPICAL_SCHEMA)
    except Exception:  # an mcp without jsonschema has nothing to warm
        pass
    _warm = True


@asynccontextmanager
async def _collecting(threshold: float, options: dict[str, Any]) -> AsyncIterator[BlockCollector]:
    gc = bool(options.pop("gc", False))
    options.setdefault("log_blocks", False)
    if not _warm and "mcp.client.session" in sys.modules:
        await anyio.to_thread.run_sync(_warm_up)  # off the loop: importing would block it
    raised: BaseException | None = None
    try:
        async with watch(threshold=threshold, **options) as monitor:
            blocks = BlockCollector(monitor, gc=gc)
            await blocks._started()
            try:
                yield blocks
            except BaseException as exc:
                raised = exc
                raise
            await blocks.settle()
    except BaseExceptionGroup as group:
        # The monitor's task group wraps what the body raised: a test sees its own exception.
        if raised is None or len(group.exceptions) != 1 or not _same(group.exceptions[0], raised):
            raise
        _reraise(raised)


def _same(seen: BaseException, raised: BaseException) -> bool:
    """`seen` is `raised`, or a copy trio made of that group on its way through a cancel scope."""
    if seen is raised:
        return True
    if not isinstance(seen, BaseExceptionGroup) or not isinstance(raised, BaseExceptionGroup):
        return False
    return (
        type(seen) is type(raised)
        and seen.message == raised.message
        and len(seen.exceptions) == len(raised.exceptions)
        and all(_same(a, b) for a, b in zip(seen.exceptions, raised.exceptions, strict=True))
    )


def _reraise(exc: BaseException) -> None:
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context


@asynccontextmanager
async def collect_blocks(
    threshold: float = DEFAULT_THRESHOLD, **options: Any
) -> AsyncIterator[BlockCollector]:
    """Collect the blocks of the running loop while the `async with` runs.

    `threshold` is in seconds; `gc=True` collects the garbage collector's blocks too (left out by
    default: see BlockCollector); other keyword arguments are `loopwatch.watch()` options. Blocks
    collected here are the test's to assert on: an enclosing `no_blocking` (or the pytest plugin)
    does not fail because of them.
    """
    start = time.time()
    try:
        async with _collecting(threshold, options) as blocks:
            yield blocks
    finally:
        for windows in _claims.get():
            windows.append((start, time.time()))


class _Guard:
    """What `_guarding()` saw: the blocks, and which of them no inner `collect_blocks` claimed."""

    def __init__(self, blocks: BlockCollector) -> None:
        self.blocks = blocks
        self.claims: list[tuple[float, float]] = []

    def offending(self) -> list[BlockEvent]:
        return [b for b in self.blocks if not any(start <= _midpoint(b) <= end for start, end in self.claims)]

    def note(self, exc: BaseException) -> None:
        """Tell, on an exception the body raised, about the blocks seen."""
        offending = self.offending()
        if offending:
            report = _format_blocks(offending, self.blocks.threshold)
            exc.add_note(f"loopwatch saw the event loop blocked meanwhile:\n{report}")


def _midpoint(block: BlockEvent) -> float:
    return block.time + block.duration_s / 2


@asynccontextmanager
async def _guarding(threshold: float, options: dict[str, Any]) -> AsyncIterator[_Guard]:
    """Collect blocks and the windows inner collectors claim; the caller judges after the exit."""
    async with _collecting(threshold, options) as blocks:
        guard = _Guard(blocks)
        token = _claims.set((*_claims.get(), guard.claims))
        try:
            yield guard
        except Exception as exc:
            if not isinstance(exc, LoopBlockedError):  # an inner no_blocking already told
                with anyio.CancelScope(shield=True):
                    await blocks.settle()
                guard.note(exc)
            raise
        finally:
            _claims.reset(token)


@asynccontextmanager
async def no_blocking(threshold: float = DEFAULT_THRESHOLD, **options: Any) -> AsyncIterator[BlockCollector]:
    """Raise LoopBlockedError on exit when the loop was blocked for `threshold` seconds or more inside.

    A block the garbage collector held fails only with `gc=True`. When the body raises, its exception
    propagates instead, with a note naming the blocks seen.
    """
    __tracebackhide__ = True
    async with _guarding(threshold, options) as guard:
        yield guard.blocks
    offending = guard.offending()
    if offending:
        raise LoopBlockedError(offending, threshold)


# -- the report -----------------------------------------------------------------------------------


def _format_blocks(blocks: Sequence[BlockEvent], threshold: float) -> str:
    """The failure message: the run-time report line of each block, the first blocks with their frames.

    The first line is the first block's report, so a one-line summary of the failure names the tool.
    """
    lines: list[str] = []
    for index, event in enumerate(blocks):
        lines.append(event.describe())
        if index < DETAILED:
            lines.extend(_format_frames(event.frames))
    count = len(blocks)
    noun = "block" if count == 1 else "blocks"
    lines.append(f"(loopwatch: {count} {noun} of {_ms(threshold)} or more)")
    return "\n".join(lines)


def _format_frames(frames: Sequence[Frame], indent: str = "    ") -> list[str]:
    """Outermost first: the application's frames with their source line, library runs folded."""
    lines: list[str] = []
    folded: list[Frame] = []
    for index, frame in enumerate(frames):
        leaf = index == len(frames) - 1
        if is_framework(frame.file) and not leaf:
            folded.append(frame)
            continue
        if folded and lines:  # the runner's frames before the first application frame say nothing
            lines.append(f"{indent}... {_fold(folded)}")
        folded = []
        lines.append(f"{indent}{_path(frame.file)}:{frame.line} in {frame.function}")
        source = _source(frame)
        if source:
            lines.append(f"{indent}    {source}")
    return lines


def _fold(frames: Sequence[Frame]) -> str:
    packages = list(dict.fromkeys(_package(frame.file) for frame in frames))
    noun = "frame" if len(frames) == 1 else "frames"
    return f"{len(frames)} library {noun} ({', '.join(packages)})"


def _package(file: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in file:
            return file.split(marker, 1)[1].split(os.sep, 1)[0].removesuffix(".py")
    if file.startswith("<frozen"):
        return "importlib"
    return "stdlib" if is_framework(file) else os.path.basename(file)


def _path(file: str) -> str:
    if file.startswith("<"):
        return file
    try:
        relative = os.path.relpath(file)
    except ValueError:
        return file
    return file if relative.startswith(os.pardir) else relative


def _source(frame: Frame) -> str:
    if frame.file.startswith("<"):
        return ""
    return linecache.getline(frame.file, frame.line).strip()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


__all__ = (
    "BlockCollector",
    "LoopBlockedError",
    "collect_blocks",
    "no_blocking",
)
