"""loopwatch: find what blocks a Python MCP server's event loop.

    import loopwatch
    handle = loopwatch.instrument(server)   # an mcp Server, MCPServer or fastmcp.FastMCP
    ...
    handle.snapshot()                       # per tool: calls, errors, p50/p99, blocks, blocked seconds

Or with no code change: `loopwatch run server.py`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._events import BlockEvent as BlockEvent
    from ._events import Frame as Frame
    from ._events import OffloadEvent as OffloadEvent
    from ._monitor import Monitor as Monitor
    from ._options import OptionError as OptionError
    from ._options import Options as Options
    from ._watch import watch as watch
    from .mcp import Handle as Handle
    from .mcp import LoopwatchMiddleware as LoopwatchMiddleware
    from .mcp import instrument as instrument

# name -> the module defining it, imported on first use: `loopwatch run -- COMMAND` (the launcher, and the
# start-up hook in every process of the command) imports this package without the SDK or anyio.
_LAZY = {
    "BlockEvent": "._events",
    "Frame": "._events",
    "OffloadEvent": "._events",
    "Monitor": "._monitor",
    "OptionError": "._options",
    "Options": "._options",
    "watch": "._watch",
    "Handle": ".mcp",
    "LoopwatchMiddleware": ".mcp",
    "instrument": ".mcp",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'loopwatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = (
    "BlockEvent",
    "Frame",
    "Handle",
    "LoopwatchMiddleware",
    "Monitor",
    "OffloadEvent",
    "OptionError",
    "Options",
    "instrument",
    "watch",
    "__version__",
)
