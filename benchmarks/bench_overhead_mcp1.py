"""Per-call cost of loopwatch on mcp 1.x (FastMCP 1, the request-handler seam): wrapped against bare, interleaved.

    .venvs/mcp1-fastmcp2/bin/python benchmarks/bench_overhead_mcp1.py [--rounds 30] [--calls 400]

Run it with an mcp 1.x environment's python (the tests make `.venvs/mcp1-fastmcp2`). As bench_overhead.py,
but on FastMCP 1 over the 1.x SDK's in-memory session: each round times `calls` sequential tools/call round
trips of a no-op async tool on each configuration, rotating who goes first; prints the median per-round
ratio with a 95% bootstrap interval, and an A/A line (a second bare server against the first).
"""

from __future__ import annotations

import argparse
import time

import anyio
from _common import report
from mcp.server.fastmcp import FastMCP
from mcp.shared.memory import create_connected_server_and_client_session

import loopwatch


def make_server(name: str) -> FastMCP:
    server = FastMCP(name, log_level="WARNING")

    @server.tool()
    async def noop(n: int = 0) -> int:
        return n

    return server


async def timed_round(server: FastMCP, calls: int) -> float:
    async with create_connected_server_and_client_session(server._mcp_server) as session:
        await session.initialize()
        for _ in range(20):
            await session.call_tool("noop", {"n": 1})
        start = time.perf_counter()
        for i in range(calls):
            await session.call_tool("noop", {"n": i})
        return (time.perf_counter() - start) / calls


async def main(rounds: int, calls: int) -> None:
    import mcp

    servers = {name: make_server(name) for name in ("bare", "core", "default", "bare-again")}
    loopwatch.instrument(servers["core"], traces=False, log_blocks=False)
    loopwatch.instrument(servers["default"])
    for server in servers.values():  # warm-up, discarded
        await timed_round(server, calls)
    times: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            times[name].append(await timed_round(servers[name], calls))
    version = getattr(mcp, "__version__", None) or __import__("importlib.metadata").metadata.version("mcp")
    print(f"mcp {version}, FastMCP 1: {rounds} rounds x {calls} sequential in-memory tools/call round trips")
    report("loopwatch core (traces=False) vs bare", times["bare"], times["core"])
    report("loopwatch defaults vs bare", times["bare"], times["default"])
    report("A/A: bare vs the same bare again", times["bare"], times["bare-again"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls)
