"""Auto-offload: tools caught blocking the loop run their later calls on loops of their own, in worker threads.

The SDKs move plain `def` tools to threads, statically. What still blocks is `async def` tools that call
blocking code, fastmcp tools with `run_in_thread=False`, and low-level `Server` handlers. Once such a tool
blocks the loop (`strikes` times within `strike_window`), its calls run on one of a small pool of event loops
in worker threads, behind loopwatch's own capacity limit. Everything the tool does with its MCP context
(progress, logging, elicitation, sampling) is carried back to the server's loop through a portal and awaited
there. Before a tool moves, `_offload_check` looks for loop-bound and thread-affine objects in its reach; such
a tool stays on the loop. A moved call that fails on an object of the server's loop the check could not see
gets its error (it is never run again) and pins the tool. No call waits forever on a loop that is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc

from ._blame import call_key, current_call, serve_offloaded
from ._courier import PRIVATE, say
from ._events import BlockEvent, OffloadEvent, any_thread
from ._offload_check import obstacle, server_loop_object
from ._sentinel import current_backend

logger = logging.getLogger("loopwatch")

# -- loops reached from other threads -------------------------------------------------------------------

_NOT_CARRIED = {"current_async_library_cvar"}
"""Context variables that describe the caller's event loop, not the call: not carried to a worker."""


class LoopGone(RuntimeError):
    """The loop a call (or a moved call's context request) was sent to stopped before it finished it."""


class Job:
    """A task spawned on another loop: its outcome, and a way to cancel it from any thread.

    Its body runs at most once: the loop that starts it and a loop that shuts down race for
    `set_running_or_notify_cancel`, and only the winner goes on."""

    def __init__(self, loop: LoopRef) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._loop = loop
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._loop.schedule(self._cancel_here)

    def _cancel_here(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def abandon(self, why: str, started_too: bool = False) -> None:
        """The loop is gone: the caller gets an error naming why, never a wait forever."""
        try:
            if not self.future.set_running_or_notify_cancel():
                return  # cancelled by its caller
        except RuntimeError:  # running or done: only a loop that died leaves a running one behind
            if not started_too:
                return
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_exception(LoopGone(f"loopwatch: {why}"))

    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...], carried: list[Any]) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        with anyio.CancelScope() as self._scope:
            if self._cancelled:
                self._scope.cancel()
            try:
                for var, value in carried:
                    var.set(value)
                result = await _call(fn, args, {})
            except BaseException as exc:
                if not isinstance(exc, anyio.get_cancelled_exc_class()):
                    self.future.set_exception(exc)
                    return  # the call's outcome, raised by its caller; this loop lives on
                # Never hand a loop's cancellation to another loop: there it would look like its own.
                self.future.set_exception(LoopGone("loopwatch: the loop running this call stopped before it ended"))
                raise  # the caller cancelled (our scope catches it) or this loop shuts down
            self.future.set_result(result)


class LoopRef:
    """A running loop other threads can start tasks on without waiting: asyncio or trio.

    Other threads hand it items through the loop's own thread-safe entry (`call_soon_threadsafe`,
    `run_sync_soon`) into a native queue; a task of the loop (`serve`) takes them out and starts them in
    the task group. Nothing of anyio runs in a bare loop callback: since anyio 4.14 that needs the backend
    detection only `anyio.run` sets up, and under `asyncio.run`, uvicorn or pytest-asyncio it raised
    NoEventLoopError and the call hung."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group
        self.thread_id = threading.get_ident()
        self._inbox = _inbox()
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self.open = True
        """Takes new jobs (until `close`)."""
        self.serving = True
        """Runs callbacks (until `serve` ends)."""

    def schedule(self, callback: Callable[[], None]) -> bool:
        """Run `callback` on this loop soon, in its `serve` task; False when the loop is gone."""
        return self.serving and self._inbox.put(callback)

    def wake(self, callback: Callable[[], None]) -> bool:
        """Run a loop-native `callback` (an event's `set`) soon, even after `serve` ended: a call still awaiting
        a result when the watch stops must still be woken."""
        return self._inbox.call(callback)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Job:
        """Start `fn(*args)` as a task on this loop, from any thread, with the caller's context variables."""
        job = Job(self)
        carried = [(var, value) for var, value in contextvars.copy_context().items() if var.name not in _NOT_CARRIED]
        with self._lock:
            sent = self.open and self._inbox.put(functools.partial(self._start, job, fn, args, carried))
            if sent:
                self._jobs.add(job)
        if sent:
            job.future.add_done_callback(functools.partial(self._forget, job))
        else:
            job.abandon("the loop this was sent to is no longer running")
        return job

    def _forget(self, job: Job, _: Any) -> None:
        with self._lock:
            self._jobs.discard(job)

    def _start(self, job: Job, fn: Callable[..., Any], args: tuple[Any, ...], carried: list[Any]) -> None:
        self.task_group.start_soon(job.run, fn, args, carried)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._jobs)

    async def serve(self) -> None:
        """The loop's side: run what other threads sent, until cancelled."""
        try:
            while True:
                callback = await self._inbox.get()
                try:
                    callback()
                except Exception:  # one bad item must not close the loop's entry for every later call
                    logger.exception("a cross-loop callback raised")
        finally:
            self.serving = False
            self.close("the loop this was sent to stopped")

    def close(self, why: str, started_too: bool = False) -> None:
        """Take no more jobs; those sent and not started (or, `started_too`, not finished) fail with `why`."""
        with self._lock:
            self.open = False
            jobs = list(self._jobs)  # each leaves the set when its future is done
        for job in jobs:
            job.abandon(why, started_too)


class _AsyncioInbox:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> bool:
        return self.call(functools.partial(self._queue.put_nowait, item))

    def call(self, callback: Callable[[], None]) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed
            return False
        return True

    async def get(self) -> Any:
        return await self._queue.get()


class _TrioInbox:
    def __init__(self) -> None:
        import trio

        self._token = trio.lowlevel.current_trio_token()
        self._send, self._receive = trio.open_memory_channel[Any](float("inf"))

    def put(self, item: Any) -> bool:
        return self.call(functools.partial(self._send.send_nowait, item))

    def call(self, callback: Callable[[], None]) -> bool:
        try:
            self._token.run_sync_soon(callback)
        except Exception:  # trio.RunFinishedError: the run is over
            return False
        return True

    async def get(self) -> Any:
        return await self._receive.receive()


def _inbox() -> _AsyncioInbox | _TrioInbox:
    return _TrioInbox() if current_backend() == "trio" else _AsyncioInbox()


_HOMES: dict[int, LoopRef] = {}
"""Loop thread id -> its LoopRef: the server's loop and each worker's."""


class _Worker:
    """One event loop of the server's backend, running in a daemon thread."""

    def __init__(self, index: int, backend: str, backend_options: dict[str, Any]) -> None:
        self.busy = 0
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self.ref: LoopRef | None = None
        self.thread = threading.Thread(
            target=self._run, args=(backend, backend_options), name=f"loopwatch-offload-{index}", daemon=True
        )
        self.thread.start()
        self._ready.wait(10)
        if self.ref is None:
            raise RuntimeError("loopwatch: an offload worker loop did not start")

    @property
    def alive(self) -> bool:
        return self.ref is not None and self.ref.open and self.thread.is_alive()

    def _run(self, backend: str, backend_options: dict[str, Any]) -> None:
        try:
            anyio.run(self._main, backend=backend, backend_options=backend_options)
        except BaseException:
            logger.exception("an offload worker loop died; the next call starts a new one")
        finally:
            self._ready.set()
            if self.ref is not None:
                _HOMES.pop(self.ref.thread_id, None)
                self.ref.close("the offload worker loop running this call died", started_too=True)

    async def _main(self) -> None:
        self._stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            self.ref = LoopRef(tg)
            tg.start_soon(self.ref.serve)
            _HOMES[self.ref.thread_id] = self.ref
            self._ready.set()
            await self._stop.wait()
            # Graceful: calls still running end as their callers decide (a caller that goes away cancels its
            # call); cancelling them here would reach their callers before the server's own shutdown does.
            self.ref.close("the offload worker loop was shut down")
            while self.ref.busy:  # noqa: ASYNC110 -- once, at shutdown; no event to keep per job for it
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    def close(self, timeout: float) -> None:
        ref, stop = self.ref, self._stop
        if ref is not None and stop is not None:
            ref.schedule(stop.set)
        if timeout > 0:
            self.thread.join(timeout)  # a call stuck in a blocking call keeps its thread until it returns


class LoopPool:
    """A few worker loops; each call goes to the least busy one. A worker loop that died is replaced."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.backend: tuple[str, dict[str, Any]] = ("asyncio", {})
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        worker = self._pick()
        assert worker.ref is not None
        job = worker.ref.spawn(fn, *args)
        job.future.add_done_callback(lambda _: self._done(worker))
        return job

    def _pick(self) -> _Worker:
        with self._lock:
            for dead in [w for w in self._workers if not w.alive]:
                self._workers.remove(dead)
            if len(self._workers) < self.size and all(w.busy for w in self._workers):
                self._workers.append(_Worker(self._started, *self.backend))
                self._started += 1
            worker = min(self._workers, key=lambda w: w.busy)
            worker.busy += 1
            return worker

    def _done(self, worker: _Worker) -> None:
        with self._lock:
            worker.busy -= 1

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(w.busy for w in self._workers)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close(timeout)


async def await_future(future: concurrent.futures.Future[Any]) -> Any:
    """Await a future completed on another thread, from any loop loopwatch knows, without a thread per wait."""
    if not future.done():
        home_thread = threading.get_ident()
        home = _HOMES.get(home_thread)
        if home is None:
            return await anyio.to_thread.run_sync(future.result)
        done = anyio.Event()

        def wake(_: Any) -> None:
            if threading.get_ident() == home_thread:
                done.set()
            else:
                home.wake(done.set)

        future.add_done_callback(wake)
        await done.wait()
    return future.result()


# -- the context bridge -------------------------------------------------------------------------------


class LoopBridge:
    """Stands in for an MCP context on a worker loop: whatever its methods return to await runs on the
    server's loop, where the session and its streams live.

    Every method counts, not only those `inspect.iscoroutinefunction` recognises: the SDK's logging methods
    are `async def`s under `@deprecated`, a plain `def` wrapper that returns the coroutine. Passed through,
    their coroutine ran on the worker loop and wrote to the session's memory stream from the wrong thread:
    the stdio writer's wake-up and the sender's went to loops that were never woken, and the call's
    response never came (two log messages in a row were enough). `isinstance` checks see the context's class.
    """

    __slots__ = ("_lw_target", "_lw_portal")

    def __init__(self, target: Any, portal: LoopRef) -> None:
        object.__setattr__(self, "_lw_target", target)
        object.__setattr__(self, "_lw_portal", portal)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(ctx, Context) holds, as it did on the loop
        return type(self._lw_target)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._lw_target, name)
        if callable(value) and not isinstance(value, type):
            return _bridged(value, self._lw_portal)
        if _bridgeable(value):
            return LoopBridge(value, self._lw_portal)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._lw_target, name, value)

    def __repr__(self) -> str:
        return repr(self._lw_target)


def _bridged(method: Callable[..., Any], server: LoopRef) -> Any:
    """`method`, called on the worker; what it returns to await is awaited on the server's loop."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await _on_server(method(*args, **kwargs), server)

        return call

    deprecation = _deprecation(method)
    if deprecation is not None:  # the SDK's `@deprecated` wrapper: its warning, said at the tool's line
        original, (message, category, stacklevel) = deprecation

        @functools.wraps(method)
        def call_deprecated(*args: Any, **kwargs: Any) -> Any:
            warnings.warn(message, category=category, stacklevel=stacklevel + 1)
            return _on_server(original(*args, **kwargs), server)

        return call_deprecated

    @functools.wraps(method)
    def call_sync(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return _on_server(result, server) if inspect.isawaitable(result) else result

    return call_sync


def _deprecation(method: Any) -> tuple[Callable[..., Any], tuple[Any, Any, int]] | None:
    """For a method under `@deprecated` (typing_extensions, warnings): the coroutine method it wraps, bound, and
    what its warning says. Called from a wrapper of ours, the SDK's wrapper warned at our line, not the tool's."""
    function = getattr(method, "__func__", None)
    code = getattr(function, "__code__", None)
    if code is None or getattr(function, "__deprecated__", None) is None:
        return None
    names, cells = code.co_freevars, function.__closure__ or ()
    try:
        bound = {name: cell.cell_contents for name, cell in zip(names, cells, strict=True)}
    except ValueError:  # an empty cell
        return None
    original, message, stacklevel = bound.get("arg"), bound.get("msg"), bound.get("stacklevel")
    category = bound.get("category")
    if not (
        inspect.iscoroutinefunction(original)
        and isinstance(message, str)
        and isinstance(stacklevel, int)
        and isinstance(category, type)
        and issubclass(category, Warning)
    ):
        return None  # not the wrapper we know: called as it is
    return original.__get__(method.__self__), (message, category, stacklevel)


async def _on_server(awaitable: Any, server: LoopRef) -> Any:
    job = server.spawn(_await, awaitable)
    try:
        return await await_future(job.future)
    except LoopGone:
        if inspect.iscoroutine(awaitable):
            awaitable.close()  # never started: no "never awaited" warning on top of the error
        raise
    except BaseException:
        job.cancel()
        raise


async def _await(awaitable: Any) -> Any:
    return await awaitable


_BRIDGEABLE: dict[type, bool] = {}


def _bridgeable(value: Any) -> bool:
    """Objects of the MCP frameworks that reach the session: contexts, sessions, request contexts."""
    kind = type(value)
    known = _BRIDGEABLE.get(kind)
    if known is None:
        module = kind.__module__ or ""
        ours = module.startswith(("mcp.", "fastmcp.")) and not isinstance(value, type)
        known = ours and (dataclasses.is_dataclass(value) or any(
            inspect.iscoroutinefunction(getattr(kind, n, None)) for n in dir(kind) if not n.startswith("__")
        ))
        _BRIDGEABLE[kind] = known
    return known


def _is_context(value: Any) -> bool:
    return type(value).__name__ in ("Context", "ServerRequestContext", "RequestContext") and _bridgeable(value)


def _running_asyncio_loop() -> Any:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio
        return None


# -- policy ---------------------------------------------------------------------------------------------


class Offloader:
    """Decides which tools leave the loop, and runs their calls elsewhere."""

    def __init__(self, handle: Any) -> None:
        options = handle.options
        self.handle = handle
        self.monitor = handle.monitor
        self.options = options
        self.policies: dict[str, str] = dict(options.tool_policies)
        self.offloaded: dict[str, str] = {}
        self.pinned: dict[str, str] = {}
        self._strikes: dict[str, deque[float]] = {}
        self._blocks: dict[str, int] = {}
        self._counted: deque[Any] = deque(maxlen=256)
        """The calls whose block was counted (weak references to their contexts): a block announced while it
        went on is told again when it ends, and must count once. Not by `id()`: a later call's context can
        take the address of an earlier one that was freed (it did in CI: the second strike was dropped)."""
        self._lock = threading.Lock()
        self.pool = LoopPool(options.offload_workers)
        self.limiter: anyio.CapacityLimiter | None = None
        self.portal: LoopRef | None = None
        self._swapped: dict[str, Callable[[], None]] = {}
        """Tool -> the undo of its swap."""
        self.adapter = handle.adapter
        self.executes: dict[str, str] = {}
        """Offloaded tools that run in worker processes ("process"); the others run on worker threads."""
        from ._procpool import ProcessOffload

        self.processes = ProcessOffload(self)
        self._obstacles: dict[str, str | None] = {}
        self._serving: anyio.CancelScope | None = None

    # lifecycle
    def install(self) -> Offloader:
        if self.options.offload == "auto":  # off: no automatic moves; explicit choices (always, lw-offload) apply
            self.monitor.block_hooks.append(self.on_block)
            self.monitor.blocking_hooks.append(self.on_blocking)
        self.monitor.services.append(self._service)
        self.monitor.where = self._where(self.monitor.where)
        self.handle.middleware.offloaded = self.offloaded
        self.handle.middleware.executes = self.executes
        self.processes.install()
        self._load_state()
        for tool, policy in self.policies.items():
            if policy == "always":
                self._offload(tool, "policy always", blocks=0, insist=True)
            elif policy == "process":
                self.processes.apply(tool, "policy process", blocks=0)
        return self

    def close(self) -> None:
        for tool in list(self._swapped):
            self._restore_fn(tool)
        self.adapter.restore_tools()
        if self.on_block in self.monitor.block_hooks:
            self.monitor.block_hooks.remove(self.on_block)
        if self.on_blocking in self.monitor.blocking_hooks:
            self.monitor.blocking_hooks.remove(self.on_blocking)
        self.pool.close()
        self.processes.close()

    @contextlib.asynccontextmanager
    async def _service(self) -> AsyncIterator[None]:
        self.limiter = anyio.CapacityLimiter(self.options.offload_max_calls)
        self.pool.backend = _current_backend()
        task_group = self.monitor.task_group
        assert task_group is not None, "services run while the monitor watches"
        self.portal = portal = LoopRef(task_group)
        _HOMES[portal.thread_id] = portal
        self._serving = anyio.CancelScope()
        task_group.start_soon(self._serve, portal, self._serving)
        try:
            yield
        finally:
            _HOMES.pop(portal.thread_id, None)
            self.portal = None
            portal.close("the server's loop stopped watching")  # context requests of moved calls fail, not wait
            self._serving.cancel()
            # The worker loops belong to this run of the server: tell them to end, never waiting for a
            # stuck one here on the loop (it ends when its blocking call returns).
            self.pool.close(timeout=0)
            self.processes.pool.close(timeout=0)

    @staticmethod
    async def _serve(portal: LoopRef, scope: anyio.CancelScope) -> None:
        with scope:
            await portal.serve()

    def _where(self, base: Callable[[str], str]) -> Callable[[str], str]:
        return lambda tool: self.executes.get(tool, "thread") if tool in self.offloaded else base(tool)

    # decisions (watchdog thread, or the console)
    @any_thread  # the decision is taken at once, on the watchdog, so the very next call moves; its log lines
    # go through `_courier.say`, and its state file is written and closed here (no descriptor kept)
    def on_blocking(self, call: Any, elapsed: float, importing: bool, stack: tuple[Any, ...]) -> None:
        """While a block goes on: the strike counts now, so the very next call can already move."""
        if not importing:  # an import blocks once: the module is cached after that
            where = [(file, function) for file, _, function in stack]
            self._strike(call, time.time(), f"blocking the loop ({elapsed * 1000:.0f} ms so far)", where)

    @any_thread
    def on_block(self, event: BlockEvent, call: Any) -> None:
        if event.kind in ("import", "gc"):  # an import blocks once; a collection stops every thread alike
            return
        reason = f"blocked the loop {event.duration_s * 1000:.0f} ms [{event.kind}]"
        if event.kind == "cpu":
            reason += "; a thread helps only while the GIL is released"
        self._strike(call, event.time, reason, [(f.file, f.function) for f in event.frames])

    def _strike(self, call: Any, when: float, reason: str, where: list[tuple[str, str]]) -> None:
        if call is None or call.method != "tools/call" or not call.label or call.label != call.tool:
            return
        tool = call.label
        if where and not self._in_tool_code(tool, where):
            return  # the time went elsewhere (say, the framework logging the tool's error): moving can't help
        with self._lock:
            if not self._first_count(call):
                return  # the block that was announced while it went on, now finished
            self._blocks[tool] = self._blocks.get(tool, 0) + 1
            if tool in self.offloaded or tool in self.pinned or self.policies.get(tool) == "never":
                return
            strikes = self._strikes.setdefault(tool, deque(maxlen=self.options.strikes))
            strikes.append(when)
            if len(strikes) < self.options.strikes or strikes[0] < when - self.options.strike_window:
                return
        self._offload(tool, reason, self._blocks[tool])

    def _first_count(self, call: Any) -> bool:
        """True the first time a block of this call is counted (under the lock)."""
        target = call.ctx if call.ctx is not None else call
        try:
            entry: Any = weakref.ref(target)
        except TypeError:  # a context without weak references: its address and request id, as good as it gets
            entry = (call_key(call), call.request_id)
        for seen in self._counted:  # never `==` between weak references: that compares the contexts themselves
            if seen() is target if isinstance(seen, weakref.ref) else seen == entry:
                return False
        self._counted.append(entry)
        return True

    def set_policy(self, tool: str, policy: str, reason: str = "manual") -> None:
        with self._lock:
            self.policies[tool] = policy
        if policy == "process":
            self.processes.apply(tool, f"{reason}: policy process", self._blocks.get(tool, 0))
            return
        if self.executes.pop(tool, None) and tool in self.offloaded:
            self._restore(tool, f"{reason}: policy {policy}, not process")
        if policy == "always":
            self.pinned.pop(tool, None)
            self._offload(tool, f"{reason}: policy always", self._blocks.get(tool, 0), insist=True)
        elif policy == "never" or policy == "auto":
            if tool in self.offloaded:
                self._restore(tool, f"{reason}: policy {policy}")

    def _offload(self, tool: str, reason: str, blocks: int, insist: bool = False) -> None:
        if tool in self.offloaded:
            return
        courier = PRIVATE.get(threading.get_ident())
        if courier is not None and tool not in self._obstacles:
            # A watchdog with a descriptor table of its own (`_fdtable`) never looks at a tool's objects: a
            # reference it held last would run a finalizer of the server's in the wrong table.
            courier.submit(lambda: self._offload(tool, reason, blocks, insist))
            return
        if not self._can_move(tool):
            say(logging.INFO, "tool %s stays on the loop: %s", tool, "not a tool loopwatch can move")
            return
        why_not = self._obstacle(tool)
        if why_not is not None and not insist:
            self._keep(tool, why_not, blocks)
            return
        if why_not is not None:
            say(logging.WARNING, "tool %s moves off the loop as its policy insists, though %s", tool, why_not)
        self.offloaded[tool] = reason
        self._swap_fn(tool)
        self.monitor.post(OffloadEvent(time=time.time(), tool=tool, action="offloaded", reason=reason, blocks=blocks,
                                       executes="thread"))
        self._save_state()

    def _restore(self, tool: str, reason: str, action: str = "restored") -> None:
        self.offloaded.pop(tool, None)
        self.executes.pop(tool, None)
        self._restore_fn(tool)
        blocks = self._blocks.get(tool, 0)
        self.monitor.post(OffloadEvent(time=time.time(), tool=tool, action=action, reason=reason, blocks=blocks,  # type: ignore[arg-type]
                                       executes="loop"))
        self._save_state()

    def _obstacle(self, tool: str) -> str | None:
        """What a move of `tool` would break (`_offload_check`), looked at once per tool."""
        if tool not in self._obstacles:
            self._obstacles[tool] = obstacle(self._tool_callable(tool))
        return self._obstacles[tool]

    def _keep(self, tool: str, why_not: str, blocks: int) -> None:
        """A tool the check keeps on the loop: said once, in the events and the log, with what to do instead."""
        reason = (f"not moved: {why_not}, which would break on another loop; run its blocking part in "
                  f"anyio.to_thread.run_sync(...), or --offload-policy {tool}=always to move it anyway")
        with self._lock:
            if tool in self.pinned:
                return
            self.pinned[tool] = reason
        say(logging.WARNING, "tool %s blocks the loop but stays on it: %s", tool, reason)
        self.monitor.post(OffloadEvent(time=time.time(), tool=tool, action="pinned", reason=reason, blocks=blocks))
        self._save_state()

    def _pin(self, tool: str, reason: str) -> None:
        with self._lock:
            self.policies[tool] = "never"
            self.pinned[tool] = reason
        self._restore(tool, reason, action="pinned")

    # running a call elsewhere (server loop)
    async def run(self, tool: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        portal, limiter = self.portal, self.limiter
        if portal is None or limiter is None:
            return await _call(fn, args, kwargs)  # not watching (no loop running): run as without loopwatch
        if self.executes.get(tool) == "process":
            from ._procpool import OnThreads

            with contextlib.suppress(OnThreads):  # raised only before anything ran in a process
                return await self.processes.run(tool, fn, args, kwargs)
        args = tuple(LoopBridge(a, portal) if _is_context(a) else a for a in args)
        kwargs = {k: LoopBridge(v, portal) if _is_context(v) else v for k, v in kwargs.items()}
        token = object()
        await limiter.acquire_on_behalf_of(token)
        try:
            # Served through a frame blame reads, so the watchdog knows which call each worker thread runs.
            job = self.pool.submit(serve_offloaded, current_call(), functools.partial(fn, *args, **kwargs))
        except BaseException:
            limiter.release_on_behalf_of(token)
            raise
        # The slot stays taken until the worker is really done, even when this call is cancelled first.
        job.future.add_done_callback(lambda _: _release_soon(portal, limiter, token))
        try:
            return await await_future(job.future)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                job.cancel()
            elif isinstance(exc, LoopGone):
                logger.error("a moved call of %s could not finish: %s", tool, exc)
                return self._error_answer(exc)
            else:
                self._pin_if_bound(tool, exc)
            raise  # the call's own outcome, as it happened: never run again (its side effects would repeat)

    def _error_answer(self, exc: LoopGone) -> Any:
        """loopwatch's own failure as the tool's error answer, its cause in the text (an unexpected exception's
        text the frameworks hide: "Error executing tool X" would not say what happened)."""
        if self.adapter.kind == "lowlevel":
            import mcp_types

            text = mcp_types.TextContent(type="text", text=str(exc))
            return mcp_types.CallToolResult(content=[text], isError=True)
        if self.adapter.kind == "fastmcp":
            from fastmcp.exceptions import ToolError
        else:
            from mcp.server.mcpserver.exceptions import ToolError
        raise ToolError(str(exc)) from exc

    def _pin_if_bound(self, tool: str, exc: BaseException) -> None:
        """A moved call failed on an object of the server's loop the check could not see: pin the tool."""
        bound = server_loop_object(exc, _running_asyncio_loop())
        if bound is None or tool in self.pinned:
            return
        reason = (f"a moved call failed with {type(exc).__name__} on a {type(bound).__qualname__} bound to the "
                  "server's loop; that call got its error, later calls run on the loop")
        say(logging.WARNING, "tool %s is pinned to the loop: %s", tool, reason)
        self._pin(tool, reason)

    def _in_tool_code(self, tool: str, where: list[tuple[str, str]]) -> bool:
        """Whether a sampled stack runs through the code that offload would move: the tool's function."""
        code = _code_of(self._tool_callable(tool))
        if code is None:
            return True  # can't tell: let the block count
        return (code.co_filename, code.co_name) in where

    def _tool_callable(self, tool: str) -> Any:
        return self.adapter.tool_fn(tool)

    # server kinds: the adapter knows its family's tools (`loopwatch.servers`)
    def _can_move(self, tool: str) -> bool:
        return tool in self._swapped or self.adapter.can_move(tool)

    def _swap_fn(self, name: str) -> None:
        if name in self._swapped:
            return
        offloader = self

        def divert(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            async def offloaded(*args: Any, **kwargs: Any) -> Any:
                if name not in offloader.offloaded:
                    return await _call(original, args, kwargs)
                return await offloader.run(name, original, args, kwargs)

            return offloaded

        undo = self.adapter.swap_tool(name, divert)
        if undo is not None:
            self._swapped[name] = undo

    def _restore_fn(self, name: str) -> None:
        undo = self._swapped.pop(name, None)
        if undo is not None:
            undo()

    # state file
    def _load_state(self) -> None:
        path = self.options.offload_state
        if not path:
            return
        from ._options import check_state_folder

        check_state_folder(path)  # refused at start, as --events is: a state never saved is a silent loss
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as file:
                state = json.load(file)
            tools = _state_tools(state)
        except (OSError, ValueError) as exc:
            logger.error("cannot read offload state %s: %s (starting fresh)", path, _one_line(exc))
            return
        if self.options.offload != "auto":
            return  # what earlier runs moved by themselves are automatic moves: off makes none
        executes = state.get("executes") if isinstance(state.get("executes"), dict) else {}
        for tool, reason in tools.items():
            if self.policies.get(tool) == "never":
                continue
            if executes.get(tool) == "process":
                self.processes.apply(tool, f"{LEARNED}{reason}", blocks=0)
            else:
                self._offload(tool, f"{LEARNED}{reason}", blocks=0)

    def _save_state(self) -> None:
        path = self.options.offload_state
        if not path:
            return
        data = json.dumps({"offloaded": dict(self.offloaded), "pinned": dict(self.pinned),
                           "executes": dict(self.executes)}, indent=1)
        tmp = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), prefix=".loopwatch-state-",
                                             delete=False, encoding="utf-8") as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError as exc:
            if tmp is not None:  # a full disk or a directory where the file should be: no temp file left behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp.name)
            say(logging.ERROR, "cannot write offload state %s: %s", path, exc)

    def snapshot(self) -> dict[str, Any]:
        return {
            "offloaded": dict(self.offloaded),
            "pinned": dict(self.pinned),
            "policies": dict(self.policies),
            "workers_in_use": self.pool.in_use,
            "workers": self.pool.size,
            "executes": dict(self.executes),
            **self.processes.snapshot(),
        }


def _code_of(fn: Any) -> Any:
    try:
        return getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
    except ValueError:
        return None


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _release_soon(server: LoopRef, limiter: anyio.CapacityLimiter, token: object) -> None:
    """From a worker's done callback: give the slot back on the server's loop (nothing to do if it is gone)."""
    server.schedule(lambda: limiter.release_on_behalf_of(token))


def _current_backend() -> tuple[str, dict[str, Any]]:
    backend = current_backend() or "asyncio"
    if backend == "asyncio":
        loop = asyncio.get_running_loop()
        return backend, ({"use_uvloop": True} if type(loop).__module__.startswith("uvloop") else {})
    return backend, {}


def install(handle: Any) -> Offloader:
    return Offloader(handle).install()


LEARNED = "learned earlier: "


def _state_tools(state: Any) -> dict[str, str]:
    """The offloaded tools a state file lists: `{"offloaded": {tool: reason}}`; anything else is refused."""
    tools = state.get("offloaded", {}) if isinstance(state, dict) else None
    if not isinstance(tools, dict) or not all(isinstance(tool, str) for tool in tools):
        raise ValueError('expected {"offloaded": {"tool": "reason", ...}}')
    return {tool: _first_reason(reason) for tool, reason in tools.items()}


def _first_reason(reason: Any) -> str:
    """The reason a tool was first moved: without the prefixes older versions added on every restart."""
    text = reason if isinstance(reason, str) else ""
    while text.startswith(LEARNED):
        text = text[len(LEARNED):]
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
