"""The MCP integration: one SDK-level middleware for `Server`, `MCPServer` and `fastmcp.FastMCP`.

    import loopwatch
    loopwatch.instrument(server)          # monitoring starts with the server's loop

The middleware times every request and passes everything through unchanged. Its frame holds the
call being served in a local, which the watchdog reads to blame a block on exactly one call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any, Protocol

import anyio

from ._blame import CallRecord, record_from_context, register_call_frame
from ._events import report_text
from ._monitor import Monitor
from ._options import Options
from ._stats import OTHER, ToolNames
from .servers import ServerAdapter, adapter_for

logger = logging.getLogger("loopwatch")

_ATTR = "_loopwatch_handle"


class CallHook(Protocol):
    """What an integration sees of each request, on the loop: keep both methods cheap."""

    def start(self, call: CallRecord) -> None: ...

    def end(self, call: CallRecord, duration: float, error_type: str | None) -> None: ...


class LoopwatchMiddleware:
    """`ServerMiddleware`: `(ctx, call_next) -> result`, for every request and notification."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.stats = monitor.stats
        self.tools = monitor.tools
        self.hooks: tuple[CallHook, ...] = ()
        self.rows = monitor.stats.tools
        self.offloaded: dict[str, str] = {}
        """Tools the offloader moved off the loop (shared with it)."""
        self.executes: dict[str, str] = {}
        """Offloaded tools that run in a process (shared with the offloader); the others run on a thread."""

    async def __call__(self, ctx: Any, call_next: Callable[[Any], Any]) -> Any:
        """Every request. With no call hooks (no traces, no metrics) nothing is allocated per call: the
        watchdog builds the call's record from this frame's locals (`ctx`, `label`, `start`) only when a
        block is sampled (`_read_served`). A per-call object cost more than the rest of the path together
        (measured: 1.7% of an in-memory round trip against 0.2% for the table updates)."""
        request_id = ctx.request_id
        if request_id is None:
            return await call_next(ctx)
        if self.hooks or ctx.method != "tools/call":  # rare methods (initialize, tools/list, ping) keep a record
            return await self._call_with_record(ctx, call_next, request_id)
        params = ctx.params
        name = params.get("name") if params else None
        row = self.rows.get(name) if name.__class__ is str else None  # rows are keyed by label: a known name
        if row is None:
            label, row = self._tool_row(name)
        else:
            label = name
        row.in_flight += 1
        start = perf_counter()
        try:
            result = await call_next(ctx)
        except BaseException:
            row.finish(perf_counter() - start, True)
            raise
        duration = perf_counter() - start
        error = result.get("isError") is True if result.__class__ is dict else _is_tool_error(result)
        row.in_flight -= 1  # CallStats.finish, inlined: this is every call's path
        row.calls += 1
        row.errors += error
        row.durations.append(duration)
        if label == OTHER and not error and name.__class__ is str and self.tools.learns_from_success:
            self.tools.admit(report_text(name))
        return result

    def _tool_row(self, name: Any) -> tuple[str, Any]:
        """The label and stats row of a tools/call name, looked up the long way (a new, unknown or odd name)."""
        label = self.tools.label(name)
        return label, self.rows.get(label) or self.stats.tool(label)

    async def _call_with_record(self, ctx: Any, call_next: Callable[[Any], Any], request_id: Any) -> Any:
        """Every request while an integration watches calls (traces, metrics), whose hooks see a CallRecord, and
        every request other than tools/call."""
        method = ctx.method
        if method == "tools/call":
            name = ctx.params.get("name") if ctx.params else None
            label, row = self._tool_row(name)
            raw = report_text(name) if isinstance(name, str) else None
            _lw_call = CallRecord(method, raw, request_id, ctx, label)
            if label in self.offloaded:
                _lw_call.execution = self.executes.get(label, "thread")
        else:
            label = ""
            _lw_call = CallRecord(method, None, request_id, ctx)
            row = self.stats.method(_lw_call.method)  # cut: a client may send a megabyte of method name
        hooks = self.hooks
        for hook in hooks:
            try:
                hook.start(_lw_call)
            except Exception:
                self._drop_hook(hook)
        row.in_flight += 1
        _lw_call.started = start = perf_counter()
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            duration = perf_counter() - start
            row.finish(duration, True)
            self._end_hooks(hooks, _lw_call, duration, error_type(exc))
            raise
        duration = perf_counter() - start
        error = bool(label) and (result.get("isError") is True if result.__class__ is dict else _is_tool_error(result))
        row.finish(duration, error)
        self._end_hooks(hooks, _lw_call, duration, "tool_error" if error else None)
        if label:
            if label == OTHER and not error and self.tools.learns_from_success and _lw_call.tool:
                self.tools.admit(_lw_call.tool)
        elif method == "tools/list":
            self.tools.admit_all(_listed_names(result))
        return result

    def _end_hooks(self, hooks: tuple[CallHook, ...], call: CallRecord, duration: float, error: str | None) -> None:
        for hook in hooks:
            try:
                hook.end(call, duration, error)
            except Exception:
                self._drop_hook(hook)

    def _drop_hook(self, hook: CallHook) -> None:
        """A hook that raises never reaches the call: it is logged once and removed."""
        if hook in self.hooks:
            logger.exception("call hook %r raised; it is removed", hook)
            self.remove_hook(hook)

    def add_hook(self, hook: CallHook) -> None:
        self.hooks = (*self.hooks, hook)

    def remove_hook(self, hook: CallHook) -> None:
        self.hooks = tuple(h for h in self.hooks if h is not hook)


def error_type(exc: BaseException) -> str:
    """The OpenTelemetry `error.type`: the JSON-RPC code as a string, or the exception's name."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return str(code)
    if type(exc).__name__ == "ValidationError":
        return "-32602"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return type(exc).__qualname__


def _read_served(frame: Any) -> CallRecord | None:
    """The call a `LoopwatchMiddleware.__call__` frame serves, from its locals (on the watchdog thread, only
    while a block is sampled)."""
    try:
        local = frame.f_locals
    except Exception:
        return None
    if "start" not in local:  # not yet timing, or handed to `_call_with_record` (read first)
        return None
    call = record_from_context(local.get("ctx"))
    if call is None:
        return None
    call.started = local["start"]
    label = local.get("label")
    if isinstance(label, str) and label:
        call.label = label
        middleware = local.get("self")
        if label in getattr(middleware, "offloaded", ()):
            call.execution = getattr(middleware, "executes", {}).get(label, "thread")
    return call


register_call_frame(LoopwatchMiddleware.__call__.__code__, _read_served)
register_call_frame(LoopwatchMiddleware._call_with_record.__code__)


def _is_tool_error(result: Any) -> bool:
    """Whether a tools/call result is a tool error: a dict's `isError`; a model's `is_error` (mcp 2.x) or
    `isError` (1.x), inside the `root` of mcp 1.x's ServerResult. Each class's shape is found once
    (`_shape_of`): a pydantic model raises inside its `__getattr__` for a name it lacks, and asking every
    call for the other era's name cost 4.8 us a call on mcp 1.x and 9 us on a 2.x model (in place of 0.2)."""
    if isinstance(result, dict):
        return result.get("isError") is True
    shape = _RESULT_SHAPES.get(result.__class__) or _shape_of(result)
    if shape[0]:  # mcp 1.x handlers answer a ServerResult around the result
        result = result.root
        shape = _RESULT_SHAPES.get(result.__class__) or _shape_of(result)
    flag = shape[1]
    return flag is not None and getattr(result, flag, False) is True


_RESULT_SHAPES: dict[type, tuple[bool, str | None]] = {}
"""Result class -> (it wraps the result in `root`, the name of its error flag or None). Bounded (`_shape_of`)."""


def _shape_of(result: Any) -> tuple[bool, str | None]:
    wraps = hasattr(result, "root")
    flag = next((name for name in ("is_error", "isError") if hasattr(result, name)), None)
    shape = (wraps and flag is None, flag)
    if len(_RESULT_SHAPES) < 256:  # a server answering with ever new classes is read the slow way past that
        _RESULT_SHAPES[result.__class__] = shape
    return shape


def _listed_names(result: Any) -> list[Any]:
    result = getattr(result, "root", result)
    tools = result.get("tools") if isinstance(result, dict) else getattr(result, "tools", None)
    if not isinstance(tools, list):
        return []
    return [t.get("name") if isinstance(t, dict) else getattr(t, "name", None) for t in tools]


# -- server kinds -------------------------------------------------------------------------------------


def lowlevel_server(server: Any) -> Any:
    """The SDK `Server` whose lifespan (and middleware seam) every kind of server runs through."""
    return adapter_for(server).lowlevel


def server_kind(server: Any) -> str:
    """`lowlevel`, `mcpserver` or `fastmcp`: the shape of the server's tool registry."""
    return adapter_for(server).kind


def _tool_files(adapter: ServerAdapter) -> Callable[[str], str | None]:
    """Where a tool's function is defined, by name: blame's "own code" (a low-level server: its handler)."""
    import inspect

    def file(name: str) -> str | None:
        try:
            code = getattr(inspect.unwrap(adapter.tool_fn(name)), "__code__", None)
        except Exception:
            return None
        return code.co_filename if code is not None else None

    return file


# -- the handle ---------------------------------------------------------------------------------------


class Handle:
    """What `instrument()` returns: read the numbers, listen to events, undo it."""

    def __init__(self, server: Any, adapter: ServerAdapter, monitor: Monitor) -> None:
        self.server = server
        self.monitor = monitor
        self.middleware = LoopwatchMiddleware(monitor)
        self.adapter = adapter
        """The server's family: its seam, tools and transports (`loopwatch.servers`)."""
        lowlevel = self._lowlevel = adapter.lowlevel
        self._original_lifespan = lowlevel.lifespan
        self.extensions: list[Any] = []
        self.routes: list[Any] = []
        """Starlette routes an integration adds to the server's own HTTP app (`loopwatch run`)."""
        self.transport: str | None = None
        """How clients reach the server (`stdio`, `streamable-http`, `sse`), when the runner knows: announced."""

    @property
    def options(self) -> Options:
        return self.monitor.options

    def snapshot(self) -> dict[str, Any]:
        return self.monitor.snapshot()

    def add_listener(self, listener: Callable[[Any], None]) -> None:
        self.monitor.add_listener(listener)

    def remove_listener(self, listener: Callable[[Any], None]) -> None:
        self.monitor.remove_listener(listener)

    @property
    def offload(self) -> Any:
        """The offload controller, or None when offload is off."""
        return next((e for e in self.extensions if type(e).__name__ == "Offloader"), None)

    def set_tool_policy(self, tool: str, policy: str) -> None:
        """`always` moves a tool off the loop now (to a thread), `process` to a worker process, `never` pins it on
        the loop, `auto` lets blocks decide.

        Raises RuntimeError when offload is off (`offload="off"`), ValueError for an unknown policy.
        """
        if policy not in ("auto", "never", "always", "process"):
            raise ValueError(f"policy must be auto, never, always or process, not {policy!r}")
        if self.offload is None:
            raise RuntimeError("offload is off: start with offload='auto' (--offload auto)")
        self.offload.set_policy(tool, policy, reason="manual")

    def _install(self) -> None:
        self.adapter.install(self.middleware)
        original, monitor = self._original_lifespan, self.monitor

        def lifespan(server: Any) -> Any:
            return _monitored(monitor, original(server))

        lifespan._loopwatch_original = original  # type: ignore[attr-defined]
        self._lowlevel.lifespan = lifespan
        setattr(self._lowlevel, _ATTR, self)

    def uninstrument(self) -> None:
        """Remove the middleware and the lifespan hook. Safe to call twice."""
        self.adapter.remove(self.middleware)
        if getattr(self._lowlevel.lifespan, "_loopwatch_original", None) is self._original_lifespan:
            self._lowlevel.lifespan = self._original_lifespan
        if getattr(self._lowlevel, _ATTR, None) is self:
            delattr(self._lowlevel, _ATTR)
        for extension in reversed(self.extensions):
            close = getattr(extension, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # one failing integration must not keep the others (and their threads) alive
                    logger.exception("closing %r raised; the other integrations still close", extension)
        self.extensions.clear()
        self.monitor.stop_watching()  # a running server is no longer watched from now on, not from its end


@asynccontextmanager
async def _monitored(monitor: Monitor, inner: Any) -> AsyncIterator[Any]:
    async with monitor.running(), inner as state:
        yield state


def instrument(server: Any, **options: Any) -> Handle:
    """Watch `server`'s event loop whenever it runs. Returns a handle; calling again returns the same one."""
    adapter = adapter_for(server)
    existing = getattr(adapter.lowlevel, _ATTR, None)
    if existing is not None:
        if options and Options.build(**options) != existing.options:
            logger.warning("server already instrumented; the new options are ignored")
        return existing
    opts = Options.build(**options)
    monitor = Monitor(opts, ToolNames(opts.max_tools, adapter.registered()))
    monitor.where = adapter.where
    monitor.tool_file = _tool_files(adapter)
    if monitor._writer is not None:  # events lines name their server (several may share a file)
        monitor._writer.context["server"] = getattr(server, "name", None)
    handle = Handle(server, adapter, monitor)
    if not adapter.supported:  # an SDK loopwatch can't watch: say so once, and let the server run as it is
        logger.warning("%s", adapter.problem)
        setattr(adapter.lowlevel, _ATTR, handle)
        return handle
    handle._install()
    from ._extensions import install_extensions

    try:
        install_extensions(handle)
    except BaseException:
        handle.uninstrument()  # a refused option or a missing extra leaves the server as it was
        raise
    return handle


def handle_of(server: Any) -> Handle | None:
    return getattr(adapter_for(server).lowlevel, _ATTR, None)
