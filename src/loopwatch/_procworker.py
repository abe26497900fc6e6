"""The worker-process side of process offload: the entry point, the call runner, and the context proxy.

A worker is a fresh interpreter (a spawn context: never a fork of the threaded server). It imports a tool's
function by its import path, runs one call at a time with the arguments the server validated, and sends
back the return value or the exception. Whatever the tool does with its MCP context goes back over the same
pipe and is awaited on the server's loop (`ContextProxy`). This module imports nothing of the MCP SDKs: the
tool's own module does.

Messages, server -> worker: ("call", id, ref, args, kwargs), ("reply", seq, status, value), ("cancel", id),
("stop",). Worker -> server: ("ready", pid), ("ctx", id, seq, op, path, args, kwargs),
("done", id, status, value) with status ok | raised | cancelled | noref | cross.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import itertools
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from typing import Any

CANCEL_SIGNAL = signal.SIGUSR1


class CallCancelled(BaseException):
    """Raised in the worker's main thread when the server cancels the call it runs."""


class CannotCross(RuntimeError):
    """Something a tool needs could not cross between the server and its worker process."""


class Awaited:
    """What a plain context method returned when it was an awaitable (`ctx.info()` in MCPServer): the server
    already awaited it; the tool's `await` gets its value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value
        yield  # a generator: `await` runs it to its return value


class ContextMarker:
    """Stands, in the pickled arguments, for an MCP context that stays on the server."""

    def __init__(self, index: int) -> None:
        self.index = index


# -- exceptions across the pipe ----------------------------------------------------------------------


def pack_exception(exc: BaseException) -> tuple[Any, ...]:
    """An exception as (class, args, attributes, traceback text): rebuilt without calling its __init__,
    so classes whose constructor takes other arguments than `args` (MCPError) cross unchanged."""
    text = "".join(traceback.format_exception(exc))
    state = (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))
    try:
        pickle.dumps(state)
    except Exception:
        state = (None, (f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}",), {})
    return (*state, text)


def unpack_exception(packed: tuple[Any, ...]) -> BaseException:
    kind, args, attributes, text = packed
    if kind is None:
        exc: BaseException = RuntimeError(*args)
    else:
        exc = kind.__new__(kind)
        exc.args = args
        with contextlib.suppress(Exception):
            exc.__dict__.update(attributes)
    exc.__notes__ = [f"raised in a loopwatch worker process:\n{text.rstrip()}"]
    return exc


# -- finding the function -----------------------------------------------------------------------------


def resolve(ref: tuple[str, str, str | None]) -> Any:
    """The function at `module:qualname` (the file when the module was loaded from a path), unwrapped from the
    tool object a framework's decorator may have put in its place."""
    module_name, qualname, file = ref
    module = _MAINS.get(file) if module_name == "__main__" and file else sys.modules.get(module_name)
    if module is None:
        module = _import(module_name, file)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    fn = getattr(obj, "fn", None)  # fastmcp 2.x's decorator returns the tool object
    return fn if fn is not None and not inspect.isfunction(obj) else obj


_MAINS: dict[str, Any] = {}
"""The server's `__main__` scripts, by file, as loaded here under `__mp_main__` (this worker's own `__main__`
is its `-c` command)."""


def _import(name: str, file: str | None) -> Any:
    if name != "__main__":
        try:
            return importlib.import_module(name)
        except ImportError:
            if not file:
                raise
    if not file:
        raise ImportError(f"module {name} has no file to load it from")
    folder = os.path.dirname(file)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    if name == "__main__":  # the server's script: loaded as multiprocessing does, so its main guard stays shut
        module = _MAINS[file] = _load(file, "__mp_main__")
        return module
    return _load(file, name)


def _load(file: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- the worker ---------------------------------------------------------------------------------------


class Worker:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.current: Any = None
        self.cancel_target: Any = None
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._waiting: dict[int, Any] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    # the reader thread: everything the server sends
    def read(self) -> None:
        try:
            while True:
                self._dispatch(self.conn.recv())
        except (EOFError, OSError):
            pass
        os._exit(0)  # the server is gone: so is every reason to run

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("call", "stop", "warm"):
            self.calls.put(message)
        elif kind == "reply":
            waiter = self._waiting.pop(message[1], None)
            if waiter is not None:
                waiter(message[2], message[3])
        elif kind == "cancel":
            self.cancel_target = message[1]  # a call still queued sees it when it starts
            if message[1] == self.current:
                signal.pthread_kill(threading.main_thread().ident or 0, CANCEL_SIGNAL)

    def on_cancel_signal(self, signum: int, frame: Any) -> None:
        if self.current is not None and self.current == self.cancel_target:
            raise CallCancelled()

    # the main thread: one call at a time
    def serve(self) -> None:
        while True:
            message = self.calls.get()
            if message[0] == "stop":
                return
            if message[0] == "warm":  # import the tool's module before its first call needs it
                with contextlib.suppress(Exception):
                    resolve(message[1])
                continue
            _, call_id, ref, args, kwargs = message
            status, value = self.run(call_id, ref, args, kwargs)
            self.current = None
            self.reply_done(call_id, status, value)
            if status == "raised" and value[0] is MemoryError:
                os._exit(3)  # a worker that ran out of memory is replaced: its heap is not to be trusted

    def reply_done(self, call_id: Any, status: str, value: Any) -> None:
        try:
            self.send(("done", call_id, status, value))
        except Exception as exc:  # the result does not pickle: the work is done, but it cannot cross back
            text = f"its result ({type(value).__qualname__}) does not pickle: {exc}"
            self.send(("done", call_id, "cross", text))

    def run(self, call_id: Any, ref: Any, args: Any, kwargs: Any) -> tuple[str, Any]:
        try:
            fn = resolve(ref)
        except Exception as exc:
            return "noref", f"{type(exc).__name__}: {exc}"
        self.current = call_id
        try:
            if self.cancel_target == call_id:
                raise CallCancelled()
            args = tuple(self._proxy(call_id, a) for a in args)
            kwargs = {k: self._proxy(call_id, v) for k, v in kwargs.items()}
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
            self.current = None
            return "ok", result
        except CallCancelled:
            return "cancelled", None
        except CannotCross as exc:
            return "cross", str(exc)
        except BaseException as exc:
            if isinstance(exc, SystemExit | KeyboardInterrupt):
                raise
            return "raised", pack_exception(exc)
        finally:
            self.current = None

    def _proxy(self, call_id: Any, value: Any) -> Any:
        return ContextProxy(self, call_id, (value.index,)) if isinstance(value, ContextMarker) else value

    # context requests, from the tool's code in the main thread
    def request(self, call_id: Any, op: str, path: tuple[Any, ...], args: Any = (), kwargs: Any = None) -> Any:
        """Blocking: for attribute reads and plain methods."""
        done = threading.Event()
        box: list[Any] = []

        def settle(status: str, value: Any) -> None:
            box.append((status, value))
            done.set()

        self._send_request(call_id, op, path, args, kwargs or {}, settle)
        done.wait()
        return _settled(*box[0])

    async def request_async(self, call_id: Any, path: tuple[Any, ...], args: Any, kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(status: str, value: Any) -> None:
            loop.call_soon_threadsafe(_resolve, future, status, value)

        self._send_request(call_id, "await", path, args, kwargs, settle)
        status, value = await future
        return _settled(status, value)

    def _send_request(self, call_id: Any, op: str, path: Any, args: Any, kwargs: Any, settle: Any) -> None:
        seq = next(self._seq)
        self._waiting[seq] = settle
        try:
            self.send(("ctx", call_id, seq, op, path, args, kwargs))
        except Exception as exc:
            self._waiting.pop(seq, None)
            raise CannotCross(f"the arguments of ctx.{'.'.join(map(str, path[1:]))}() do not pickle: {exc}") from None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _resolve(future: asyncio.Future[Any], status: str, value: Any) -> None:
    if not future.done():
        future.set_result((status, value))


def _settled(status: str, value: Any) -> Any:
    if status == "ok":
        return value
    if status == "cross":
        raise CannotCross(value)
    raise unpack_exception(value)


class ContextProxy:
    """The tool's MCP context, in the worker: attribute reads and method calls go to the real one on the server's
    loop. Values that pickle come back as copies; what doesn't raise `CannotCross` (and the server pins the tool
    to threads)."""

    __slots__ = ("_lw_worker", "_lw_call", "_lw_path", "_lw_kinds")

    def __init__(self, worker: Worker, call_id: Any, path: tuple[Any, ...]) -> None:
        object.__setattr__(self, "_lw_worker", worker)
        object.__setattr__(self, "_lw_call", call_id)
        object.__setattr__(self, "_lw_path", path)
        object.__setattr__(self, "_lw_kinds", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        path = (*self._lw_path, name)
        kind = self._lw_kinds.get(name)
        if kind is None:
            kind, value = self._lw_worker.request(self._lw_call, "get", path)
            if kind == "value":
                return value
            self._lw_kinds[name] = kind
        if kind == "object":
            return ContextProxy(self._lw_worker, self._lw_call, path)
        return self._method(path, kind == "async")

    def _method(self, path: tuple[Any, ...], is_async: bool) -> Any:
        worker, call_id = self._lw_worker, self._lw_call
        if is_async:
            async def bridged(*args: Any, **kwargs: Any) -> Any:
                return await worker.request_async(call_id, path, args, kwargs)

            return bridged
        return lambda *args, **kwargs: worker.request(call_id, "call", path, args, kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise CannotCross(f"ctx.{name} cannot be set from a worker process")

    def __repr__(self) -> str:
        return f"ContextProxy(ctx{''.join('.' + str(p) for p in self._lw_path[1:])})"


def boot(fd: int) -> None:
    """The worker process's entry point: `python -c "...boot(FD)"`, FD its end of the server's pipe."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    _, path, memory_mb, nice = conn.recv()  # ("init", the server's sys.path, memory limit, niceness)
    sys.path[:] = path
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    main(conn, memory_mb)


def main(conn: Any, memory_mb: int | None = None) -> None:
    os.dup2(2, 1)  # never the server's stdout: under stdio it carries the protocol
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when its workers end
    _die_with_parent()
    if memory_mb:
        _limit_memory(memory_mb)
    worker = Worker(conn)
    signal.signal(CANCEL_SIGNAL, worker.on_cancel_signal)
    threading.Thread(target=worker.read, name="loopwatch-worker-reader", daemon=True).start()
    worker.send(("ready", os.getpid()))
    worker.serve()


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the server's thread that started it ends, even one stuck in C."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the server died before the call above
            os._exit(0)


def _limit_memory(megabytes: int) -> None:
    import resource

    limit = megabytes * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
