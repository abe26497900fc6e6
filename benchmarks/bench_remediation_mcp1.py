"""Remediation on mcp 1.x: honest calls beside a FastMCP 1 `def` tool, bare and under `loopwatch run --offload auto`.

    python benchmarks/bench_remediation_mcp1.py [--rounds 25] [--python .venvs/mcp1-fastmcp2/bin/python]

(bench_remediation.py's I/O case, kept here for mcp 1.x; `--demo` runs that case on the bundled demo server.)

By default it runs a FastMCP 1 server (mcp 1.x, tests/fixtures/mcp1/fastmcp1_server.py) in an mcp 1.x environment
(the one the tests make, or `--python`): its blocker is `report`, a plain `def` tool that FastMCP 1 runs inline on
the loop and that sleeps 300 ms. Three copies of the server run over stdio at once, each with a real MCP client:

- `bare`: the server as its author runs it (`python server.py`);
- `loopwatch`: the same under `loopwatch run --offload auto` (the default), which moves `report` to a worker
  thread once it is caught blocking;
- `hand cure` (reference): the bare server with `report` rewritten by hand as the cure is usually written, an
  `async def` that awaits `anyio.to_thread.run_sync(...)` -- what an honest call beside a threaded blocker
  costs without loopwatch.

Each round sends 8 honest calls (`ping`) at once; a blocked round adds one `report` call. Quiet and blocked rounds
alternate, and the servers take their rounds in turn (the order rotating), so a change of machine load reaches
every figure alike. Each server's own quiet rounds are its baseline; the first blocked round (where loopwatch
moves the tool) is shown apart, the later ones are "after the move". Figures: p99 of honest-call latency, the
ratio after/quiet with a bootstrap 90% interval, and an A/A line (one server's quiet rounds split into two
interleaved halves: the noise floor of a ratio).

The client's garbage collector runs between rounds only: a full collection of this process takes about 50 ms
here, and at a fixed count of allocations it fell on the same round of the same server in every run (it read
as a 100 ms p99 of the server's after a move that did nothing of the kind: no loop stall of the server).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
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
BOOTSTRAP = 2000

HAND_CURE = """
import sys, anyio
sys.path.insert(0, {folder!r})
import fastmcp1_server as server
server.app._tool_manager._tools.pop("report")
sync_report = server.report

@server.app.tool(name="report")
async def report(n: int = 0) -> str:
    return await anyio.to_thread.run_sync(sync_report, n)

server.app.run()
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def flat(rounds: list[list[float]]) -> list[float]:
    return [x for r in rounds for x in r]


def ratio_spread(after: list[list[float]], quiet: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """p99(after) / p99(quiet), and the 5th and 95th percentiles of that ratio over bootstrap resamples of whole
    rounds (the calls of one round share whatever stalled the machine then: they are not independent)."""
    rng = random.Random(seed)
    ratios = sorted(
        p99(flat(rng.choices(after, k=len(after)))) / p99(flat(rng.choices(quiet, k=len(quiet))))
        for _ in range(BOOTSTRAP)
    )
    return p99(flat(after)) / p99(flat(quiet)), ratios[int(0.05 * BOOTSTRAP)], ratios[int(0.95 * BOOTSTRAP)]


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


class Measured:
    def __init__(self, name: str, command: list[str]) -> None:
        self.name, self.command = name, command
        self.quiet: list[list[float]] = []
        self.blocked: list[list[float]] = []
        self.progress: list = []

    @property
    def first(self) -> list[float]:
        return self.blocked[0]

    @property
    def after(self) -> list[list[float]]:
        return self.blocked[1:]


async def measure(servers: list[Measured], rounds: int, log) -> None:
    """Every server connected at once; quiet and blocked rounds alternate, the servers in rotating order."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for server in servers:
            params = StdioServerParameters(command=server.command[0], args=server.command[1:], env={**os.environ})
            clients.append(await stack.enter_async_context(Client(stdio_client(params, errlog=log))))
        for client in clients:
            for _ in range(3):
                await one_round(client, False, [])
        order = list(range(len(servers)))
        gc.collect()
        gc.freeze()  # the client's start-up objects: never scanned again
        for r in range(rounds):
            for blocked in (r % 2 == 1, r % 2 == 0):  # quiet first on odd rounds, blocked first on even ones
                for i in order:
                    gc.disable()  # the client's own collections would land on whichever round is in flight
                    try:
                        latencies = await one_round(clients[i], blocked, servers[i].progress)
                    finally:
                        gc.enable()
                    (servers[i].blocked if blocked else servers[i].quiet).append(latencies)
                    gc.collect()  # between rounds, outside any timing
                    await anyio.sleep(0.02)
            order = order[1:] + order[:1]


def lag_from_events(path: Path) -> tuple[list[float], str | None]:
    if not path.exists():
        return [], None
    events = [json.loads(line) for line in path.read_text().splitlines()]
    tool = BLOCKER[0]
    blocks = [e["duration_s"] for e in events if e["event"] == "loop_blocked" and e["tool"] == tool]
    moved = next((e["reason"] for e in events if e["event"] == "offloaded" and e["tool"] == tool), None)
    return blocks, moved


def servers_of(python: str | None, events: Path) -> list[Measured]:
    """The servers measured: bare, under loopwatch, and (on mcp 1.x) the hand-cured reference."""
    global BLOCKER
    if python is None:
        server_file = str(Path(__import__("loopwatch.demo.server").demo.server.__file__))
        bare = [sys.executable, "-c", "from loopwatch.demo.server import mcp; mcp.run()"]
        wrapped = [sys.executable, "-m", "loopwatch", "run", server_file, "--offload", "auto", "--events", str(events)]
        return [Measured("bare server", bare), Measured("loopwatch --offload auto", wrapped)]
    BLOCKER = ("report", {"n": 1})
    folder = ROOT / "tests" / "fixtures" / "mcp1"
    server_file = str(folder / "fastmcp1_server.py")
    wrapped = [python, "-m", "loopwatch", "run", server_file, "--offload", "auto", "--events", str(events)]
    return [
        Measured("bare server", [python, server_file]),
        Measured("loopwatch --offload auto", wrapped),
        Measured("hand cure (to_thread)", [python, "-c", HAND_CURE.format(folder=str(folder))]),
    ]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.1f} ms"


async def main(rounds: int, python: str | None = None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="loopwatch-remediation-"))
    events = folder / "events.jsonl"
    servers = servers_of(python, events)
    if python is not None:
        print(f"FastMCP 1 (mcp 1.x, {python}): a plain def tool, inline on the loop")
    with open(folder / "stderr.log", "w") as log:
        await measure(servers, rounds, log)
    blocks, moved = lag_from_events(events)
    what = "300 ms def tool (report)" if python else "250 ms synchronous-I/O call (lookup)"
    print(
        f"{rounds} quiet and {rounds} blocked rounds of {HONEST} honest calls, interleaved; blocked rounds add "
        f"one {what}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"{'':<26} {'quiet p99':>10} | {'1st blocked':>11} | {'after p99':>10} | after / own quiet [90% interval]"
        f" | p50 quiet / after"
    )
    for server in servers:
        ratio, low, high = ratio_spread(server.after, server.quiet)
        quiet, after = flat(server.quiet), flat(server.after)
        print(
            f"{server.name:<26} {ms(p99(quiet)):>10} | {ms(p99(server.first)):>11} | "
            f"{ms(p99(after)):>10} | {ratio:5.2f}x [{low:.2f}-{high:.2f}]"
            f"{'':>10} | {ms(pct(quiet, 0.5))} / {ms(pct(after, 0.5))}"
        )
    bare, wrapped = servers[0], servers[1]
    ratio, low, high = ratio_spread(wrapped.after, bare.quiet)
    print(f"loopwatch after the move / bare quiet (loopwatch's own cost included): {ratio:.2f}x [{low:.2f}-{high:.2f}]")
    ratio, low, high = ratio_spread(wrapped.quiet[0::2], wrapped.quiet[1::2])
    print(
        f"A/A (loopwatch's quiet rounds, odd / even: the noise of such a ratio here): {ratio:.2f}x "
        f"[{low:.2f}-{high:.2f}]"
    )
    print(
        f"loop lag blamed on {BLOCKER[0]}: {len(blocks)} block(s), "
        f"{', '.join(f'{b * 1000:.0f} ms' for b in blocks) or 'none'}; after the move: "
        f"{'none' if len(blocks) <= 1 else 'still blocking'}"
    )
    print(f"decision: {moved or 'never moved'}")
    print(f"p99 beside the blocker, bare / loopwatch: {p99(flat(bare.after)) / p99(flat(wrapped.after)):.1f}x better")
    if not python:
        print(f"progress notifications: {len(wrapped.progress)} of {2 * rounds} sent")
    ratio, low, high = ratio_spread(wrapped.after, wrapped.quiet)
    print(
        f"FIGURE loopwatch: honest p99 after the move / its quiet p99 = {ratio:.2f}x (bootstrap 90% {low:.2f}-"
        f"{high:.2f}x; target <= 1.5x)"
    )


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
