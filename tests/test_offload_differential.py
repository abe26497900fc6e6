"""A moved tool's client sees what the bare server's sees: every context call (logs at each level, progress,
elicitation, sampling, roots, resource reads, notifications), once, twice, between sleeps, several calls at
once; on the low-level Server, MCPServer and fastmcp; asyncio, uvloop and trio; both protocol eras."""

import pytest
from offload_diff import assert_not_vacuous, outcomes

import loopwatch

from helpers import fresh

pytestmark = pytest.mark.anyio

FAMILIES = {"lowlevel": ("context_tools", "lowlevel"), "mcpserver": ("context_tools", "mcpserver"),
            "fastmcp": ("context_tools_fm", "fastmcp_server")}


def served(server):
    """What mcp.Client runs in memory: the SDK server underneath a fastmcp one."""
    return getattr(server, "_mcp_server", server)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
async def test_a_moved_tool_sends_its_client_exactly_what_the_bare_server_does(anyio_backend, family, mode):
    bare = await outcomes(served(fresh(*FAMILIES[family])), mode)
    assert_not_vacuous(bare, progress=not (family == "fastmcp" and mode == "auto"))  # fastmcp: none there
    server = fresh(*FAMILIES[family])
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False,
                                  tool_policies={"act": "always"})
    try:
        moved = await outcomes(served(server), mode)
        assert "act" in handle.offload.offloaded and not handle.offload.pinned
    finally:
        handle.uninstrument()
    assert moved == bare
