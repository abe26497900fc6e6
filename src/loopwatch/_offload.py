"""Auto-offload: tools caught blocking the loop run their later calls on loops of their own, in worker threads.

The SDKs move plain `def` tools to threads, statically. What still blocks is `async def` tools that call
blocking code, fastmcp tools with `run_in_thread=False`, and low-level `Server` handlers. Once such a tool
blocks the loop (`strikes` times within `strike_window`), its calls run on one of a small pool of event loops
in worker threads, behind loopwatch's own capacity limit. Everything the tool does with its MCP context
(progress, logging, elicitation, sampling) is carried back to the server's loop through a portal and awaited
there. A tool that turns out to be bound to the server's loop ("attached to a different loop") has that call
answered on the loop, and is pinned there.
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
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from ._blame import call_key, current_call, serve_offloaded
from ._events import BlockEvent, OffloadEvent
from ._sentinel import current_backend

logger = logging.getLogger("loopwatch")

LOOP_BOUND_MARKERS = (
    "attached to a different loop",
    "bound to a different event loop",
    "different event loop",
    "is not the running loop",
    "Non-thread-safe operation invoked on an event loop other than the current one",
)


# -- loops reached from other threads -------------------------------------------------------------------

_NOT_CARRIED = {"current_async_library_cvar"}
"""Context variables that describe the caller's event loop, not the call: not carried to a worker."""


class Job:
    """A task spawned on another loop: its outcome, and a way to cancel it from any thread."""

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
                self.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
        if not self.future.done():
            if self._scope.cancelled_caught:
                self.future.set_exception(concurrent.futures.CancelledError())
            else:
                self.future.set_result(result)


class LoopRef:
    """A running loop other threads can spawn tasks on without waiting: asyncio or trio, natively."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group
        self.thread_id = threading.get_ident()
        self.library = current_backend()
        self._schedule = _native_scheduler()

    def schedule(self, callback: Callable[[], None]) -> bool:
        """Run `callback` on this loop soon; False when the loop is gone."""
        try:
            self._schedule(callback)
        except Exception:  # the loop closed or its run finished
            return False
        return True

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Job:
        """Start `fn(*args)` as a task on this loop, from any thread, with the caller's context variables."""
        job = Job(self)
        carried = [(var, value) for var, value in contextvars.copy_context().items() if var.name not in _NOT_CARRIED]
        if not self.schedule(functools.partial(self._start, job, fn, args, carried)):
            job.future.set_exception(RuntimeError("loopwatch: the target loop is no longer running"))
        return job

    def _start(self, job: Job, fn: Callable[..., Any], args: tuple[Any, ...], carried: list[Any]) -> None:
        """A loop callback runs outside any task: on a loop started by `asyncio.run` (not `anyio.run`; every
        server `loopwatch run -- COMMAND` watches that is launched so) sniffio cannot name its library there,
        and `start_soon` needs it."""
        token = _LIBRARY.set(self.library) if _LIBRARY is not None else None
        try:
            self.task_group.start_soon(job.run, fn, args, carried)
        finally:
            if token is not None:
                _LIBRARY.reset(token)


try:
    from sniffio import current_async_library_cvar as _LIBRARY
except ImportError:  # anyio without sniffio asks asyncio for the running loop, which a callback has
    _LIBRARY = None


def _native_scheduler() -> Callable[[Callable[[], None]], Any]:
    if current_backend() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


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

    def _run(self, backend: str, backend_options: dict[str, Any]) -> None:
        with contextlib.suppress(BaseException):
            anyio.run(self._main, backend=backend, backend_options=backend_options)
        self._ready.set()

    async def _main(self) -> None:
        self._stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            self.ref = LoopRef(tg)
            _HOMES[self.ref.thread_id] = self.ref
            self._ready.set()
            await self._stop.wait()
            # Graceful: calls still running end as their callers decide (a caller that goes away cancels its
            # call); cancelling them here would reach their callers before the server's own shutdown does.

    def close(self, timeout: float) -> None:
        ref, stop = self.ref, self._stop
        if ref is not None and stop is not None:
            _HOMES.pop(ref.thread_id, None)
            ref.schedule(stop.set)
        if timeout > 0:
            self.thread.join(timeout)  # a call stuck in a blocking call keeps its thread until it returns


class LoopPool:
    """A few worker loops; each call goes to the least busy one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.backend: tuple[str, dict[str, Any]] = ("asyncio", {})
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        worker = self._pick()
        assert worker.ref is not None
        job = worker.ref.spawn(fn, *args)
        job.future.add_done_callback(lambda _: self._done(worker))
        return job

    def _pick(self) -> _Worker:
        with self._lock:
            if len(self._workers) < self.size and all(w.busy for w in self._workers):
                self._workers.append(_Worker(len(self._workers), *self.backend))
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
                home.schedule(done.set)

        future.add_done_callback(wake)
        await done.wait()
    return future.result()


# -- the context bridge -------------------------------------------------------------------------------


class LoopBridge:
    """Stands in for an MCP context on a worker loop: its coroutine methods run on the server's loop."""

    __slots__ = ("_lw_target", "_lw_portal")

    def __init__(self, target: Any, portal: LoopRef) -> None:
        object.__setattr__(self, "_lw_target", target)
        object.__setattr__(self, "_lw_portal", portal)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._lw_target, name)
        if inspect.iscoroutinefunction(value):
            return _bridged(value, self._lw_portal)
        if _bridgeable(value):
            return LoopBridge(value, self._lw_portal)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._lw_target, name, value)

    def __repr__(self) -> str:
        return f"LoopBridge({self._lw_target!r})"


def _bridged(method: Callable[..., Awaitable[Any]], server: LoopRef) -> Any:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        job = server.spawn(functools.partial(method, *args, **kwargs))
        try:
            return await await_future(job.future)
        except BaseException:
            job.cancel()
            raise

    return call


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


def is_loop_bound_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError | ValueError) and any(marker in text for marker in LOOP_BOUND_MARKERS)


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

    # lifecycle
    def install(self) -> Offloader:
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
                self._offload(tool, "policy always", blocks=0)
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
        self.portal = LoopRef(task_group)
        _HOMES[self.portal.thread_id] = self.portal
        try:
            yield
        finally:
            _HOMES.pop(self.portal.thread_id, None)
            self.portal = None
            # The worker loops belong to this run of the server: tell them to end, never waiting for a
            # stuck one here on the loop (it ends when its blocking call returns).
            self.pool.close(timeout=0)
            self.processes.pool.close(timeout=0)

    def _where(self, base: Callable[[str], str]) -> Callable[[str], str]:
        return lambda tool: self.executes.get(tool, "thread") if tool in self.offloaded else base(tool)

    # decisions (watchdog thread, or the console)
    def on_blocking(self, call: Any, elapsed: float, importing: bool, stack: tuple[Any, ...]) -> None:
        """While a block goes on: the strike counts now, so the very next call can already move."""
        if not importing:  # an import blocks once: the module is cached after that
            where = [(file, function) for file, _, function in stack]
            self._strike(call, time.time(), f"blocking the loop ({elapsed * 1000:.0f} ms so far)", where)

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
            self._offload(tool, f"{reason}: policy always", self._blocks.get(tool, 0))
        elif policy == "never" or policy == "auto":
            if tool in self.offloaded:
                self._restore(tool, f"{reason}: policy {policy}")

    def _offload(self, tool: str, reason: str, blocks: int) -> None:
        if tool in self.offloaded:
            return
        if not self._can_move(tool):
            logger.info("loopwatch: tool %s stays on the loop: %s", tool, "not a tool loopwatch can move")
            return
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
            elif is_loop_bound_error(exc):
                self._pin(tool, f"bound to the server's loop ({type(exc).__name__}: {exc})")
                return await _call(fn, _unbridge(args), _unbridge_kw(kwargs))
            raise

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
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):  # refused at start, as --events is: a state never saved is a silent loss
            from ._options import OptionError

            raise OptionError(f"--offload-state {path}: the folder {folder} does not exist")
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as file:
                state = json.load(file)
            tools = _state_tools(state)
        except (OSError, ValueError) as exc:
            logger.error("loopwatch: cannot read offload state %s: %s (starting fresh)", path, _one_line(exc))
            return
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
            logger.error("loopwatch: cannot write offload state %s: %s", path, exc)

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


def _unbridge(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a._lw_target if isinstance(a, LoopBridge) else a for a in args)


def _unbridge_kw(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v._lw_target if isinstance(v, LoopBridge) else v for k, v in kwargs.items()}


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
