"""`loopwatch demo`: run the bundled server under `loopwatch run`, drive it with a real MCP client, show it all."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

HONEST_BESIDE = 8
BLOCKERS = [
    ("lookup", {"sku": "A-113"}, "an async tool calling a synchronous library"),
    ("fingerprint", {}, "an async tool crunching numbers"),
    ("export_formats", {}, "an async tool importing a heavy module"),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(client, name: str, args: dict, into: list[float]) -> None:
    start = time.perf_counter()
    await client.call_tool(name, args)
    into.append(time.perf_counter() - start)


async def honest_round(client, blocker: tuple[str, dict] | None) -> list[float]:
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        for i in range(HONEST_BESIDE):
            tg.start_soon(timed, client, "ping", {"n": i}, latencies)
        if blocker is not None:
            await anyio.sleep(0.005)
            tg.start_soon(client.call_tool, *blocker)
    return latencies


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for_events(path: Path, predicate, timeout: float = 5.0) -> list[dict]:
    with anyio.move_on_after(timeout):
        while not any(predicate(e) for e in read_events(path)):
            await anyio.sleep(0.05)
    return [e for e in read_events(path) if predicate(e)]


def is_move(event: dict, tool: str) -> bool:
    return event.get("event") == "offloaded" and event.get("tool") == tool


def is_block(event: dict, tool: str) -> bool:
    """A block blamed on `tool`: a garbage collection during its call (kind gc) is the heap's, not the tool's."""
    return event.get("event") == "loop_blocked" and event.get("tool") == tool and event.get("kind") != "gc"


def where(event: dict) -> str:
    frames = event.get("frames") or []
    if not frames:
        return "no sample (a native call held the GIL)"
    from loopwatch._events import Frame

    leaf = Frame(**frames[-1])
    culprit = Frame(**(event.get("culprit") or frames[-1]))
    return leaf.short() if culprit == leaf else f"{leaf.short()} <- {culprit.short()}"


def calibrate_rounds(seconds: float) -> int:
    """How many fingerprint rounds take about `seconds` on this machine."""
    from loopwatch.demo.inventory import fingerprint

    rounds = 2000
    while True:
        start = time.perf_counter()
        fingerprint(rounds)
        took = time.perf_counter() - start
        if took > 0.02:
            return max(rounds, int(rounds * seconds / took))
        rounds *= 4


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.0f} ms"


async def drive(events: Path, log: Path, quick: bool) -> int:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    server = Path(__file__).with_name("server.py")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "loopwatch", "run", str(server), "--threshold", "0.1", "--events", str(events),
              "--offload-cpu", "process"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    rounds = 2 if quick else 4
    BLOCKERS[1] = ("fingerprint", {"rounds": calibrate_rounds(0.3)}, BLOCKERS[1][2])
    with open(log, "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            say(f"Started the demo server under `loopwatch run` over stdio: tools {', '.join(tools)}.")
            say("")
            for _ in range(2):
                await honest_round(client, None)  # warm up: first calls import and cache
            quiet: list[float] = []
            for _ in range(rounds):
                quiet += await honest_round(client, None)
            say(f"Quiet server: {len(quiet)} honest calls, p50 {ms(percentile(quiet, .5))}, "
                f"p99 {ms(percentile(quiet, .99))}")
            say("")
            found = 0
            for name, args, what in BLOCKERS:
                say(f"Now {what} ({name}), with {HONEST_BESIDE} honest calls beside it:")
                during = await honest_round(client, (name, args))
                say(f"  honest calls waited: p50 {ms(percentile(during, .5))}, p99 {ms(percentile(during, .99))}")
                blocks = await wait_for_events(events, lambda e, n=name: is_block(e, n))
                for event in blocks[:1]:
                    found += 1
                    say(f"  loopwatch found: {name} (request {event['request_id']}) blocked the loop "
                        f"{ms(event['duration_s']).strip()} [{event['kind']}]")
                    say(f"                   at {where(event)}")
                if not blocks:
                    say("  loopwatch found no block this time (the machine may be too fast for this threshold)")
                moved = await wait_for_events(events, lambda e, n=name: is_move(e, n), 1)
                if moved:
                    again = await honest_round(client, (name, args))
                    await anyio.sleep(0.3)
                    blocked_again = len([e for e in read_events(events) if is_block(e, name)]) > len(blocks)
                    loop_state = "blocked again" if blocked_again else "no longer blocked past the threshold"
                    say(f"  loopwatch moved {name} off the loop; the same calls again: honest p99 "
                        f"{ms(percentile(again, .99)).strip()}, loop {loop_state}")
                    if name == "fingerprint":
                        await show_process_cure(client, events, name, args)
                elif name == "export_formats":
                    say("  (an import blocks once: the module is cached after that)")
                say("")
            honest_blamed = [e for e in read_events(events) if is_block(e, "ping")]
            say(f"Honest calls blamed: {len(honest_blamed)}. Blockers found: {found} of {len(BLOCKERS)}.")
    say(f"Every event is in {events} (JSON lines); the server's log is in {log}.")
    return 0 if found and not honest_blamed else 1


def in_process(event: dict, tool: str) -> bool:
    return is_move(event, tool) and event.get("executes") == "process"


async def show_process_cure(client, events: Path, name: str, args: dict) -> None:
    """The CPU blocker: a thread still shares the GIL with the loop; `--offload-cpu process` moved it to a worker
    process when its block turned out `cpu`. The same calls once more, with that worker started."""
    moved = await wait_for_events(events, lambda e: in_process(e, name), 5)
    if not moved:
        say(" " * 19 + "(pure-Python crunching on a thread still takes the GIL from the loop in 5 ms slices;")
        say(" " * 20 + f"--offload-policy {name}=process would cure it)")
        return
    await anyio.sleep(1.5)  # the worker process starts (a fresh interpreter imports the server's module)
    again = await honest_round(client, (name, args))
    say("  ...and, as the block was CPU-bound, to a worker process (--offload-cpu process: no shared GIL):")
    say(f"                   the same calls again: honest p99 {ms(percentile(again, .99)).strip()}")


def run_demo(quick: bool = False) -> int:
    folder = Path(tempfile.mkdtemp(prefix="loopwatch-demo-"))
    events, log = folder / "events.jsonl", folder / "server.log"
    say("loopwatch demo: an MCP server whose event loop gets blocked, and what loopwatch tells you.")
    say("")
    try:
        return anyio.run(drive, events, log, quick)
    except Exception as exc:  # the demo server died or never started: show why, not our traceback
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        print(f"loopwatch demo: the demo server failed ({type(exc).__name__}). Its log ({log}) ends with:",
              file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)
        return 1
