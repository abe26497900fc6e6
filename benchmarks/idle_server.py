"""The idle stdio server of bench_idle.py: one tool, run bare (`python idle_server.py`) or under
`loopwatch run idle_server.py`."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("idle")


@server.tool()
async def echo(text: str = "") -> str:
    return text


if __name__ == "__main__":
    server.run()
