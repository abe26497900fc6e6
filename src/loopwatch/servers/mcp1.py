"""mcp 1.x: the low-level `Server` and FastMCP 1 (`mcp.server.fastmcp`), watched through the handler table.

mcp 1.x has no middleware list. `Server._handle_request` sets the `request_ctx` context variable, looks the
request's handler up with `self.request_handlers.get(type(req))`, awaits it and turns what it raises into the
error response. loopwatch swaps that dict for one whose `get` hands out the handler wrapped in loopwatch's
chain (the same `(ctx, call_next)` middleware as on mcp 2.x, given a `LegacyContext` in place of 2.x's
`ServerRequestContext`): every request with a handler is timed, handler exceptions pass through it as raised,
and a block is blamed through the middleware's own frame, as on 2.x. Handlers registered later (the dict
keeps taking them) are watched too. `initialize` (answered by the session itself) and methods without a
handler never reach the table, so they are not timed on 1.x.

This module imports nothing from mcp at import time: it loads on mcp 2.x as well.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import Divert
from ._base import Adapter, made_by


def adapter(server: Any) -> Adapter | None:
    inner = getattr(server, "_mcp_server", None)
    if inner is not None and made_by(server, "mcp.server.fastmcp"):
        return FastMCP1(server, inner) if _has_table(inner) else None
    if _has_table(server) and hasattr(server, "lifespan") and hasattr(server, "run"):
        return LowlevelAdapter(server, server)
    return None


def _has_table(server: Any) -> bool:
    return isinstance(getattr(server, "request_handlers", None), dict) and not hasattr(server, "middleware")


# -- the seam -----------------------------------------------------------------------------------------


class ParamsView:
    """A request's pydantic params read like 2.x's raw params mapping (`get("name")`), without copying."""

    __slots__ = ("_params",)

    def __init__(self, params: Any) -> None:
        self._params = params

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self._params, key, default)
        return str(value) if key == "uri" and value is not None else value


class LegacyContext:
    """What loopwatch's middleware and blame read of a request (`ServerRequestContext` on 2.x), on 1.x."""

    __slots__ = ("method", "params", "request_id", "request", "session", "lifespan_context", "_rc")

    def __init__(self, req: Any, rc: Any) -> None:
        self.method = getattr(req, "method", None)
        params = getattr(req, "params", None)
        self.params = ParamsView(params) if params is not None else None
        self._rc = rc
        self.request_id = getattr(rc, "request_id", None)
        self.request = getattr(rc, "request", None)
        self.session = getattr(rc, "session", None)
        self.lifespan_context = getattr(rc, "lifespan_context", None)

    @property
    def meta(self) -> dict[str, Any] | None:
        """`params._meta` as a mapping (it carries `traceparent`)."""
        meta = getattr(self._rc, "meta", None)
        if meta is None:
            return None
        dump = getattr(meta, "model_dump", None)
        return dump(by_alias=True, exclude_none=True) if dump is not None else dict(meta)

    @property
    def protocol_version(self) -> str | None:
        client = getattr(self.session, "client_params", None)
        return getattr(client, "protocolVersion", None)


class WatchedHandlers(dict):  # type: ignore[type-arg]
    """`Server.request_handlers`, stored as registered; `get` (the SDK's one lookup per request) wraps them."""

    def __init__(self, handlers: dict[Any, Any]) -> None:
        super().__init__(handlers)
        self.chain: list[Any] = []
        self._wrapped: dict[Any, tuple[Any, Any]] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        handler = dict.get(self, key, default)
        if handler is None or not self.chain:
            return handler
        cached = self._wrapped.get(key)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[key] = (handler, self._watch(handler))
        return cached[1]

    def _watch(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        from mcp.server.lowlevel.server import request_ctx

        chain = self.chain

        async def watched(req: Any) -> Any:
            ctx = LegacyContext(req, request_ctx.get(None))
            call: Callable[[Any], Any] = lambda _ctx: handler(req)  # noqa: E731
            for middleware in reversed(chain):
                call = _link(middleware, call)
            return await call(ctx)

        return watched


def _link(middleware: Any, call_next: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda ctx: middleware(ctx, call_next)


class HandlerTable:
    """The seam of every family on mcp 1.x (the low-level Server, FastMCP 1, fastmcp 2.x and 3.x)."""

    lowlevel: Any

    def chain(self) -> list[Any]:
        return self._table().chain

    def _table(self) -> WatchedHandlers:
        table = self.lowlevel.request_handlers
        if not isinstance(table, WatchedHandlers):
            table = WatchedHandlers(table)
            self.lowlevel.request_handlers = table
            experimental = getattr(self.lowlevel, "_experimental_handlers", None)
            if getattr(experimental, "_request_handlers", None) is not None:  # it registers task handlers later
                experimental._request_handlers = table
        return table

    def install(self, middleware: Any) -> None:
        self._table().chain.insert(0, middleware)

    def remove(self, middleware: Any) -> None:
        table = self.lowlevel.request_handlers
        if isinstance(table, WatchedHandlers) and middleware in table.chain:
            table.chain.remove(middleware)

    def watched_app(self, app: Any) -> Any:
        """Watch for the HTTP app's whole life: on 1.x each HTTP session enters the server's lifespan anew."""
        from ..mcp import handle_of

        handle = handle_of(self.server)  # type: ignore[attr-defined]
        router = getattr(app, "router", None)
        if handle is None or router is None:
            return app
        inner = router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            async with handle.monitor.running(), inner(app) as state:
                yield state

        router.lifespan_context = lifespan
        return app


# -- the families -------------------------------------------------------------------------------------


class LowlevelAdapter(HandlerTable, Adapter):
    """The 1.x low-level Server: one `tools/call` handler (`@server.call_tool()`) serves every tool."""

    family = "mcp1-lowlevel"
    kind = "lowlevel"

    def __init__(self, server: Any, lowlevel: Any) -> None:
        super().__init__(server, lowlevel)
        self.routes: dict[str, Callable[..., Any]] = {}
        self._original: Any = None

    def _call_tool_key(self) -> Any:
        import mcp.types

        return mcp.types.CallToolRequest

    def _handler(self) -> Any:
        return self._original or dict.get(self.lowlevel.request_handlers, self._call_tool_key())

    def tool_fn(self, name: str) -> Any:
        """The function the user registered, inside the SDK's validating handler."""
        handler = self._handler()
        try:
            return inspect.getclosurevars(handler).nonlocals.get("func", handler)
        except (TypeError, ValueError):
            return handler

    def can_move(self, name: str) -> bool:
        return True

    def swap_tool(self, name: str, divert: Divert) -> Callable[[], None] | None:
        """The call runs, context and all, where `divert` puts it: the request context travels as an
        argument (so offload bridges it back to the server's loop) and is set again there."""
        from mcp.server.lowlevel.server import request_ctx

        original = self._handler()
        if original is None:
            return None
        if self._original is None:
            self._original = original
            self.lowlevel.request_handlers[self._call_tool_key()] = self._routed(original)

        async def in_context(rc: Any, req: Any) -> Any:
            token = request_ctx.set(rc)
            try:
                return await original(req)
            finally:
                request_ctx.reset(token)

        self.routes[name] = divert(in_context)
        return lambda: self.routes.pop(name, None)

    def _routed(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        from mcp.server.lowlevel.server import request_ctx

        routes = self.routes

        async def handler(req: Any) -> Any:
            route = routes.get(getattr(req.params, "name", None))
            return await (original(req) if route is None else route(request_ctx.get(), req))

        return handler

    def restore_tools(self) -> None:
        if self._original is not None:
            self.lowlevel.request_handlers[self._call_tool_key()] = self._original
            self._original = None
        self.routes.clear()

    async def serve_stdio(self) -> None:
        from mcp.server.stdio import stdio_server

        server = self.server
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    def http_app(self, transport: str, host: str) -> Any:
        from .mcp2 import sse_app

        app = streamable_app(self.server, host) if transport == "streamable-http" else sse_app(self.server, host)
        return self.watched_app(app)


class FastMCP1(HandlerTable, Adapter):
    """FastMCP 1 runs plain `def` tools inline, on the loop: every tool can block it, and every tool can move."""

    family = "fastmcp1"
    kind = "mcpserver"

    def registered(self) -> Callable[[str], bool] | None:
        return lambda name: self.find_tool(name) is not None

    def find_tool(self, name: str) -> Any:
        return self.server._tool_manager.get_tool(name)

    async def serve_stdio(self) -> None:
        await self.server.run_stdio_async()

    def http_app(self, transport: str, host: str) -> Any:
        app = self.server.streamable_http_app() if transport == "streamable-http" else self.server.sse_app()
        return self.watched_app(app)


def streamable_app(server: Any, host: str = "127.0.0.1") -> Any:
    """Streamable HTTP at /mcp for a 1.x low-level server (the SDK builds it only for FastMCP), with the
    SDK's DNS-rebinding protection on a loopback host, as FastMCP 1 has it."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.routing import Route

    from .mcp2 import rebinding_protection

    manager = StreamableHTTPSessionManager(app=server, security_settings=rebinding_protection(host))

    class Endpoint:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", endpoint=Endpoint())], lifespan=lifespan)


# -- blame without loopwatch's middleware (`watch()`) ---------------------------------------------------


def _read_request_frame(frame: Any) -> Any:
    from .._blame import CallRecord
    from .._events import report_text

    try:
        local = frame.f_locals
    except Exception:
        return None
    req, message = local.get("req"), local.get("message")
    method = getattr(req, "method", None)
    if not isinstance(method, str):
        return None
    name = getattr(getattr(req, "params", None), "name", None) if method == "tools/call" else None
    tool = report_text(name) if isinstance(name, str) else None  # cut and escaped, as every client-chosen string
    # The request object stands for the call: samples of one request agree on it (`call_key`).
    return CallRecord(method, tool, getattr(message, "request_id", None), req)


def register_sdk_frames() -> None:
    """On mcp 1.x, blame through `Server._handle_request`: servers watched with `watch()` are blamed too."""
    from .._blame import register_call_frame

    try:
        from mcp.server.lowlevel.server import Server
    except Exception:
        return
    code = getattr(getattr(Server, "_handle_request", None), "__code__", None)
    if code is not None:
        register_call_frame(code, _read_request_frame)
