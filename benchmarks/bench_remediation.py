"""Remediation: what honest calls suffer beside a blocking tool, bare and under `loopwatch run --offload auto`.

    python benchmarks/bench_remediation.py [--rounds 25]

Runs the bundled demo server over stdio twice, bare (`mcp.run()`) and wrapped (`loopwatch run`), with a real MCP
client. Each round sends 8 honest calls (`ping`) at once; in the blocked phase the same round also calls
`lookup`, an async tool that blocks on synchronous I/O for 250 ms and reports progress. Prints honest-call p99
against the quiet server's, and the loop lag loopwatch measured before and after it moved the tool.

The CPU-bound case (`--case cpu`, run after the first by default) does the same with `fingerprint`, an async tool
that crunches pure Python for ~300 ms and reports progress, on four servers open at once and measured round by
round in turn: bare, bare again (the A/A line), the tool on a thread (`--offload-policy fingerprint=always`: the
thread still takes the GIL from the loop) and in a worker process (`--offload-policy fingerprint=process`).
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


async def one_round(client, blocker: bool, progress: list, call=("lookup", {"sku": "X"}), answers=None) -> list[float]:
    latencies: list[float] = []

    async def honest(i: int) -> None:
        start = time.perf_counter()
        await client.call_tool("ping", {"n": i})
        latencies.append(time.perf_counter() - start)

    async def on_progress(value, total, message):
        progress.append(value)

    async def blocked() -> None:
        result = await client.call_tool(*call, progress_callback=on_progress)
        if answers is not None:
            answers.append(result.model_dump(exclude={"meta"}))

    async with anyio.create_task_group() as tg:
        for i in range(HONEST):
            tg.start_soon(honest, i)
        if blocker:
            await anyio.sleep(0.002)
            tg.start_soon(blocked)
    return latencies


async def measure(command: list[str], rounds: int, log, call=("lookup", {"sku": "X"})) -> dict:
    params = StdioServerParameters(command=command[0], args=command[1:], env={**os.environ})
    async with Client(stdio_client(params, errlog=log)) as client:
        for _ in range(3):
            await one_round(client, False, [])
        quiet: list[float] = []
        for _ in range(rounds):
            quiet += await one_round(client, False, [])
        per_round: list[list[float]] = []
        progress: list = []
        answers: list = []
        for index in range(rounds):
            per_round.append(await one_round(client, True, progress, call, answers))
            # After the first blocked round (the one that moves the tool): let a new worker start, so the later
            # rounds measure the cure, not its one-off start-up (the same pause for every server).
            await anyio.sleep(1.5 if index == 0 else 0.02)
    after = [x for r in per_round[1:] for x in r]
    return {"quiet": quiet, "first": per_round[0], "after": after, "progress": len(progress), "answers": answers}


def lag_from_events(path: Path) -> tuple[list[float], str | None]:
    if not path.exists():
        return [], None
    events = [json.loads(line) for line in path.read_text().splitlines()]
    blocks = [e["duration_s"] for e in events if e["event"] == "loop_blocked" and e["tool"] == "lookup"]
    moved = next((e["reason"] for e in events if e["event"] == "offloaded" and e["tool"] == "lookup"), None)
    return blocks, moved


async def cpu_case(rounds: int) -> None:
    """The pure-Python blocker beside honest calls on three servers at once, rounds interleaved (so the load of a
    shared machine falls on all alike): bare, the tool on a thread, the tool in a worker process."""
    import contextlib

    from loopwatch.demo.driver import calibrate_rounds

    folder = Path(tempfile.mkdtemp(prefix="loopwatch-remediation-cpu-"))
    call = ("fingerprint", {"rounds": calibrate_rounds(0.3)})
    server_file = str(Path(__import__("loopwatch.demo.server").demo.server.__file__))
    commands = {
        "bare server": [sys.executable, "-c", "from loopwatch.demo.server import mcp; mcp.run()"],
        "bare server (A/A)": [sys.executable, "-c", "from loopwatch.demo.server import mcp; mcp.run()"],
        "on a thread": [sys.executable, "-m", "loopwatch", "run", server_file, "--offload-policy",
                        "fingerprint=always", "--events", str(folder / "events-thread.jsonl")],
        "in a process": [sys.executable, "-m", "loopwatch", "run", server_file, "--offload-policy",
                         "fingerprint=process", "--events", str(folder / "events-process.jsonl")],
    }
    data = {name: {"quiet": [], "after": [], "progress": [], "answers": []} for name in commands}
    with open(folder / "stderr.log", "w") as log:
        async with contextlib.AsyncExitStack() as stack:
            clients = {}
            for name, command in commands.items():
                params = StdioServerParameters(command=command[0], args=command[1:], env={**os.environ})
                clients[name] = await stack.enter_async_context(Client(stdio_client(params, errlog=log)))
            for client in clients.values():  # warm up: imports, caches, the worker process's start
                for _ in range(3):
                    await one_round(client, False, [])
                await one_round(client, True, [], call)
            await anyio.sleep(1.5)
            for _ in range(rounds):
                for name, client in clients.items():
                    data[name]["quiet"] += await one_round(client, False, [])
                for name, client in clients.items():
                    row = data[name]
                    row["after"] += await one_round(client, True, row["progress"], call, row["answers"])
                    await anyio.sleep(0.02)
    quiet = p99(data["bare server"]["quiet"] + data["bare server (A/A)"]["quiet"])  # both bare servers, pooled
    print(f"\n{rounds} rounds of {HONEST} honest calls on four servers, interleaved; blocked rounds add one ~300 ms "
          f"pure-Python call (fingerprint, reporting progress) beside them")
    for name, row in data.items():
        print(f"{name:<18} quiet p99 {p99(row['quiet']) * 1000:6.1f} ms | beside the blocker p99 "
              f"{p99(row['after']) * 1000:6.1f} ms = {p99(row['after']) / quiet:5.2f}x the bare servers' quiet p99 "
              f"| progress {len(row['progress'])} of {2 * rounds}")
    thread, process = (p99(data[name]["after"]) / quiet for name in ("on a thread", "in a process"))
    same = all(row["answers"] == data["bare server"]["answers"] for row in data.values())
    print(f"honest p99 beside the blocker / a quiet server's: in a process {process:.2f}x (target <= 1.5x), "
          f"on a thread {thread:.2f}x, bare {p99(data['bare server']['after']) / quiet:.2f}x")
    a_a = p99(data["bare server (A/A)"]["quiet"]) / p99(data["bare server"]["quiet"])
    print(f"A/A: the quiet p99 of one bare server / the other's: {a_a:.2f}x (this machine's noise)")
    print(f"answers identical to the bare server's: {same}")


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def main(rounds: int, case: str = "all") -> None:
    if case in ("all", "io"):
        await io_case(rounds)
    if case in ("all", "cpu"):
        await cpu_case(rounds)


async def io_case(rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="loopwatch-remediation-"))
    events = folder / "events.jsonl"
    bare_cmd = [sys.executable, "-c", "from loopwatch.demo.server import mcp; mcp.run()"]
    server_file = str(Path(__import__("loopwatch.demo.server").demo.server.__file__))
    wrapped_cmd = [sys.executable, "-m", "loopwatch", "run", server_file, "--offload", "auto", "--events", str(events)]
    with open(folder / "stderr.log", "w") as log:
        bare = await measure(bare_cmd, rounds, log)
        wrapped = await measure(wrapped_cmd, rounds, log)
    blocks, moved = lag_from_events(events)
    print(f"{rounds} rounds of {HONEST} honest calls; blocked rounds add one 250 ms synchronous-I/O call (lookup)")
    for name, data in (("bare server", bare), ("loopwatch --offload auto", wrapped)):
        quiet = p99(data["quiet"])
        print(f"{name:<26} quiet p99 {quiet * 1000:6.1f} ms | beside the blocker: first round p99 "
              f"{p99(data['first']) * 1000:6.1f} ms, later rounds p99 {p99(data['after']) * 1000:6.1f} ms "
              f"= {p99(data['after']) / quiet:5.2f}x quiet | progress notifications {data['progress']}"
              f" of {2 * rounds} sent")
    print(f"loop lag blamed on lookup: {len(blocks)} block(s), "
          f"{', '.join(f'{b * 1000:.0f} ms' for b in blocks) or 'none'}; after the move: "
          f"{'none' if len(blocks) <= 1 else 'still blocking'}")
    print(f"decision: {moved or 'never moved'}")
    print(f"p99 beside the blocker, bare / wrapped: {p99(bare['after']) / p99(wrapped['after']):.1f}x better")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--case", choices=("all", "io", "cpu"), default="all")
    arguments = parser.parse_args()
    anyio.run(main, arguments.rounds, arguments.case)
