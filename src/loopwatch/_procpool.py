"""Process offload: a tool whose calls crunch Python runs them in worker processes, which don't share the GIL.

A thread cures a tool that waits (I/O, sleep); one that computes in Python still takes the GIL from the loop
in 5 ms slices. With policy `process` (or `--offload-cpu process` after a `cpu` block), the tool's function is
found by its import path and run in one of a few worker processes (a spawn context: never a fork of the
threaded server) with the arguments the SDK validated. The return value or the exception comes back and the
SDK turns it into the MCP result on the server, as for a call on the loop. Context calls (progress, logging,
elicitation) are carried back over the worker's pipe and awaited on the server's loop, in the call's own task.
What cannot cross (the lifespan context, an object that doesn't pickle) fails that call with a clear error
and pins the tool to threads. The worker side is `_procworker`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import anyio

from . import _procworker
from ._events import OffloadEvent
from ._offload import _bridgeable, _is_context, await_future  # noqa: F401  (await_future: tests)
from ._procworker import Awaited, CannotCross, ContextMarker, pack_exception, unpack_exception

logger = logging.getLogger("loopwatch")

KILL_GRACE = 2.0
"""Seconds a cancelled call's worker gets to stop before it is killed and replaced (stuck in C, say)."""

WORKER_NICE = 5
"""Workers run this much nicer than the server: on a contended core the loop (and the honest calls it serves)
wins over an offloaded crunch."""

CPU_BOUND = 0.5
"""Share of a `cpu` block the loop thread must really have run on a CPU (of its fair share of the machine, by
the load average) before a process is said to cure it."""

START_TIMEOUT = 60.0
"""Seconds a starting worker may take before a cancelled call waiting for it has the worker killed."""

REFUSED = {"lifespan_context": "the server's lifespan context (its state lives in the server process)"}
"""Context attributes that never cross to a worker, even when they pickle: a copy would silently fork state."""


class OnThreads(Exception):
    """This call did not start in a process (nothing ran there): run it on a thread instead."""


# -- finding a tool's function by its import path ---------------------------------------------------------


def function_ref(fn: Any) -> tuple[str, str, str | None] | str:
    """(module, qualname, file) a fresh interpreter finds `fn` at, or why there is none."""
    import sys

    module_name, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not inspect.isfunction(fn) or not module_name or not qualname:
        return f"{type(fn).__qualname__} is not a plain function"
    if "<" in qualname:
        return f"{qualname} is defined inside a function (not importable by name)"
    module = sys.modules.get(module_name)
    if module is None:
        return f"its module {module_name} is not imported"
    try:
        found = _procworker.resolve((module_name, qualname, None))
    except Exception as exc:
        return f"{module_name}.{qualname} cannot be found ({type(exc).__name__}: {exc})"
    if found is not fn:
        return f"{module_name}.{qualname} is another object than the registered function"
    return module_name, qualname, getattr(module, "__file__", None)


def tool_error(kind: str, text: str) -> Exception:
    """An error the SDK reports to the client with its text (a crash's text would stay on the server)."""
    import importlib

    modules = {"mcpserver": ("mcp.server.mcpserver.exceptions", "mcp.server.fastmcp.exceptions"),
               "fastmcp": ("fastmcp.exceptions",)}.get(kind, ())
    for name in modules:  # MCPServer (mcp 2.x), FastMCP 1 (mcp 1.x), fastmcp
        try:
            return importlib.import_module(name).ToolError(text)  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return RuntimeError(text)


# -- the pool ---------------------------------------------------------------------------------------------


class PoolCannotStart(Exception):
    pass


class _Call:
    """One call in a worker: messages for it reach its task on the server's loop."""

    def __init__(self, call_id: int, tool: str, ref: Any, portal: Any, send: Any, release: Any) -> None:
        self.id, self.tool, self.ref = call_id, tool, ref
        self.portal, self._send, self.release = portal, send, release
        self.crossed: str | None = None
        self.cancelled = False

    def deliver(self, message: tuple[Any, ...]) -> None:
        self.portal.schedule(lambda: self._put(message))

    def _put(self, message: tuple[Any, ...]) -> None:
        try:
            self._send.send_nowait(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the call's task is gone (cancelled): nobody waits for this any more


class WorkerProcess:
    """One worker process, its pipe, and the thread on the server that reads it."""

    def __init__(self, pool: ProcessPool, index: int) -> None:
        """A spawn: a fresh interpreter (fork and exec), never a fork of this threaded server, and unlike
        multiprocessing's spawn it never re-imports the server's `__main__` (which may start the server)."""
        self.pool = pool
        self.call: _Call | None = None
        self.ready = False
        self.retiring = False
        self.killed = False
        self._lock = threading.Lock()
        self._kill: threading.Timer | None = None
        self.conn, child = _socket_pair()
        try:
            self.process = subprocess.Popen(
                [pool.python, "-c", f"from loopwatch._procworker import boot; boot({child.fileno()})"],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=2,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "LOOPWATCH_LAUNCH_OFF": "1"},  # a worker is never watched
            )
        finally:
            child.close()
        self.send(("init", list(sys.path), pool.memory_mb, pool.nice))
        self.reader = threading.Thread(target=self._read, name=f"loopwatch-process-{index}-reader", daemon=True)
        self.reader.start()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)  # pickles first: a value that doesn't pickle raises before a byte is written

    def submit(self, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.call = call
        try:
            self.send(("call", call.id, call.ref, args, kwargs))
        except BaseException:
            self.call = None
            raise

    def cancel(self, call: _Call) -> None:
        """The call's caller went away: ask the worker to stop it; kill the worker if it can't in time."""
        call.cancelled = True
        try:
            self.send(("cancel", call.id))
        except (OSError, ValueError):
            return
        timer = threading.Timer(self.pool.grace, self._kill_if_running, args=(call,))
        timer.daemon = True
        self._kill = timer
        timer.start()

    def _kill_if_running(self, call: _Call, waited: float = 0.0) -> None:
        if self.call is not call:
            return
        waited += self.pool.grace
        if not self.ready and waited < START_TIMEOUT:  # still starting: the call never began and ends at once then
            self._kill = timer = threading.Timer(self.pool.grace, self._kill_if_running, args=(call, waited))
            timer.daemon = True
            timer.start()
            return
        logger.warning("tool %s did not stop within %.1f s of its cancellation; its worker process "
                       "is killed and replaced", call.tool, waited)
        self.kill()

    def warm(self, ref: Any) -> None:
        try:
            self.send(("warm", ref))
        except (OSError, ValueError):
            pass

    # the reader thread
    def _read(self) -> None:
        try:
            while True:
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading a worker process failed; it is replaced")
            self.process.kill()
        self._died()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, call = message[0], self.call
        if kind == "ready":
            self.ready = True
        elif kind == "ctx":
            if call is not None and call.id == message[1]:
                call.deliver(message)
        elif kind == "done":
            if message[2] == "raised" and message[3][0] is MemoryError:
                self.retiring = True  # it exits now (see _procworker): no further call for it
            self._finish()
            if call is not None and call.id == message[1]:
                call.deliver(message)
                call.release()

    def _finish(self) -> None:
        self.call = None
        timer, self._kill = self._kill, None
        if timer is not None:
            timer.cancel()

    def _died(self) -> None:
        call = self.call
        self._finish()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:  # its pipe closed, yet it runs: it won't be of use again
            self.process.kill()
            self.process.wait(2)
        self.pool.forget(self)
        with self._lock:
            self.conn.close()
        text = _exit_text(self.process.returncode)
        if not self.ready and not self.killed:
            self.pool.start_failed(f"a worker process exited before it was ready ({text})")
        if call is not None:
            call.deliver(("died", call.id, text, self.ready))
            call.release()

    def kill(self) -> None:
        self.killed = True
        self.process.kill()

    def stop(self) -> None:
        self.retiring = True
        try:
            self.send(("stop",))
        except (OSError, ValueError):
            pass


def _socket_pair() -> tuple[Any, Any]:
    """Both ends of a worker's pipe: a Connection here, a socket whose descriptor the worker inherits."""
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    ours.set_inheritable(False)
    theirs.set_inheritable(True)
    return Connection(ours.detach()), theirs


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "out of memory" if code == 3 else f"exit status {code}"


class ProcessPool:
    """A few worker processes; each runs one call at a time. Started on the server's loop thread, so the
    kernel's parent-death signal (tied to the starting thread) fires only when the server itself ends."""

    def __init__(self, size: int, memory_mb: int | None = None) -> None:
        self.size = size
        self.memory_mb = memory_mb
        self.python = sys.executable
        self.nice = WORKER_NICE
        self.grace = KILL_GRACE
        self.failed: str | None = None
        self.on_failure: Any = None
        self.workers: list[WorkerProcess] = []
        self._retired: list[WorkerProcess] = []
        self.started = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(1 for w in self.workers if w.call is not None)

    @property
    def alive(self) -> int:
        with self._lock:
            return len(self.workers)

    def pick(self) -> WorkerProcess:
        """An idle worker, started if there is none (the caller holds one of `size` slots)."""
        if self.failed:
            raise PoolCannotStart(self.failed)
        with self._lock:
            idle = next((w for w in self.workers if w.call is None and not w.retiring), None)
            if idle is not None:
                return idle
        return self._start()

    def _start(self) -> WorkerProcess:
        try:
            worker = WorkerProcess(self, self.started)
        except Exception as exc:
            self.start_failed(f"{type(exc).__name__}: {exc}")
            raise PoolCannotStart(self.failed) from exc
        with self._lock:
            self.started += 1
            self.workers.append(worker)
        return worker

    def warm(self, ref: Any) -> None:
        """Start the workers now and import the tool's module in them: the first calls don't wait for it."""
        try:
            while not self.failed and self.alive < self.size:
                self._start()
        except PoolCannotStart:
            return
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            worker.warm(ref)

    def forget(self, worker: WorkerProcess) -> None:
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)

    def start_failed(self, text: str) -> None:
        if self.failed:
            return
        self.failed = text
        logger.error("the offload process pool cannot start: %s; its tools run on threads", text)
        if self.on_failure is not None:
            self.on_failure(text)

    def close(self, timeout: float = 2.0) -> None:
        """Stop every worker: asked first, killed when `timeout` passes (0: ask, kill what is busy)."""
        with self._lock:
            workers, self.workers = self.workers, []  # a later run of the server starts workers of its own
            self._retired = [w for w in self._retired if w.process.poll() is None] + workers
            if timeout > 0:  # the last close: wait for those an earlier one only asked to stop, too
                workers = self._retired
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in workers:
            if timeout > 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(max(0.0, deadline - time.monotonic()))
            if worker.process.poll() is None and (timeout > 0 or worker.call is not None):
                worker.kill()
        if timeout > 0:
            for worker in workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(1)
                worker.reader.join(1)


# -- the offloader's process executor ---------------------------------------------------------------------


class ProcessOffload:
    """Where the offloader sends the calls of tools that execute in a process (`executes[tool] == "process"`)."""

    def __init__(self, offloader: Any) -> None:
        options = offloader.options
        self.offloader = offloader
        self.pool = ProcessPool(options.offload_processes, options.offload_process_memory)
        self.pool.on_failure = self._pool_failed
        self.refs: dict[str, Any] = {}
        self.pinned: dict[str, str] = {}
        self._advised: set[str] = set()
        self._ids = iter(range(1, 1 << 62))
        self._limiter: anyio.CapacityLimiter | None = None
        self._limiter_portal: Any = None
        self.load = os.getloadavg
        """The load average (injected in tests)."""

    def install(self) -> ProcessOffload:
        self.offloader.monitor.block_hooks.append(self.on_block)
        self.offloader.monitor.start_hooks.append(self._warm_all)
        return self

    def close(self) -> None:
        monitor = self.offloader.monitor
        for hooks, hook in ((monitor.block_hooks, self.on_block), (monitor.start_hooks, self._warm_all)):
            if hook in hooks:
                hooks.remove(hook)
        self.pool.close()

    def _warm_all(self) -> None:
        """Watching starts (loop thread): tools decided before (policy, state file) get their workers now."""
        tools = [t for t, where in self.offloader.executes.items() if where == "process" and t in self.refs]
        if tools:
            self.pool.warm(self.refs[tools[0]])

    # decisions
    def can_move(self, tool: str) -> str | None:
        """None when `tool` can run in a process; otherwise why not."""
        off = self.offloader
        if self.pool.failed:
            return f"the process pool cannot start ({self.pool.failed})"
        if off.adapter.kind == "lowlevel":
            return "a low-level server's tools/call handler is not one tool's function"
        fn = off.adapter.tool_fn(tool)
        if tool in off._swapped:  # the offloader's wrapper (functools.wraps) in the registered function's place
            fn = getattr(fn, "__wrapped__", fn)
        if fn is None:
            return "no such tool"
        ref = function_ref(fn)
        if isinstance(ref, str):
            return ref
        self.refs[tool] = ref
        return None

    def apply(self, tool: str, reason: str, blocks: int) -> None:
        """Policy `process`: the tool's calls run in the pool from now on (on a thread when they can't)."""
        why = self.can_move(tool)
        off = self.offloader
        if why is not None:
            logger.warning("tool %s cannot run in a process: %s; it runs on a thread", tool, why)
            with off._lock:
                off.policies[tool] = "always"
            off._offload(tool, f"{reason}; cannot run in a process ({why})", blocks)
            return
        self.move(tool, reason, blocks)

    def move(self, tool: str, reason: str, blocks: int) -> None:
        off = self.offloader
        off.pinned.pop(tool, None)
        off.executes[tool] = "process"
        off._swap_fn(tool)
        off.offloaded[tool] = reason
        off.monitor.post(OffloadEvent(time=time.time(), tool=tool, action="offloaded", reason=reason, blocks=blocks,
                                      executes="process"))
        off._save_state()
        portal = off.portal
        if portal is not None:  # start the workers on the loop thread (see ProcessPool)
            portal.schedule(lambda: self.pool.warm(self.refs[tool]))

    def pin(self, tool: str, reason: str) -> None:
        """Back to threads for good: something this tool needs cannot cross to a process."""
        off = self.offloader
        if off.executes.pop(tool, None) is None:
            return
        with off._lock:
            off.policies[tool] = "always"
        self.pinned[tool] = reason
        logger.warning("tool %s is pinned to threads: %s", tool, reason)
        off.monitor.post(OffloadEvent(time=time.time(), tool=tool, action="pinned", reason=reason,
                                      blocks=off._blocks.get(tool, 0), executes="thread"))
        off._save_state()

    def _pool_failed(self, text: str) -> None:
        for tool in [t for t, where in self.offloader.executes.items() if where == "process"]:
            self.pin(tool, f"the process pool cannot start ({text})")

    def _cpu_bound(self, event: Any) -> bool:
        """Whether the loop thread really ran on a CPU for most of what this machine's load let it: a `cpu` block
        counts run-queue waits too, and on a loaded machine a sleep has been read as `cpu` by that demand."""
        try:
            load = self.load()[0]
        except OSError:
            load = 0.0
        fair_share = min(1.0, (os.cpu_count() or 1) / load) if load > 0 else 1.0
        return event.cpu_s >= CPU_BOUND * fair_share * event.duration_s

    def on_block(self, event: Any, call: Any) -> None:
        """A `cpu` block, or a `gil` one (a native call holding the GIL, which it holds on a thread too)
        (watchdog thread): with --offload-cpu process the tool moves to a process now; otherwise an `advised`
        event says that a process would cure it."""
        off = self.offloader
        if event.kind not in ("cpu", "gil") or call is None or call.method != "tools/call" or call.label != call.tool:
            return
        if event.kind == "cpu" and not self._cpu_bound(event):
            return
        tool = call.label
        if tool in self._advised or off.executes.get(tool) == "process" or tool not in off.offloaded:
            return
        self._advised.add(tool)
        took = f"blocked the loop {event.duration_s * 1000:.0f} ms [{event.kind}]"
        if off.options.offload_cpu == "process" and off.policies.get(tool, "auto") == "auto":
            why = self.can_move(tool)
            if why is None:
                self.move(tool, f"{took}: a process does not share the GIL (--offload-cpu process)",
                          off._blocks.get(tool, 0))
                return
            advice = f"it stays on a thread: {why}"
        else:
            advice = f"--offload-policy {tool}={'process'} would cure it"
        text = f"{tool} is CPU-bound ({took}): on a thread it still takes the GIL from the loop; {advice}"
        # Advice, not a decision: the move to a thread was told (and counted) when it was made. The event's own
        # line (the block log's) says it: no second line here.
        off.monitor.post(OffloadEvent(time=time.time(), tool=tool, action="advised", reason=text,
                                      blocks=off._blocks.get(tool, 0), executes="thread"))

    # running a call (server loop)
    async def run(self, tool: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        off = self.offloader
        portal, ref = off.portal, self.refs.get(tool)
        if portal is None or ref is None:
            raise OnThreads
        contexts: list[Any] = []
        args = tuple(_marked(a, contexts) for a in args)
        kwargs = {k: _marked(v, contexts) for k, v in kwargs.items()}
        limiter = self._slots(portal)
        token = object()
        await limiter.acquire_on_behalf_of(token)
        release = _release_once(portal, limiter, token)
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        call = _Call(next(self._ids), tool, ref, portal, send, release)
        worker = self._submit(call, args, kwargs, release)
        with receive, send:
            try:
                return await self._serve(call, worker, receive, contexts)
            except anyio.get_cancelled_exc_class():
                if worker.call is call:
                    worker.cancel(call)
                raise

    def _slots(self, portal: Any) -> anyio.CapacityLimiter:
        if self._limiter is None or self._limiter_portal is not portal:
            self._limiter, self._limiter_portal = anyio.CapacityLimiter(self.pool.size), portal
        return self._limiter

    def _submit(self, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any], release: Any) -> WorkerProcess:
        try:
            worker = self.pool.pick()
            worker.submit(call, args, kwargs)
        except PoolCannotStart:
            release()
            raise OnThreads from None
        except Exception as exc:  # the arguments don't pickle: nothing ran; this call and the next go to threads
            release()
            self.pin(call.tool, f"its arguments do not pickle ({type(exc).__name__}: {exc})")
            raise OnThreads from None
        return worker

    async def _serve(self, call: _Call, worker: WorkerProcess, receive: Any, contexts: list[Any]) -> Any:
        async for message in receive:
            if message[0] == "ctx":
                await self._answer(call, worker, contexts, message)
                continue
            try:
                return self._outcome(call, message)
            finally:
                if call.crossed:
                    self.pin(call.tool, call.crossed)
        raise RuntimeError("loopwatch: the worker process's messages ended without an answer")

    def _outcome(self, call: _Call, message: tuple[Any, ...]) -> Any:
        kind, tool = message[0], call.tool
        if kind == "died":
            _, _, text, ready = message
            if not ready:
                raise OnThreads  # the pool never started (said once, the tools pinned to threads): nothing ran
            raise tool_error(self.offloader.adapter.kind, f"loopwatch: the worker process running tool {tool} died "
                                                          f"({text}) before it answered; a new one replaces it")
        _, _, status, value = message
        if status == "ok":
            return value
        if status == "raised":
            raise unpack_exception(value)
        if status == "noref":
            self.pin(tool, f"a worker process cannot import its function ({value})")
            raise OnThreads
        if status == "cross":
            call.crossed = f"{value}"
            text = f"loopwatch: tool {tool} runs in a worker process, and {value}; it runs on a thread from now on"
            raise tool_error(self.offloader.adapter.kind, text)
        raise RuntimeError(f"loopwatch: tool {tool}'s call ended {status} in its worker process")

    async def _answer(self, call: _Call, worker: WorkerProcess, contexts: list[Any], message: tuple[Any, ...]) -> None:
        _, _, seq, op, path, args, kwargs = message
        try:
            status, value = "ok", await self._context_op(call, contexts, op, path, args, kwargs)
        except CannotCross as exc:
            call.crossed = str(exc)
            status, value = "cross", str(exc)
        except Exception as exc:
            status, value = "raised", pack_exception(exc)
        try:
            worker.send(("reply", seq, status, value))
        except (OSError, ValueError):
            return  # the worker is gone: its reader tells the call
        except Exception as exc:
            call.crossed = f"the value of {_dotted(path)} ({type(value).__qualname__}) does not pickle: {exc}"
            worker.send(("reply", seq, "cross", call.crossed))

    async def _context_op(self, call: _Call, contexts: list[Any], op: str, path: tuple[Any, ...], args: Any,
                          kwargs: Any) -> Any:
        names = path[1:]
        refused = next((REFUSED[n] for n in names if n in REFUSED), None)
        if refused is not None:
            raise CannotCross(f"{_dotted(path)} is {refused} and cannot cross to a worker process")
        target = contexts[path[0]]
        for name in names[:-1]:
            target = getattr(target, name)
        value = getattr(target, names[-1])
        if op == "get":
            return _kind_of(value, path)
        result = value(*args, **kwargs)
        if op == "await":
            return await result
        return Awaited(await result) if inspect.isawaitable(result) else result

    def snapshot(self) -> dict[str, Any]:
        return {"processes": self.pool.size, "processes_alive": self.pool.alive, "processes_in_use": self.pool.in_use,
                "processes_started": self.pool.started, "pinned_to_threads": dict(self.pinned),
                "pool_failed": self.pool.failed}


def _kind_of(value: Any, path: tuple[Any, ...]) -> tuple[str, Any]:
    """What a context attribute is, for the worker's proxy: a method, an object to proxy, or a value to copy."""
    if inspect.iscoroutinefunction(value):
        return "async", None
    if _bridgeable(value):
        return "object", None
    if callable(value) and not isinstance(value, type):
        return "sync", None
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise CannotCross(f"{_dotted(path)} ({type(value).__qualname__}) does not pickle: {exc}") from None
    return "value", value


def _dotted(path: tuple[Any, ...]) -> str:
    return "ctx" + "".join(f".{name}" for name in path[1:])


def _marked(value: Any, contexts: list[Any]) -> Any:
    if not _is_context(value):
        return value
    contexts.append(value)
    return ContextMarker(len(contexts) - 1)


def _release_once(portal: Any, limiter: anyio.CapacityLimiter, token: object) -> Any:
    """The slot goes back once, on the server's loop, when the worker is really done (or dead)."""
    lock, done = threading.Lock(), [False]

    def release() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        if threading.get_ident() == getattr(portal, "thread_id", None):
            limiter.release_on_behalf_of(token)
        else:
            portal.schedule(lambda: limiter.release_on_behalf_of(token))

    return release
