"""One adapter per server family: where loopwatch's middleware goes, what the tools are, how the server serves.

    from loopwatch.servers import adapter_for
    adapter = adapter_for(server)        # TypeError for an object that is no MCP server

The middleware, offload, traces and the CLI ask the adapter instead of testing server classes. A family is the
SDK generation (the seam: mcp 2.x's middleware list, mcp 1.x's request-handler table) and the framework on it
(its tool registry, how a tool's callable is swapped, how it serves stdio and HTTP):

| family           | module       | seam                 | tools                                   |
|------------------|--------------|----------------------|-----------------------------------------|
| `mcp2-lowlevel`  | `mcp2.py`    | `Server.middleware`  | one `tools/call` handler                |
| `mcp2-mcpserver` | `mcp2.py`    | `Server.middleware`  | `MCPServer._tool_manager`; def -> thread |
| `fastmcp4`       | `fastmcp.py` | `Server.middleware`  | `_local_provider`; `run_in_thread`      |
| `mcp1-lowlevel`  | `mcp1.py`    | `request_handlers`   | one `tools/call` handler                |
| `fastmcp1`       | `mcp1.py`    | `request_handlers`   | `FastMCP._tool_manager`; def inline     |
| `fastmcp2`       | `fastmcp.py` | `request_handlers`   | `_tool_manager._tools`; def inline      |
| `fastmcp3`       | `fastmcp.py` | `request_handlers`   | `_local_provider`; `run_in_thread`      |

A server on an SDK loopwatch can't watch (mcp 0.x, a future 3.x) still gets the adapter of its closest family
for serving, with `supported` False and `problem` the one line to tell the user.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, Protocol

SUPPORTED = "mcp 1.24 up to the last 1.x, and mcp 2.x (fastmcp 2.x, 3.x on mcp 1.x; fastmcp 4.x on mcp 2.x)"
Divert = Callable[[Callable[..., Any]], Callable[..., Any]]
"""Given a tool's callable, the callable to run in its place (offload's router)."""


class ServerAdapter(Protocol):
    family: str
    kind: str
    """The shape of the tool registry: `lowlevel`, `mcpserver` or `fastmcp` (what offload and blame tell)."""
    server: Any
    lowlevel: Any
    """The SDK `Server` underneath: it owns the lifespan (where watching starts) and the handle."""
    supported: bool
    problem: str

    def install(self, middleware: Any) -> None: ...
    def remove(self, middleware: Any) -> None: ...
    def chain(self) -> list[Any]:
        """The middleware list loopwatch's middleware sits in, outermost first (traces insert theirs)."""
        ...

    def registered(self) -> Callable[[str], bool] | None: ...
    def where(self, name: str) -> str:
        """`loop` or `thread`: where the framework runs this tool's calls by itself."""
        ...

    def tool_fn(self, name: str) -> Any: ...
    def can_move(self, name: str) -> bool: ...
    def swap_tool(self, name: str, divert: Divert) -> Callable[[], None] | None:
        """Run `divert(original)` in place of the tool's callable; returns the undo, or None (no such tool)."""
        ...

    def restore_tools(self) -> None: ...

    async def serve_stdio(self) -> None: ...
    def http_app(self, transport: str, host: str) -> Any: ...


def sdk_version() -> str:
    try:
        return importlib.metadata.version("mcp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def version_problem(version: str) -> str:
    """The one line for an SDK loopwatch can't watch, or "" when it can."""
    if version == "unknown" or (1, 24) <= version_tuple(version) < (3,):
        return ""
    return f"mcp {version} found; supported: {SUPPORTED}. The server runs unwatched."


def adapter_for(server: Any, version: str | None = None) -> ServerAdapter:
    """The adapter of `server`'s family. TypeError when it is no MCP server loopwatch knows."""
    version = sdk_version() if version is None else version
    from . import fastmcp, mcp1, mcp2

    for module in (fastmcp, mcp2, mcp1):
        adapter = module.adapter(server)
        if adapter is not None:
            adapter.problem = version_problem(version)
            adapter.supported = not adapter.problem
            return adapter
    raise TypeError(
        f"loopwatch cannot instrument {type(server).__module__}.{type(server).__qualname__}: expected an mcp "
        f"Server, an MCPServer, a FastMCP (mcp.server.fastmcp) or a fastmcp.FastMCP ({SUPPORTED})"
    )
