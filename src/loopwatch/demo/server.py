"""The server `loopwatch demo` runs: honest tools and three classic ways to block the loop."""

import anyio
from mcp.server.mcpserver import Context, MCPServer

from loopwatch.demo import inventory

mcp = MCPServer("loopwatch-demo")


@mcp.tool()
async def ping(n: int = 0) -> int:
    """Honest: awaits, never blocks."""
    await anyio.sleep(0.01)
    return n


@mcp.tool()
async def lookup(sku: str, ctx: Context) -> dict:
    """Blocks on synchronous I/O inside an async tool."""
    await ctx.report_progress(0, 1)
    record = inventory.fetch_record(sku)
    await ctx.report_progress(1, 1)
    return record


@mcp.tool()
async def fingerprint(ctx: Context, rounds: int = 150_000) -> str:
    """Blocks by crunching numbers on the loop."""
    await ctx.report_progress(0, 1)
    digest = inventory.fingerprint(rounds)
    await ctx.report_progress(1, 1)
    return digest


@mcp.tool()
async def export_formats() -> list[str]:
    """Blocks by importing a heavy module lazily, on the loop."""
    from loopwatch.demo import slow_import

    return list(slow_import.FORMATS)
