"""mcp 2.x: the low-level `Server` and `MCPServer`, both watched through the SDK's middleware list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import Divert
from ._base import Adapter, MiddlewareList


def adapter(server: Any) -> Adapter | None:
    inner = getattr(server, "_lowlevel_server", None)
    if inner is not None and hasattr(inner, "middleware"):
        return MCPServerAdapter(server, inner)
    if hasattr(server, "middleware") and hasattr(server, "lifespan") and hasattr(server, "run"):
        return LowlevelAdapter(server, server)
    return None


class LowlevelAdapter(MiddlewareList, Adapter):
    """One `tools/call` handler serves every tool: offload routes that handler's calls by tool name."""

    family = "mcp2-lowlevel"
    kind = "lowlevel"

    def __init__(self, server: Any, lowlevel: Any) -> None:
        super().__init__(server, lowlevel)
        self.router = ToolRouter(lowlevel)

    def tool_fn(self, name: str) -> Any:
        return self.router.handler()

    def can_move(self, name: str) -> bool:
        return True

    def swap_tool(self, name: str, divert: Divert) -> Callable[[], None] | None:
        return self.router.divert(name, divert)

    def restore_tools(self) -> None:
        self.router.close()

    async def serve_stdio(self) -> None:
        from mcp.server.stdio import stdio_server

        server = self.server
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    def http_app(self, transport: str, host: str) -> Any:
        if transport == "streamable-http":
            return self.server.streamable_http_app(host=host)
        return sse_app(self.server, host)


class MCPServerAdapter(MiddlewareList, Adapter):
    """`MCPServer` (the 1.x FastMCP, renamed): plain `def` tools already run on worker threads."""

    family = "mcp2-mcpserver"
    kind = "mcpserver"

    def registered(self) -> Callable[[str], bool] | None:
        return lambda name: self.find_tool(name) is not None

    def find_tool(self, name: str) -> Any:
        return self.server._tool_manager.get_tool(name)

    def where(self, name: str) -> str:
        tool = self.find_tool(name)
        return "thread" if tool is not None and not tool.is_async else "loop"

    def can_move(self, name: str) -> bool:
        tool = self.find_tool(name)
        return tool is not None and bool(tool.is_async)

    async def serve_stdio(self) -> None:
        await self.server.run_stdio_async()

    def http_app(self, transport: str, host: str) -> Any:
        if transport == "streamable-http":
            return self.server.streamable_http_app(host=host)
        return self.server.sse_app(host=host)


class ToolRouter:
    """The low-level `tools/call` handler, wrapped once: a diverted tool's calls run `divert(handler)`."""

    def __init__(self, lowlevel: Any) -> None:
        self.lowlevel = lowlevel
        self.routes: dict[str, Callable[..., Any]] = {}
        self._entry: Any = None

    def _table(self) -> dict[str, Any] | None:
        handlers = getattr(self.lowlevel, "_request_handlers", None)
        return handlers if isinstance(handlers, dict) else None

    def handler(self) -> Any:
        entry = self._entry or (self._table() or {}).get("tools/call")
        return getattr(entry, "handler", None)

    def divert(self, name: str, divert: Divert) -> Callable[[], None] | None:
        original = self.handler()
        if original is None or not self._wrap():
            return None
        self.routes[name] = divert(original)
        return lambda: self.routes.pop(name, None)

    def _wrap(self) -> bool:
        if self._entry is not None:
            return True
        table = self._table()
        entry = table.get("tools/call") if table is not None else None
        if entry is None:
            return False
        original, routes = entry.handler, self.routes

        async def handler(ctx: Any, params: Any) -> Any:
            route = routes.get(getattr(params, "name", None))
            return await (original if route is None else route)(ctx, params)

        self._entry = entry
        table["tools/call"] = type(entry)(entry.params_type, handler)
        return True

    def close(self) -> None:
        table = self._table()
        if self._entry is not None and table is not None:
            table["tools/call"] = self._entry
        self._entry = None
        self.routes.clear()


def sse_app(server: Any, host: str = "127.0.0.1") -> Any:
    """A Starlette app serving a low-level server over SSE (the SDK gives HTTP only to MCPServer)."""
    from mcp.server.sse import SseServerTransport
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    security = rebinding_protection(host)
    sse = SseServerTransport("/messages/", security_settings=security) if security else SseServerTransport("/messages/")

    async def handle_sse(request: Any) -> Response:
        async with sse.connect_sse(request.scope, request.receive, request._send) as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return Response()

    routes = [Route("/sse", endpoint=handle_sse, methods=["GET"]), Mount("/messages/", app=sse.handle_post_message)]
    return Starlette(routes=routes)


def rebinding_protection(host: str) -> Any:
    """The DNS-rebinding protection the SDK's own apps turn on for a loopback host: 421 for a foreign Host."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        from mcp.server.transport_security import TransportSecuritySettings
    except ImportError:  # an SDK from before the protection
        return None
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
