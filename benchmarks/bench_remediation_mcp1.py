"""Remediation on mcp 1.x: honest calls beside a FastMCP 1 `def` tool, bare and under `loopwatch run --offload auto`.

    python benchmarks/bench_remediation_mcp1.py [--rounds 25] [--python .venvs/mcp1-fastmcp2/bin/python]

(bench_remediation.py's I/O case, kept here for mcp 1.x; `--demo` runs that case on the bundled demo server.)

Runs the bundled demo server over stdio twice, bare (`mcp.run()`) and wrapped (`loopwatch run`), with a real MCP
client. Each round sends 8 honest calls (`ping`) at once; in the blocked phase the same round also calls
`lookup`, an async tool that blocks on synchronous I/O for 250 ms and reports progress. Prints honest-call p99
against the quiet server's, and the loop lag loopwatch measured before and after it moved the tool.

By default it runs a FastMCP 1 server (mcp 1.x, tests/fixtures/mcp1/fastmcp1_server.py) in an mcp 1.x environment
instead (the one the tests make, or `--python`): its blocker is `report`, a plain `def` tool that FastMCP 1 runs
inline on the loop and that sleeps 300 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _common import p99
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

HONEST = 8
ROOT = Path(__file__).resolve().parent.parent
BLOCKER = ("lookup", {"sku": "X"})


async def one_round(client, blocker: bool, progress: list) -> list[float]:
    latencies: list[float] = []

    async def honest(i: int) -> None:
        start = time.perf_counter()
        await client.call_tool("ping", {"n": i})
        latencies.append(time.perf_counter() - start)

    async def on_progress(value, total, message):
        progress.append(value)

    async with anyio.create_task_group() as tg:
        for i in range(HONEST):
            tg.start_soon(honest, i)
        if blocker:
            await anyio.sleep(0.002)
            tg.start_soon(lambda: client.call_tool(*BLOCKER, progress_callback=on_progress))
    return latencies


async def measure(command: list[str], rounds: int, log) -> dict:
    params = StdioServerParameters(command=command[0], args=command[1:], env={**os.environ})
    async with Client(stdio_client(params, errlog=log)) as client:
        for _ in range(3):
            await one_round(client, False, [])
        quiet: list[float] = []
        for _ in range(rounds):
            quiet += await one_round(client, False, [])
        per_round: list[list[float]] = []
        progress: list = []
        for _ in range(rounds):
            per_round.append(await one_round(client, True, progress))
            await anyio.sleep(0.02)
    after = [x for r in per_round[1:] for x in r]
    return {"quiet": quiet, "first": per_round[0], "after": after, "progress": len(progress)}


def lag_from_events(path: Path) -> tuple[list[float], str | None]:
    if not path.exists():
        return [], None
    events = [json.loads(line) for line in path.read_text().splitlines()]
    tool = BLOCKER[0]
    blocks = [e["duration_s"] for e in events if e["event"] == "loop_blocked" and e["tool"] == tool]
    moved = next((e["reason"] for e in events if e["event"] == "offloaded" and e["tool"] == tool), None)
    return blocks, moved


def commands(python: str | None, events: Path) -> tuple[list[str], list[str]]:
    """The bare and the wrapped command of the server measured."""
    global BLOCKER
    if python is None:
        server_file = str(Path(__import__("loopwatch.demo.server").demo.server.__file__))
        bare = [sys.executable, "-c", "from loopwatch.demo.server import mcp; mcp.run()"]
        wrapped = [sys.executable, "-m", "loopwatch", "run", server_file, "--offload", "auto", "--events", str(events)]
        return bare, wrapped
    BLOCKER = ("report", {"n": 1})
    server_file = str(ROOT / "tests" / "fixtures" / "mcp1" / "fastmcp1_server.py")
    wrapped = [python, "-m", "loopwatch", "run", server_file, "--offload", "auto", "--events", str(events)]
    return [python, server_file], wrapped


async def main(rounds: int, python: str | None = None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="loopwatch-remediation-"))
    events = folder / "events.jsonl"
    bare_cmd, wrapped_cmd = commands(python, events)
    if python is not None:
        print(f"FastMCP 1 (mcp 1.x, {python}): a plain def tool, inline on the loop")
    with open(folder / "stderr.log", "w") as log:
        bare = await measure(bare_cmd, rounds, log)
        wrapped = await measure(wrapped_cmd, rounds, log)
    blocks, moved = lag_from_events(events)
    what = "300 ms def tool (report)" if python else "250 ms synchronous-I/O call (lookup)"
    print(f"{rounds} rounds of {HONEST} honest calls; blocked rounds add one {what}")
    for name, data in (("bare server", bare), ("loopwatch --offload auto", wrapped)):
        quiet = p99(data["quiet"])
        print(f"{name:<26} quiet p99 {quiet * 1000:6.1f} ms | beside the blocker: first round p99 "
              f"{p99(data['first']) * 1000:6.1f} ms, later rounds p99 {p99(data['after']) * 1000:6.1f} ms "
              f"= {p99(data['after']) / quiet:5.2f}x quiet"
              + ("" if python else f" | progress notifications {data['progress']} of {2 * rounds} sent"))
    print(f"loop lag blamed on {BLOCKER[0]}: {len(blocks)} block(s), "
          f"{', '.join(f'{b * 1000:.0f} ms' for b in blocks) or 'none'}; after the move: "
          f"{'none' if len(blocks) <= 1 else 'still blocking'}")
    print(f"decision: {moved or 'never moved'}")
    print(f"p99 beside the blocker, bare / wrapped: {p99(bare['after']) / p99(wrapped['after']):.1f}x better")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--demo", action="store_true", help="the bundled demo server (mcp 2.x) instead")
    parser.add_argument("--python", help="that environment's python (default: the tests' .venvs/mcp1-fastmcp2)")
    args = parser.parse_args()
    python = args.python or (str(ROOT / ".venvs" / "mcp1-fastmcp2" / "bin" / "python") if not args.demo else None)
    if python is not None and not Path(python).exists():
        sys.exit(f"no mcp 1.x environment at {python}: run tests/e2e/test_mcp1_families.py once, or pass --python")
    anyio.run(main, args.rounds, python)
