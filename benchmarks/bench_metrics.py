"""Per-call cost of loopwatch's Prometheus metrics on an in-memory round trip, interleaved in one run.

    python benchmarks/bench_metrics.py [--rounds 30] [--calls 400]

Three servers with the same no-op async tool: bare, loopwatch without metrics, loopwatch with metrics
(a private registry). Each round opens an in-memory client on each of them, in rotating order, and times
`calls` sequential tools/call round trips. Prints the median of the per-round ratios: metrics against
bare (the whole cost a user pays) and metrics against loopwatch alone (what the metrics add), then
the hot path by itself in nanoseconds per call: the middleware hook's start() + end() on a watched loop
(they only queue) and the recording of the queue (on loopwatch's watchdog thread, normally).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
from bench_overhead import make_server, timed_round  # the same server and round as the core benchmark
from mcp.server.mcpserver import MCPServer
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._blame import CallRecord
from loopwatch.prometheus import PrometheusExporter

COMMON = {"traces": False, "log_blocks": False}


async def rounds(servers: dict[str, MCPServer], count: int, calls: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for index in range(count):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(await timed_round(servers[name], calls))
    return times


def report(label: str, base: list[float], other: list[float]) -> None:
    ratios = [o / b for b, o in zip(base, other, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(
        f"{label:<36} ratio median {statistics.median(ratios):.3f}  (quartiles {q[0]:.3f}-{q[2]:.3f})"
        f"  per call {statistics.median(base) * 1e6:.0f} us -> {statistics.median(other) * 1e6:.0f} us"
    )


def time_hook(hook: Any, record: CallRecord, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        hook.start(record)
        hook.end(record, 0.0002, None)
    return time.perf_counter() - start


async def hook_costs(exporter: PrometheusExporter, calls: int = 5_000) -> tuple[float, float]:
    """Nanoseconds per request: the hook's start() + end() on a watched loop, where they only queue, and
    record(), which applies the queue to the metrics (on the watchdog thread, normally)."""
    record = CallRecord("tools/call", "noop", 1, SimpleNamespace(request=None), "noop")
    monitor, hook = exporter.handle.monitor, exporter.calls
    on_loop = 0.0
    async with monitor.running():
        monitor.lag_observers.remove(exporter.loop.observe_lag)  # keep the watchdog from recording meanwhile
        for _ in range(calls // 100):
            on_loop += time_hook(hook, record, 100)
            await anyio.lowlevel.checkpoint()  # let the sentinel beat: this is a loop, not a blocker
        monitor.lag_observers.append(exporter.loop.observe_lag)
        queued = len(hook.pending)
        start = time.perf_counter()
        hook.record()
        recording = time.perf_counter() - start
    assert queued == 2 * calls, "the hook recorded inline: the measurement is not what it says"
    return on_loop / calls * 1e9, recording / calls * 1e9


async def main(count: int, calls: int) -> None:
    servers = {"bare": make_server("bare"), "loopwatch": make_server("loopwatch"), "metrics": make_server("metrics")}
    loopwatch.instrument(servers["loopwatch"], **COMMON)
    handle = loopwatch.instrument(servers["metrics"], metrics_registry=CollectorRegistry(), **COMMON)
    exporter = next(e for e in handle.extensions if isinstance(e, PrometheusExporter))
    print(f"{count} interleaved rounds of {calls} sequential in-memory tools/call round trips")
    times = await rounds(servers, count, calls)
    report("loopwatch + metrics vs bare", times["bare"], times["metrics"])
    report("loopwatch + metrics vs loopwatch", times["loopwatch"], times["metrics"])
    report("loopwatch vs bare (for scale)", times["bare"], times["loopwatch"])
    on_loop, recording = await hook_costs(exporter)
    bare_ns = statistics.median(times["bare"]) * 1e9
    print(
        f"metrics hook on the loop (queues): {on_loop:.0f} ns per call ({on_loop / bare_ns:.2%} of a bare round trip)"
    )
    print(f"recording on the watchdog thread:  {recording:.0f} ns per call ({recording / bare_ns:.2%})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls)
