"""loopwatch: find what blocks a Python MCP server's event loop.

    import loopwatch
    handle = loopwatch.instrument(server)   # an mcp Server, MCPServer or fastmcp.FastMCP
    ...
    handle.snapshot()                       # per tool: calls, errors, p50/p99, blocks, blocked seconds

Or with no code change: `loopwatch run server.py`.
"""

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
