"""The monitor: sentinel, watchdog, statistics and event fan-out for one watched loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from . import _fdtable
from ._blame import CallRecord, home_of, loop_base, offloaded_during, register_sdk_frames
from ._courier import HOT_SHARE, Courier, say
from ._events import BlockEvent, BlockLog, Event, JsonLinesWriter, Listener, Listeners, is_any_thread
from ._gc import GC_CLOCK
from ._options import Options
from ._sentinel import Heartbeat, current_backend, run_sentinel
from ._stats import OTHER, StatsTable, ToolNames
from ._timer import StallTimer, stall_timer
from ._watchdog import Detector, Watchdog, loop_cpu_clock, thread_cpu_clock, thread_demand_clock, thread_sampler

logger = logging.getLogger("loopwatch")

LAG_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class LagStats:
    """The sentinel's lag, summarised on the watchdog thread."""

    def __init__(self) -> None:
        self.last = 0.0
        self.max = 0.0
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(LAG_BOUNDS) + 1)
        self.recent: deque[float] = deque(maxlen=1024)

    def add(self, lag: float) -> None:
        self.last = lag
        self.max = max(self.max, lag)
        self.count += 1
        self.total += lag
        self.recent.append(lag)
        for index, bound in enumerate(LAG_BOUNDS):
            if lag <= bound:
                self.buckets[index] += 1
                return
        self.buckets[-1] += 1

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.recent)
        pick = lambda q: round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 6) if ordered else None  # noqa: E731
        return {
            "last_s": round(self.last, 6),
            "max_s": round(self.max, 6),
            "p50_s": pick(0.5),
            "p99_s": pick(0.99),
            "beats": self.count,
            "histogram": {f"le_{b}": n for b, n in zip(LAG_BOUNDS + ("inf",), self.buckets, strict=True)},
        }


class Monitor:
    def __init__(self, options: Options, tools: ToolNames | None = None) -> None:
        self.options = options
        self.listeners = Listeners()
        self.tools = tools or ToolNames(options.max_tools)
        self.stats = StatsTable(max_rows=options.max_tools)
        self.lag = LagStats()
        self.recent: deque[Event] = deque(maxlen=options.recent_events)
        self.lag_observers: list[Callable[[float], None]] = []
        """Called on the watchdog thread with each lag the sentinel measured."""
        self.block_hooks: list[Callable[[BlockEvent, CallRecord | None], None]] = []
        """Called on the watchdog thread with each block and the call it is blamed on."""
        self.blocking_hooks: list[Callable[[CallRecord, float, bool, tuple[Any, ...]], None]] = []
        """Called on the watchdog thread while a block goes on: the call holding the loop, seconds so far,
        whether it is importing, and the latest sampled stack."""
        self.where: Callable[[str], str] = lambda tool: "loop"
        self.start_hooks: list[Callable[[], None]] = []
        """Called on the loop thread when watching starts (after the watchdog is up)."""
        self.loop_checks: list[Callable[[], None]] = []
        """Called on the loop thread about once a second while it is watched (keep them cheap)."""
        self.stop_hooks: list[Callable[[], None]] = []
        """Called on the loop thread when watching stops (before the watchdog goes)."""
        self.services: list[Callable[[], AbstractAsyncContextManager[Any]]] = []
        """Async context managers entered on the loop for as long as it is watched."""
        self.task_group: anyio.abc.TaskGroup | None = None
        """The watch's task group, for services to start tasks in (one group: a shallower scope chain for
        every call served inside it)."""
        self.started_at: float | None = None
        self.loop_thread_id: int | None = None
        self.backend: str | None = None
        self._outbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._refs = 0
        self._watchdog: Watchdog | None = None
        self._courier: Courier | None = None
        """Runs the listeners and hooks for a watchdog with a descriptor table of its own (`_fdtable`)."""
        self._share_from: tuple[float, float] | None = None
        """(monotonic, loop thread CPU seconds) at the last check: the loop's share of a core since."""
        self.share_clocks: tuple[Callable[[], float], Callable[[], float]] = (time.monotonic, time.thread_time)
        """Wall and loop thread CPU clocks of `_check_courier` (tests replace them)."""
        self._timer: StallTimer | None = None
        self.heartbeat: Heartbeat | None = None
        self._cancel_sentinel: Callable[[], None] | None = None
        self.tool_file: Callable[[str], str | None] = lambda tool: None
        """Where a tool's function is defined (set by `instrument()`): its package or folder is the server's
        own code, where blame looks for the line to fix."""
        self._log: BlockLog | None = None
        if options.log_blocks:
            self._log = BlockLog()
            self.listeners.add(self._log)
        self._writer = None
        if options.events:
            self._writer = JsonLinesWriter(options.events, options.events_max_bytes, options.events_backups)
        if self._writer is not None:
            self.listeners.add(self._writer)

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._watchdog is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Monitor]:
        """Watch the current loop while the block runs. Nested or concurrent entries share one watch."""
        register_sdk_frames()
        with self._lock:
            self._refs += 1
            owner = self._refs == 1
        if not owner:
            try:
                yield self
            finally:
                with self._lock:
                    self._refs -= 1
            return
        if current_backend() == "asyncio":
            async with self._watching_beside():
                yield self
            return
        try:
            async with self._watching():
                yield self
        finally:
            with self._lock:
                self._refs -= 1

    @asynccontextmanager
    async def _watching_beside(self) -> AsyncIterator[None]:
        """asyncio: the watch (its task group: the sentinel, the services' tasks) runs in a task of its own
        beside the watched block, so a block that ends by cancellation leaves without waiting for it.

        A server's lifespan is such a block. Ctrl-C cancels the server's main task; the SDK hands its stdio
        transport a `Connection closed` answer for the call in flight as its task group unwinds, and the
        transport is cancelled a few loop iterations later: the answer reaches stdout only if the transport's
        writer (a worker thread) flushes it in between. The watch's task group, exited here, added two
        iterations (the answer was written in about 1 run in 10, by the bare server in about 1 in 50). So on
        cancellation this exit takes none: the watch is told to end and ends beside the server's unwinding
        (the entry's count is released when it has ended; an entry meanwhile shares the ending watch). Any
        other exit waits for the watch to end, as before. A watch task that fails cancels the block and its
        error is raised here, as when the task group held the block; after a cancelled block, it is logged.
        """
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        stop = asyncio.Event()
        failed: list[BaseException] = []
        left: list[bool] = []  # the block ended by cancellation: nobody waits for the watch's end
        body = anyio.CancelScope()

        async def watch() -> None:
            try:
                async with self._watching():
                    if not started.done():
                        started.set_result(None)
                    await stop.wait()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                elif left:
                    logger.error("the watch failed as it ended", exc_info=exc)
                else:
                    failed.append(exc)
                    body.cancel()
            finally:
                release()

        def release() -> None:  # once: as the task ends (before a waiting exit resumes), or if cancelled unstarted
            if not released:
                released.append(True)
                with self._lock:
                    self._refs -= 1

        released: list[bool] = []
        task = loop.create_task(watch(), name="loopwatch watch")
        task.add_done_callback(lambda _: release())
        try:
            await started
        except BaseException:
            task.cancel()
            raise
        try:
            with body:
                yield
        except asyncio.CancelledError:
            left.append(True)
            raise
        finally:
            stop.set()
            if not left:
                await asyncio.shield(task)
        if failed:
            raise failed[0]

    @asynccontextmanager
    async def _watching(self) -> AsyncIterator[None]:
        raised: list[BaseException] = []
        try:
            async with _original_errors(raised), anyio.create_task_group() as tg, AsyncExitStack() as services:
                self.task_group = tg
                heartbeat = self._start()
                await tg.start(self._run_sentinel, heartbeat)
                try:
                    for service in list(self.services):
                        await services.enter_async_context(service())
                    self._run_hooks(self.start_hooks, "start")
                    try:
                        yield
                    except BaseException as exc:
                        raised.append(exc)
                        raise
                finally:
                    self._run_hooks(self.stop_hooks, "stop")
                    tg.cancel_scope.cancel()
                    self.task_group = None
        finally:
            self._stop()

    async def _run_sentinel(self, heartbeat: Heartbeat, *, task_status: Any) -> None:
        """The sentinel, in a cancel scope of its own: `stop_watching()` ends it without touching the server."""
        with anyio.CancelScope() as scope:
            self._cancel_sentinel = _canceller(scope)
            pause = self._pause if self._timer is not None else None  # idle only with a stall timer
            await run_sentinel(heartbeat, time.monotonic, self._check, self._handoff, loop_cpu_clock(), pause,
                               task_status=task_status)

    def stop_watching(self) -> None:
        """End the watch now, from any thread (`uninstrument()` on a running server): the sentinel and the
        watchdog stop, nothing more is reported; the server itself runs on."""
        cancel, self._cancel_sentinel = self._cancel_sentinel, None
        if cancel is not None:
            try:
                cancel()
            except RuntimeError:  # the loop has closed: the sentinel went with it
                pass
        self._stop()

    @property
    def watchdog_steps(self) -> int:
        """How many polls the watchdog has completed (0 when not running)."""
        return self._watchdog.steps if self._watchdog is not None else 0

    async def settle(self, beats: int = 3, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until blocks that already ended are reported: a few beats, then two watchdog polls.

        For tests and tools: bounded by `timeout`, and it never blocks the loop.
        """
        heartbeat = self.heartbeat
        if heartbeat is None or self._watchdog is None:
            return
        with anyio.fail_after(timeout):
            target = heartbeat.beat[0] + beats
            while heartbeat.beat[0] < target:  # noqa: ASYNC110 - other threads move these counters
                await anyio.sleep(self.options.interval)
            steps = self.watchdog_steps + 2
            while self.watchdog_steps < steps and (watchdog := self._watchdog) is not None:
                watchdog.poke()  # with a stall timer it would otherwise look only once a second
                await anyio.sleep(self.options.interval)

    @staticmethod
    def _run_hooks(hooks: list[Callable[[], None]], what: str) -> None:
        for hook in list(hooks):
            try:
                hook()
            except Exception:
                logger.exception("%s hook %r raised; the server goes on without it", what, hook)

    def _start(self) -> Heartbeat:
        opts = self.options
        thread_id = threading.get_ident()
        heartbeat = Heartbeat(opts.interval, opts.threshold)
        detector = Detector(
            heartbeat,
            poll_interval=opts.interval,
            demand_clock=thread_demand_clock(threading.get_native_id()) or thread_cpu_clock(thread_id),
            sampler=thread_sampler(thread_id, loop_base()),
            gc_time=GC_CLOCK.within,
            emit=self._on_block,
            blocking=self._on_blocking,
            include_arguments=opts.include_arguments,
            gc_holders=GC_CLOCK.holders,
            tool_home=self._tool_home,
            loop_thread=thread_id,
            offloaded_during=offloaded_during,
            loop_cpu=thread_cpu_clock(thread_id),
        )
        self.heartbeat, self.loop_thread_id = heartbeat, thread_id
        self.backend = _backend_name()
        self.started_at = time.time()
        GC_CLOCK.acquire()
        self._timer = stall_timer(opts.interval + opts.threshold)  # armed now: a block at start-up is caught
        # No courier thread yet: the first pause (the loop idles) or check (it is not hot) starts it.
        self._courier = Courier() if _fdtable.wanted() else None
        self._share_from = None
        self._watchdog = Watchdog(detector, housekeeping=self.pump, watched=_loop_watched(), timer=self._timer,
                                  courier=self._courier)
        self._watchdog.start()
        return heartbeat

    def _handoff(self, now: float) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.handoff(now)
        if _fdtable._held:
            _fdtable.release()  # the frames a thread with a table of its own read: dropped here, on the loop
        courier = self._courier
        if courier is not None and courier.pending:
            courier.ensure()

    def _pause(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.pause()
        courier = self._courier
        if courier is not None:
            courier.ensure()  # an idle loop makes no system calls: the courier's thread costs it nothing

    def _check(self) -> None:
        """On the loop, about once a second."""
        self._check_watchdog()
        self._check_courier()
        if self.loop_checks:
            self._run_hooks(self.loop_checks, "loop check")

    def _check_courier(self) -> None:
        """The courier's thread is up unless the loop ran flat out since the last check (`HOT_SHARE` of a core),
        where a second thread of the descriptor table would cost each of its system calls."""
        courier = self._courier
        if courier is None:
            return
        now, cpu = self.share_clocks[0](), self.share_clocks[1]()
        since, self._share_from = self._share_from, (now, cpu)
        if since is None or now <= since[0]:
            return
        if (cpu - since[1]) / (now - since[0]) >= HOT_SHARE:
            courier.retire()
        else:
            courier.ensure()

    def _check_watchdog(self) -> None:
        """A watchdog thread that died is reported and replaced."""
        watchdog = self._watchdog
        if watchdog is None or watchdog.is_alive() or watchdog.stopping:
            return
        logger.error("watchdog thread died; starting a new one (blocks during the gap were missed)")
        watchdog.stop(0.0)  # its descriptors in the process's table, if it had a table of its own
        if self._courier is not None:  # the old one's courier was told to finish: a new one for the new one
            self._courier.close(timeout=0.0)
            self._courier = Courier()
        self._watchdog = Watchdog(
            watchdog.detector, housekeeping=self.pump, watched=watchdog.watched, timer=watchdog.timer,
            courier=self._courier,
        )
        self._watchdog.start()

    def _stop(self) -> None:
        with self._lock:  # the loop's exit and `stop_watching()` from another thread: one of them stops it
            watchdog, self._watchdog = self._watchdog, None
            timer, self._timer = self._timer, None
        if watchdog is not None:
            watchdog.stop()
            _fdtable.release()
            courier, self._courier = self._courier, None
            if courier is not None:
                courier.close()  # what the watchdog handed it runs, here if its thread is gone
            GC_CLOCK.release()
            close = getattr(watchdog.detector.demand_clock, "close", None)
            if close is not None:
                close()
        # The sentinel has ended: nothing arms the timer any more. A watchdog thread still alive after `stop`
        # (stuck in a step) may still poll it: then the descriptor is left open rather than closed under it.
        if timer is not None and (watchdog is None or not watchdog.is_alive()):
            timer.close()
        self.pump()
        if self._log is not None:
            self._log.flush(float("inf"))

    # -- events ----------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self.listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self.listeners.remove(listener)

    def post(self, event: Event) -> None:
        """Queue an event from any thread; it is dispatched on the watchdog thread, never on the loop."""
        self._outbox.put(event)
        watchdog = self._watchdog
        if watchdog is None:
            self.pump()
        else:
            watchdog.poke()  # out now, not at the next housekeeping

    def _tool_home(self, call: CallRecord) -> str | None:
        """The server's own code for blame: where the blamed tool's function is defined (None: unknown)."""
        name = call.label or call.tool  # a record read from the SDK's own frame has no label
        file = self.tool_file(name) if name else None
        return home_of(file) if file else None

    def _on_block(self, event: BlockEvent, call: CallRecord | None = None) -> None:
        # A collection during a call is the heap's cost: told (events, metrics by kind), not counted as the
        # call's; but one an offloaded call's thread ran is that call's, as is the GIL it held.
        blamed = event.kind != "gc" or event.offloaded
        if call is not None and blamed:
            call.blocked_s += event.duration_s
        row = self.stats.tool(self._row_label(call)) if event.method == "tools/call" and blamed else None
        if row is not None:
            row.blocks += 1
            row.blocked_s += event.duration_s
        self._run_call_hooks(self.block_hooks, event, call)
        self._dispatch(event)

    def _row_label(self, call: CallRecord | None) -> str:
        """The stats row a blocked tools/call counts in. A record read from the SDK's own frame (`watch()`, no
        middleware) has no label: its name if the server's tools are known to have it, else `_OTHER`; never a
        row named "" (as there was). The registry is not asked here: this is the watchdog's thread."""
        if call is None:
            return OTHER
        if call.label:
            return call.label
        return call.tool if call.tool in self.tools.known else OTHER

    def _on_blocking(self, call: CallRecord, elapsed: float, importing: bool, stack: tuple[Any, ...]) -> None:
        self._run_call_hooks(self.blocking_hooks, call, elapsed, importing, stack)

    def _handing(self) -> Callable[[Callable[[], None]], None] | None:
        """On a watchdog with a table of its own: the courier's `submit` (what may touch a descriptor goes
        through it); anywhere else None (it runs here)."""
        courier = self._courier
        if courier is not None and courier.barred == threading.get_ident():
            return courier.submit
        return None

    def _run_call_hooks(self, hooks: list[Callable[..., None]], *args: Any) -> None:
        deliver = self._handing()
        for hook in list(hooks):
            if deliver is None or is_any_thread(hook):
                self._call_hook(hooks, hook, args)
            else:
                deliver(lambda hook=hook: self._call_hook(hooks, hook, args))

    @staticmethod
    def _call_hook(hooks: list[Callable[..., None]], hook: Callable[..., None], args: tuple[Any, ...]) -> None:
        if hook not in hooks:
            return  # removed since it was handed to the courier (it raised on an earlier event)
        try:
            hook(*args)
        except Exception as exc:
            say(logging.ERROR, "hook %r raised; it is removed", hook, exc_info=exc)
            if hook in hooks:
                hooks.remove(hook)

    def _dispatch(self, event: Event) -> None:
        self.recent.append(event)
        self.listeners.emit(event, self._handing())

    def pump(self) -> None:
        """Housekeeping on the watchdog thread: queued events out, the sentinel's lags in."""
        while True:
            try:
                event = self._outbox.get_nowait()
            except queue.Empty:
                break
            self._dispatch(event)
        if self._log is not None:
            deliver = self._handing()
            if deliver is None:
                self._log.flush()
            elif self._log.waiting:
                deliver(self._log.flush)
        courier = self._courier
        if courier is not None:
            courier.nudge()  # jobs wait for a courier thread: ask the main thread again (a no-op otherwise)
        heartbeat = self.heartbeat
        if heartbeat is None:
            return
        lags = heartbeat.lags
        while lags:
            lag = lags.popleft()
            self.lag.add(lag)
            if self.lag_observers:
                self._run_call_hooks(self.lag_observers, lag)

    # -- reading ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain data: per tool and per method statistics, the loop's lag, recent events."""
        tools = {name: {**row.to_dict(), "executes": self.where(name)} for name, row in list(self.stats.tools.items())}
        return {
            "active": self.active,
            "backend": self.backend,
            "threshold_s": self.options.threshold,
            "tools": tools,
            "methods": {name: row.to_dict() for name, row in list(self.stats.methods.items())},
            "lag": self.lag.to_dict(),
            "recent_events": [e.to_dict() for e in list(self.recent)],
            "other_label": OTHER,
        }


@asynccontextmanager
async def _original_errors(raised: list[BaseException]) -> AsyncIterator[None]:
    """What the watched code raised comes out as it was raised, not wrapped in our task groups' ExceptionGroups."""
    try:
        yield
    except BaseExceptionGroup as group:
        target = raised[0] if raised else None
        inner: BaseException = group
        while inner is not target and isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if target is None or inner is not target:
            raise
        raise target from target.__cause__


def _canceller(scope: anyio.CancelScope) -> Callable[[], None]:
    """Cancel `scope` from any thread: directly on the loop's own thread, else through the loop."""
    thread = threading.get_ident()
    try:
        loop = asyncio.get_running_loop()
        later: Callable[[], None] = lambda: loop.call_soon_threadsafe(scope.cancel)  # noqa: E731
    except RuntimeError:  # trio
        import trio

        token = trio.lowlevel.current_trio_token()
        later = lambda: token.run_sync_soon(scope.cancel)  # noqa: E731
    return lambda: scope.cancel() if threading.get_ident() == thread else later()


def _loop_watched() -> Callable[[], bool]:
    """On the loop thread: whether this loop still exists, for a watchdog whose watch nobody ended.

    A loop stopped and closed with the watch still on (`run_until_complete` interrupted, then `close()`)
    never runs the monitor's exit; its watchdog would poll a stale beat forever.
    """
    thread = threading.current_thread()
    try:
        loop: Any = asyncio.get_running_loop()
    except RuntimeError:  # trio: its run always ends the watch on the way out
        return thread.is_alive
    try:
        ref: Callable[[], Any] = weakref.ref(loop)
    except TypeError:  # a loop type without weak references
        ref = lambda: loop  # noqa: E731
    return lambda: thread.is_alive() and (current := ref()) is not None and not current.is_closed()


def _backend_name() -> str | None:
    return current_backend()
