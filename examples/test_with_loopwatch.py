"""A test suite that catches a tool blocking the event loop, with an in-memory client.

    pip install loopwatch pytest anyio
    pytest examples/test_with_loopwatch.py
    pytest examples/test_with_loopwatch.py --runxfail     # to see the failure report of a blocking tool

The plugin needs nothing from the server: it watches the test's own loop and blames blocks through
the MCP SDK's request frames, so it works for servers you did not write.
"""

import time

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from loopwatch.testing import collect_blocks

NOTES = ["the event loop", "a blocking call", "loopwatch"]

server = MCPServer("notes")


@server.tool()
async def search(query: str) -> list[str]:
    """An honest async tool: it awaits, so other requests run meanwhile."""
    await anyio.sleep(0.01)  # stands for real async I/O
    return [note for note in NOTES if query in note]


def rebuild_index() -> int:
    """Synchronous work, as a database driver or an HTTP library without async would do it."""
    time.sleep(0.2)
    return len(NOTES)


@server.tool()
async def reindex() -> int:
    """A sync call inside an async tool: it runs on the event loop, and every other request waits."""
    return rebuild_index()


@pytest.mark.anyio
@pytest.mark.no_blocking(threshold=0.05)
async def test_search_never_blocks_the_loop() -> None:
    async with Client(server) as client:
        result = await client.call_tool("search", {"query": "loop"})
    assert not result.is_error


@pytest.mark.anyio
async def test_reindex_blocks_and_is_blamed() -> None:
    async with collect_blocks(threshold=0.05) as blocks:
        async with Client(server) as client:
            await client.call_tool("reindex", {})
    assert blocks.tools() == ["reindex"]
    assert blocks[0].culprit is not None and blocks[0].culprit.function == "rebuild_index"  # the sleep's line


@pytest.mark.anyio
@pytest.mark.no_blocking(threshold=0.05)
@pytest.mark.xfail(strict=True, reason="reindex blocks the loop: the report names the tool and the line")
async def test_reindex_fails_under_no_blocking() -> None:
    async with Client(server) as client:
        await client.call_tool("reindex", {})
