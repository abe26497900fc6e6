"""Seven tools that block the loop, each its own way, and one honest tool (benchmarks/bench_blame.py)."""

import subprocess
import sys
import threading
import urllib.request

import anyio
from mcp.server.mcpserver import MCPServer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import helpers  # noqa: E402

mcp = MCPServer("blame-workload")
URL = {"value": ""}
LOCK = threading.Lock()
NATIVE_N = 15_000_000
CRUNCH_N = 6_000_000
"""About 0.3 s like the other blockers (0.26 s on a quiet core here): 2,000,000 took 86 to 160 ms, so on a
quiet machine the crunch was at or under the 0.1 s threshold, no block at all (`--crunch` sets it)."""


@mcp.tool()
async def ping(n: int = 0) -> int:
    await anyio.sleep(0.02)
    return n


@mcp.tool()
async def sleeper(key: str = "a") -> dict:
    return helpers.fetch_record(key)


@mcp.tool()
async def crunch(n: int = CRUNCH_N) -> int:
    total = 0
    for i in range(n): total = (total * 31 + i) % 1_000_003  # noqa: E701 - BLOCKER crunch
    return total


@mcp.tool()
async def native(n: int = NATIVE_N) -> int:
    return sum(range(n)) % 7  # BLOCKER native


@mcp.tool()
async def http() -> int:
    with urllib.request.urlopen(URL["value"], timeout=10) as response:  # BLOCKER http
        return len(response.read())


@mcp.tool()
async def importer() -> int:
    import slow_module  # BLOCKER import

    return slow_module.VALUE


@mcp.tool()
async def subproc() -> int:
    return subprocess.run(["sleep", "0.3"], check=True).returncode  # BLOCKER subprocess


@mcp.tool()
async def locked() -> int:
    with LOCK:  # BLOCKER lock
        return 1
