"""Before a tool leaves the server's loop: what in its reach a move would break, and, after a move, whether a
failure came from an object bound to the server's loop.

A moved call runs on another event loop in another thread. Objects bound to the server's loop (asyncio and
anyio primitives, futures, clients and pools made at start-up) fail there, and can be poisoned for the tools
that stay (an `asyncio.Lock` first used on a worker loop belongs to it). Thread-affine objects (`sqlite3`
connections with `check_same_thread`, `threading.local`, GUI and COM handles) fail or read differently in
another thread. `obstacle()` looks once per tool, at the decision, at what the tool's function reaches: its
closure, defaults, the globals its code names (and their attributes it names), the instances among them,
and the functions of its own module it calls. It reads `__dict__`s only: no property runs, nothing is called
but a `sqlite3` connection's `cursor()` in a throwaway thread, which is how its thread check is told.
"""

from __future__ import annotations

import asyncio
import asyncio.mixins
import functools
import inspect
import logging
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

from ._courier import say

MAX_OBJECTS = 2000
"""Objects looked at per tool at most: a tool that reaches more is judged on what was seen."""

_LOOP_BOUND_TYPES: tuple[tuple[str, str], ...] = (
    ("anyio", "Lock"), ("anyio", "Semaphore"), ("anyio", "Event"), ("anyio", "Condition"),
    ("anyio", "CapacityLimiter"), ("anyio.streams.memory", "MemoryObjectSendStream"),
    ("anyio.streams.memory", "MemoryObjectReceiveStream"),
    ("trio", "Lock"), ("trio", "StrictFIFOLock"), ("trio", "Semaphore"), ("trio", "Event"),
    ("trio", "Condition"), ("trio", "CapacityLimiter"), ("trio", "MemorySendChannel"),
    ("trio", "MemoryReceiveChannel"),
    ("httpx", "AsyncClient"), ("aiohttp", "ClientSession"), ("aiohttp", "TCPConnector"),
    ("asyncpg", "Pool"), ("asyncpg", "Connection"), ("redis.asyncio", "Redis"),
    ("redis.asyncio", "ConnectionPool"), ("aiosqlite", "Connection"), ("motor", "AsyncIOMotorClient"),
)
"""Types bound to the loop that made them (or not safe from another thread's loop), by top module and name."""

_FRAMEWORKS = ("mcp.", "fastmcp.", "loopwatch.", "anyio.", "starlette.", "uvicorn.", "pydantic")

_GUI_MODULES = ("tkinter", "PyQt5", "PyQt6", "PySide2", "PySide6", "wx", "win32com", "pythoncom", "comtypes")


def obstacle(fn: Any) -> str | None:
    """What `fn` reaches that would break off the server's loop, as a sentence; None when nothing was found."""
    try:
        for where, value in _reachable(fn):
            kind = affinity(value)
            if kind is not None:
                return f"it uses {where}, {kind}"
    except Exception as exc:  # an odd object must never stop a decision: judge it movable, as before the check
        say(logging.DEBUG, "could not inspect %r for loop-bound objects", fn, exc_info=exc)
    return None


def affinity(value: Any) -> str | None:
    """Why `value` belongs to one loop or one thread, or None."""
    if isinstance(value, asyncio.mixins._LoopBoundMixin):
        return f"an asyncio.{type(value).__name__} (bound to the first event loop that waits on it)"
    if isinstance(value, asyncio.Future):
        return f"an asyncio {type(value).__name__} (bound to its event loop)"
    if isinstance(value, asyncio.AbstractEventLoop):
        return "an event loop"
    if isinstance(value, threading.local) or _is_py_local(value):
        return "a threading.local (each thread sees its own values)"
    if _is_sqlite(value):
        return _sqlite_affinity(value)
    kind = type(value)
    top = (kind.__module__ or "").split(".")[0]
    for module, name in _LOOP_BOUND_TYPES:
        if top == module.split(".")[0] and any(c.__name__ == name for c in kind.__mro__):
            return f"a {top}.{name} (bound to the event loop it was made or first used on)"
    if top in _GUI_MODULES:
        return f"a {top} object (bound to the thread that made it)"
    loop = _instance_dict(value).get("_loop")
    if isinstance(loop, asyncio.AbstractEventLoop):
        return f"a {kind.__qualname__} that holds the event loop it was made on"
    return None


def returns_coroutine(fn: Any) -> bool:
    """An `async def`, or a plain `def` around one (a `functools.partial`, a decorator's sync shim that keeps
    `__wrapped__`): fastmcp runs the shim in a thread and awaits the coroutine it returns on the loop."""
    for _ in range(20):
        while isinstance(fn, functools.partial):
            fn = fn.func
        if inspect.iscoroutinefunction(fn):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


# -- what a function reaches --------------------------------------------------------------------------


def _reachable(fn: Any) -> Iterator[tuple[str, Any]]:
    """(name, object) pairs in the reach of `fn`, each object once, at most MAX_OBJECTS."""
    seen: set[int] = set()
    home = _modules_of(fn)
    pending: list[tuple[str, Any, int]] = [(_name(fn), fn, 0)]
    while pending and len(seen) < MAX_OBJECTS:
        where, value, depth = pending.pop()
        if id(value) in seen or _inert(value, home):
            continue
        seen.add(id(value))
        yield where, value
        if depth < 4:
            pending.extend((w, v, depth + 1) for w, v in _children(where, value, fn))


def _children(where: str, value: Any, tool: Any) -> list[tuple[str, Any]]:
    if isinstance(value, functools.partial):
        return [(f"{where}.func", value.func), *_items(where, value.args), *_items(where, value.keywords)]
    if isinstance(value, types.MethodType):
        return [(where, value.__func__), (f"{_name(value.__self__)}", value.__self__)]
    if isinstance(value, types.FunctionType):
        return _of_function(value)
    if isinstance(value, types.ModuleType | type):
        return []  # reached through the names a function uses (`_of_function`), never wholesale
    if isinstance(value, dict | list | tuple | set | frozenset):
        return _items(where, value)
    if (type(value).__module__ or "").startswith(_FRAMEWORKS):
        return []  # the MCP frameworks' own objects: what a tool reaches of them goes through the bridge
    call = vars(type(value)).get("__call__")
    if isinstance(call, types.FunctionType):  # a callable object as the tool: its method and its state
        return [(f"{where}.__call__", call), *_attributes(where, value)]
    return _attributes(where, value)


def _of_function(fn: types.FunctionType) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    wrapped = fn.__dict__.get("__wrapped__")
    if wrapped is not None:
        found.append((_name(wrapped), wrapped))
    code = fn.__code__
    if fn.__closure__:
        for name, cell in zip(code.co_freevars, fn.__closure__, strict=False):
            try:
                found.append((name, cell.cell_contents))
            except ValueError:  # an empty cell
                pass
    found.extend((f"a default of {fn.__name__}", d) for d in (fn.__defaults__ or ()))
    found.extend((f"the default {k}", d) for k, d in (fn.__kwdefaults__ or {}).items())
    names = _names_used(code)
    for name in names:
        if name in fn.__globals__:
            value = fn.__globals__[name]
            found.append((name, value))
            if isinstance(value, types.ModuleType | type):  # `db.conn`, `Store.lock`: the attributes it names
                found.extend((f"{name}.{a}", vars(value)[a]) for a in names if a in vars(value))
    return found


def _names_used(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions, lambdas and comprehensions
        if isinstance(const, types.CodeType):
            names |= _names_used(const)
    return names


def _attributes(where: str, value: Any) -> list[tuple[str, Any]]:
    return [(f"{where}.{k}", v) for k, v in _instance_dict(value).items()]


def _items(where: str, values: Any) -> list[tuple[str, Any]]:
    if isinstance(values, dict):
        return [(f"{where}[{k!r}]", v) for k, v in list(values.items())[:100] if isinstance(k, str | int)]
    return [(f"an item of {where}", v) for v in list(values)[:100]]


def _instance_dict(value: Any) -> dict[str, Any]:
    try:
        found = object.__getattribute__(value, "__dict__")
    except AttributeError:
        return {}
    return found if isinstance(found, dict) else {}


_INERT = (str, bytes, int, float, complex, bool, type(None), range, types.BuiltinFunctionType, types.CodeType)


def _inert(value: Any, home: set[str]) -> bool:
    """Nothing bound to a loop or a thread can hide in it; a library's function isn't followed either (the
    tool's own module is, installed or not: a published server's tools live in site-packages)."""
    if isinstance(value, _INERT):
        return True
    if isinstance(value, types.FunctionType):
        return value.__module__ not in home and _in_library(value.__code__.co_filename)
    return False


def _modules_of(fn: Any) -> set[str]:
    """The modules of `fn` and of what it wraps (partials, bound methods, `__wrapped__` chains)."""
    modules: set[str] = set()
    for _ in range(20):
        while isinstance(fn, functools.partial):
            fn = fn.func
        fn = getattr(fn, "__func__", fn)
        module = getattr(fn, "__module__", None)
        if isinstance(module, str):
            modules.add(module)
        fn = getattr(fn, "__wrapped__", None) if isinstance(fn, types.FunctionType) else None
        if fn is None:
            break
    return modules


def _in_library(filename: str) -> bool:
    return filename.startswith(_LIBRARY_PREFIXES) or filename.startswith("<frozen")


_LIBRARY_PREFIXES = tuple(
    {p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix) if p}
    | {__file__.rsplit("/", 1)[0]}
)
"""The interpreter's own files, installed packages (a venv's site-packages is under `sys.prefix`), and
loopwatch's own: their functions are not followed (the tool's own code, wherever it lives, is)."""


def _name(value: Any) -> str:
    return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__name__


def _is_py_local(value: Any) -> bool:
    module = sys.modules.get("_threading_local")
    return module is not None and isinstance(value, module.local)


def _is_sqlite(value: Any) -> bool:
    sqlite3 = sys.modules.get("sqlite3")
    return sqlite3 is not None and isinstance(value, sqlite3.Connection | sqlite3.Cursor)


def _sqlite_affinity(value: Any) -> str | None:
    """Whether a sqlite3 connection refuses other threads (`check_same_thread`): asked from a new thread."""
    import sqlite3

    connection = value.connection if isinstance(value, sqlite3.Cursor) else value
    refused: list[bool] = []

    def probe() -> None:
        try:
            connection.cursor().close()
            refused.append(False)
        except sqlite3.ProgrammingError as exc:
            refused.append("thread" in str(exc))  # sqlite3's own message, not the tool's; closed: not affine

    thread = threading.Thread(target=probe, name="loopwatch-sqlite-probe", daemon=True)
    thread.start()
    thread.join(5)
    if refused and refused[0]:
        return "a sqlite3 connection made with check_same_thread (usable only in the thread that made it)"
    return None


# -- after the fact --------------------------------------------------------------------------------------


def _bound_checks() -> dict[types.CodeType, str]:
    checks = {asyncio.mixins._LoopBoundMixin._get_loop.__code__: "self"}
    check_thread = getattr(asyncio.BaseEventLoop, "_check_thread", None)
    if isinstance(check_thread, types.FunctionType):
        checks[check_thread.__code__] = "self"
    return checks


_BOUND_CHECKS = _bound_checks()


def server_loop_object(exc: BaseException, server_loop: Any) -> Any:
    """The object bound to `server_loop` that a moved call's exception came from, or None.

    By the exception's type and where it was raised, never its text (a tool's message may say anything):
    asyncio's own loop check (`_LoopBoundMixin._get_loop`, `_check_thread`) raised it for an object of the
    server's loop, or a task refused a future of the server's loop (`RuntimeError` thrown into the
    coroutine awaiting it, whose frame holds the future)."""
    if type(exc) is not RuntimeError or server_loop is None:
        return None
    frame = _innermost(exc)
    if frame is None:
        return None
    holder = _BOUND_CHECKS.get(frame.f_code)
    if holder is not None:
        obj = frame.f_locals.get(holder)
        return obj if obj is server_loop or getattr(obj, "_loop", None) is server_loop else None
    for value in list(frame.f_locals.values()):
        if isinstance(value, asyncio.Future) and value.get_loop() is server_loop:
            return value
    return None


def _innermost(exc: BaseException) -> types.FrameType | None:
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame
