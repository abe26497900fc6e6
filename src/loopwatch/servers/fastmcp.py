"""The `fastmcp` package: 4.x on mcp 2.x (the middleware list), 2.x and 3.x on mcp 1.x (the handler table).

fastmcp 3.x and 4.x keep tools in `_local_provider` and run sync tools in a thread unless `run_in_thread=False`;
fastmcp 2.x keeps them in `_tool_manager._tools` and runs sync tools inline, on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._base import Adapter, MiddlewareList, is_sync, made_by
from .mcp1 import HandlerTable


def adapter(server: Any) -> Adapter | None:
    inner = getattr(server, "_mcp_server", None)
    if inner is None or not made_by(server, "fastmcp"):
        return None
    if hasattr(inner, "middleware"):
        return FastMCP4(server, inner)
    if isinstance(getattr(inner, "request_handlers", None), dict):
        return (FastMCP3 if hasattr(server, "_local_provider") else FastMCP2)(server, inner)
    return None


class Tools(Adapter):
    """fastmcp's tool registry, shared by its generations."""

    kind = "fastmcp"

    def tools(self) -> list[Any]:
        provider = getattr(self.server, "_local_provider", None)
        components = getattr(provider, "_components", None)
        if not isinstance(components, dict):
            return []
        return [c for c in list(components.values()) if type(c).__name__.endswith("Tool")]

    def find_tool(self, name: str) -> Any:
        return next((t for t in self.tools() if getattr(t, "name", None) == name), None)

    def registered(self) -> Callable[[str], bool] | None:
        return lambda name: self.find_tool(name) is not None

    def where(self, name: str) -> str:
        tool = self.find_tool(name)
        fn = getattr(tool, "fn", None)
        return "thread" if is_sync(fn) and self.threads_sync(tool) else "loop"

    def threads_sync(self, tool: Any) -> bool:
        return bool(getattr(tool, "run_in_thread", True))

    def can_move(self, name: str) -> bool:
        tool = self.find_tool(name)
        fn = getattr(tool, "fn", None)
        from .._offload_check import returns_coroutine  # a sync shim around an async def moves too

        return fn is not None and (returns_coroutine(fn) or not self.threads_sync(tool))

    async def serve_stdio(self) -> None:
        await self.server.run_stdio_async(show_banner=False)

    def http_app(self, transport: str, host: str) -> Any:
        return self.server.http_app(transport="http" if transport == "streamable-http" else "sse")


class FastMCP4(MiddlewareList, Tools):
    """fastmcp removes the SDK's OpenTelemetryMiddleware (it opens its own spans) and appends its dispatch."""

    family = "fastmcp4"


class OnMcp1(HandlerTable, Tools):
    def http_app(self, transport: str, host: str) -> Any:
        return self.watched_app(super().http_app(transport, host))


class FastMCP3(OnMcp1):
    """fastmcp 3.x opens a SERVER span of its own (`fastmcp.server.telemetry.server_span`, on the global tracer
    provider) inside `FastMCP.call_tool`, `read_resource`, `get_prompt` and the lists, after its own middleware:
    inside loopwatch's seam, so it is not current when loopwatch's middleware runs. Traces enrich that span
    instead of opening a second one (`framework_spans`)."""

    family = "fastmcp3"
    span_methods = frozenset(
        {
            "tools/call",
            "tools/list",
            "resources/read",
            "resources/list",
            "resources/templates/list",
            "prompts/get",
            "prompts/list",
        }
    )

    def framework_spans(self, enter: Callable[[Any], Any]) -> Callable[[], None] | None:
        """Run `enter(span)` (a context manager) inside each span fastmcp 3 opens, until the undo is called.
        None when this fastmcp has no such opener (loopwatch then opens its own spans)."""
        return _span_opener.wrap(enter)


class _SpanOpener:
    """`fastmcp.server.server.server_span`, wrapped once per process while any server's traces need it (the
    module global is looked up at each call: every fastmcp 3 server in the process goes through it)."""

    def __init__(self) -> None:
        self.users: list[Callable[[Any], Any]] = []
        self.original: Any = None

    def wrap(self, enter: Callable[[Any], Any]) -> Callable[[], None] | None:
        try:
            import fastmcp.server.server as module
        except ImportError:
            return None
        if self.original is None:
            original = getattr(module, "server_span", None)
            if original is None or not callable(original):
                return None
            self.original = original
            module.server_span = self._opener(original)
        self.users.append(enter)

        def undo() -> None:
            if enter in self.users:
                self.users.remove(enter)
            if not self.users and self.original is not None:
                module.server_span = self.original
                self.original = None

        return undo

    def _opener(self, original: Any) -> Any:
        import contextlib

        users = self.users

        @contextlib.contextmanager
        def server_span(*args: Any, **kwargs: Any) -> Any:
            with original(*args, **kwargs) as span:
                if not users:
                    yield span
                    return
                with users[0](span):
                    yield span

        server_span.__wrapped__ = original  # type: ignore[attr-defined]
        return server_span


_span_opener = _SpanOpener()


class FastMCP2(OnMcp1):
    """fastmcp 2.x: sync tools run inline, on the loop: every tool can block it, and every tool can move."""

    family = "fastmcp2"

    def tools(self) -> list[Any]:
        manager = getattr(self.server, "_tool_manager", None)
        tools = getattr(manager, "_tools", None)
        return list(tools.values()) if isinstance(tools, dict) else []

    def threads_sync(self, tool: Any) -> bool:
        return False
