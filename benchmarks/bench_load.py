"""Load: a streamable-HTTP MCP server under concurrent clients, wrapped by loopwatch against bare, in one run.

    python benchmarks/bench_load.py [--calls 10000] [--clients 50] [--rounds 2] [--mix honest|hostile]

Each run starts the server in a child process (uvicorn on 127.0.0.1, a free port): `bare` is the MCPServer
as its author wrote it, `wrapped` is the same server with `loopwatch.instrument(server,
metrics_path="/metrics")` (loopwatch's defaults: detection, auto-offload, traces; plus Prometheus metrics).
Bare and wrapped runs alternate, and which goes first alternates per round. `--clients` MCP clients (half
handshake-era sessions, half 2026 per-request) share `--calls` tools/call requests. Before the timed calls
every client makes a few warm-up calls; the server's RSS (VmRSS of /proc/<pid>/status) is read after the
warm-up and after the run.

Prints the throughput ratio (wrapped / bare within each round, median over rounds; target >= 0.97), the
server's CPU time per call (where clients and server share two cores, throughput is noisy; CPU per call is
what loopwatch costs the server), errors added (calls whose outcome under loopwatch differs from bare's in
the same round, a raise included), the RSS growth after warm-up (target < 20 MB), and the sizes of
loopwatch's tables and metric series after the warm-up, after half the calls and after all of them: past
the first calls they depend on configuration, not on traffic.

`--mix hostile` makes one call in ten go to a tool name never seen before, one in ten carry arguments that fail
validation, one in ten a 20 kB argument, one in ten a tool that fails. tests/e2e/test_load_http.py runs this
script's `run()` with 500 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

WARMUP_CALLS = 4
"""Warm-up calls per client before the server's RSS baseline is read."""
STATS_PATH = "/bench-stats"


# -- the server (child process) -----------------------------------------------------------------------


def make_server() -> Any:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("load")

    @server.tool()
    async def echo(n: int = 0) -> int:
        return n

    @server.tool()
    async def fail(reason: str) -> str:
        raise ToolError(f"cannot do it: {reason}")

    return server


def stats(handle: Any) -> dict[str, Any]:
    """Sizes of everything loopwatch keeps, for the parent to compare before and after the load."""
    found: dict[str, Any] = {"threads": sorted(t.name for t in threading.enumerate())}
    if handle is None:
        return found
    import prometheus_client

    monitor, stats = handle.monitor, handle.monitor.stats
    for extension in handle.extensions:  # requests queued for the metrics are recorded now, as a scrape does
        flush = getattr(extension, "flush", None)
        if flush is not None:
            flush()
    snapshot = handle.snapshot()
    heartbeat = monitor.heartbeat
    names = sorted(
        f"{sample.name}{{{','.join(f'{k}={v}' for k, v in sorted(sample.labels.items()) if k != 'le')}}}"
        for metric in prometheus_client.REGISTRY.collect()
        if metric.name.startswith(("loopwatch_", "mcp_server_"))
        for sample in metric.samples
    )
    series = len(names)
    found.update(
        active=snapshot["active"],
        tool_rows=len(snapshot["tools"]),
        method_rows=len(snapshot["methods"]),
        known_tools=len(monitor.tools.known),
        recent_events=len(snapshot["recent_events"]),
        durations_kept=sum(len(row.durations) for row in [*stats.tools.values(), *stats.methods.values()]),
        lags_kept=len(monitor.lag.recent) + (len(heartbeat.lags) if heartbeat is not None else 0),
        snapshot_bytes=len(json.dumps(snapshot)),
        metric_series=series,
        metric_names=sorted(set(names)),  # label sets (buckets folded), to say which series appeared
        calls=sum(row["calls"] for row in snapshot["tools"].values()),
        in_flight=sum(row["in_flight"] for row in snapshot["tools"].values()),
        events=[_brief(e) for e in snapshot["recent_events"]],
    )
    return found


def _brief(event: dict[str, Any]) -> str:
    if event["event"] == "loop_blocked":
        leaf = event["frames"][-1] if event["frames"] else {}
        where = f"{leaf.get('file', '?').rsplit('/', 1)[-1]}:{leaf.get('line')}" if leaf else "no sample"
        return f"blocked {event['duration_s'] * 1000:.0f} ms [{event['kind']}] {event['tool']} at {where}"
    return f"{event['event']} {event['tool']}: {event['reason']}"


async def serve(kind: str) -> None:
    import uvicorn
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import loopwatch

    server = make_server()
    handle = loopwatch.instrument(server, metrics_path="/metrics") if kind == "wrapped" else None
    app = server.streamable_http_app(host="127.0.0.1")
    app.router.routes.extend(handle.routes if handle is not None else [])

    async def bench_stats(request: Any) -> JSONResponse:
        return JSONResponse(stats(handle))

    app.router.routes.append(Route(STATS_PATH, bench_stats, methods=["GET"]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))

    async def stop_on_stdin_eof() -> None:
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        uv.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_stdin_eof)
        await uv.serve(sockets=[sock])
        tg.cancel_scope.cancel()


# -- the clients (parent process) ---------------------------------------------------------------------


def call_for(client: int, index: int, mix: str) -> tuple[str, dict[str, Any]]:
    """The call a client makes at a given index: deterministic, so bare and wrapped get the same traffic."""
    if mix == "hostile":
        slot = (client + index) % 10  # every kind of call among the first call of ten clients
        if slot == 3:
            return f"no-such-tool-{client}-{index}", {}
        if slot == 5:
            return "echo", {"n": "not a number"}
        if slot == 7:
            return "fail", {"reason": f"r{index}"}
        if slot == 9:
            return "echo", {"n": index, "pad": "x" * 20_000}
    return "echo", {"n": index}


def outcome(result: Any) -> tuple[Any, ...]:
    texts = tuple(getattr(c, "text", None) for c in result.content)
    return ("result", bool(result.is_error), texts, result.structured_content)


@dataclass
class Run:
    kind: str
    calls: int
    seconds: float
    cpu_s: float
    rss_warm_kb: int
    rss_end_kb: int
    outcomes: dict[tuple[int, int], tuple[Any, ...]] = field(repr=False)
    stats_warm: dict[str, Any] = field(default_factory=dict)
    stats_end: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stats_half: dict[str, Any] = field(default_factory=dict)
    """The tables after the first half of the calls."""

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    @property
    def raised(self) -> int:
        return sum(1 for o in self.outcomes.values() if o[0] == "raised")

    @property
    def rss_growth_kb(self) -> int:
        return self.rss_end_kb - self.rss_warm_kb


def read_status(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def get_json(port: int, path: str) -> dict[str, Any]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def drive(port: int, clients: int, calls: int, mix: str, outcomes: dict, warmup: bool, half: int = 0) -> None:
    """`calls` calls from `clients` clients at once; the second half goes on with the next call indexes."""
    from mcp import Client

    url = f"http://127.0.0.1:{port}/mcp"
    per_client = [calls // clients + (1 if k < calls % clients else 0) for k in range(clients)]

    async def one(k: int) -> None:
        async with Client(url, mode="legacy" if k % 2 == 0 else "auto") as client:
            first = half * per_client[k]
            for i in range(first, first + per_client[k]):
                name, args = call_for(k, i, "honest" if warmup else mix)
                try:
                    found = outcome(await client.call_tool(name, args))
                except Exception as exc:
                    found = ("raised", type(exc).__name__, str(exc))
                if not warmup:
                    outcomes[(k, i)] = found

    async with anyio.create_task_group() as tg:
        for k in range(clients):
            tg.start_soon(one, k)


def spawn(kind: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "serve", kind],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))},
    )


async def one_run(kind: str, calls: int, clients: int, mix: str, limit: float) -> Run:
    """One server process, warmed up, loaded, measured and stopped; everything bounded by `limit` seconds."""
    process = spawn(kind)
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)  # type: ignore[union-attr]
    drain.start()
    try:
        with anyio.fail_after(limit):
            line = await anyio.to_thread.run_sync(process.stdout.readline)  # type: ignore[union-attr]
            if not line:
                drain.join(10)
                raise RuntimeError(f"the {kind} server did not start: {b''.join(errors).decode()[-2000:]}")
            port = json.loads(line)["port"]
            await drive(port, clients, clients * WARMUP_CALLS, mix, {}, warmup=True)
            stats_warm = await get_json(port, STATS_PATH)
            rss_warm, cpu0 = read_status(process.pid), cpu_seconds(process.pid)
            outcomes: dict[tuple[int, int], tuple[Any, ...]] = {}
            seconds, stats_half = 0.0, []
            for half in (0, 1):  # the tables after the first half and after the second: the same sizes
                start = time.perf_counter()
                await drive(port, clients, calls // 2, mix, outcomes, warmup=False, half=half)
                seconds += time.perf_counter() - start
                if half == 0:
                    cpu_half = cpu_seconds(process.pid)
                    stats_half.append(await get_json(port, STATS_PATH))
                    cpu0 += cpu_seconds(process.pid) - cpu_half
            cpu_s, rss_end = cpu_seconds(process.pid) - cpu0, read_status(process.pid)
            stats_end = await get_json(port, STATS_PATH)
            process.stdin.close()  # type: ignore[union-attr]
            returncode = await anyio.to_thread.run_sync(process.wait, limit)
        found = Run(kind, len(outcomes), seconds, cpu_s, rss_warm, rss_end, outcomes, stats_warm, stats_end, returncode)
        found.stats_half = stats_half[0]
        return found
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        drain.join(10)


@dataclass
class Report:
    runs: list[Run]

    def of(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]

    def ratios(self, measure: Any) -> list[float]:
        """Wrapped over bare, per round: the two runs of a round are next to each other in time."""
        return [measure(w) / measure(b) for b, w in zip(self.of("bare"), self.of("wrapped"), strict=True)]

    @property
    def throughput_ratio(self) -> float:
        return statistics.median(self.ratios(lambda r: r.throughput))

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.ratios(lambda r: r.cpu_s / r.calls))

    @property
    def errors_added(self) -> int:
        """Calls whose outcome under loopwatch differs from the bare server's in the same round (a raise included)."""
        pairs = zip(self.of("bare"), self.of("wrapped"), strict=True)
        return sum(1 for b, w in pairs for key, seen in w.outcomes.items() if b.outcomes.get(key) != seen)

    @property
    def max_rss_growth_kb(self) -> dict[str, int]:
        return {kind: max(r.rss_growth_kb for r in self.of(kind)) for kind in ("bare", "wrapped")}


async def run(
    calls: int = 10_000, clients: int = 50, rounds: int = 2, mix: str = "honest", limit: float = 900
) -> Report:
    """Alternate bare and wrapped runs, `rounds` of each; which goes first alternates too."""
    runs: list[Run] = []
    for index in range(rounds):
        order = ("bare", "wrapped") if index % 2 == 0 else ("wrapped", "bare")
        runs.extend([await one_run(kind, calls, clients, mix, limit) for kind in order])
    return Report(runs)


def show(report: Report, calls: int, clients: int, mix: str) -> None:
    print(f"{calls} tools/call over streamable HTTP from {clients} concurrent clients, mix {mix}, "
          f"{len(report.of('bare'))} rounds, bare and wrapped alternating")
    for r in report.runs:
        print(f"  {r.kind:<8} {r.throughput:7.0f} calls/s  server CPU {r.cpu_s / r.calls * 1e6:6.0f} us/call  "
              f"raised {r.raised:<4} RSS {r.rss_warm_kb / 1024:6.1f} -> {r.rss_end_kb / 1024:6.1f} MB")
    growth = report.max_rss_growth_kb
    per_round = ", ".join(f"{r:.3f}" for r in report.ratios(lambda r: r.throughput))
    print(f"throughput ratio wrapped/bare, median of rounds: {report.throughput_ratio:.3f} ({per_round})"
          "   (target >= 0.97)")
    per_round = ", ".join(f"{r:.3f}" for r in report.ratios(lambda r: r.cpu_s / r.calls))
    print(f"server CPU per call ratio wrapped/bare, median of rounds: {report.cpu_ratio:.3f} ({per_round})")
    print(f"errors added by loopwatch: {report.errors_added}")
    print(f"RSS growth after warm-up, largest: wrapped {growth['wrapped'] / 1024:.1f} MB, "
          f"bare {growth['bare'] / 1024:.1f} MB   (target < 20 MB)")
    last = report.of("wrapped")[-1]
    keys = ("tool_rows", "method_rows", "known_tools", "recent_events", "durations_kept", "lags_kept",
            "metric_series", "snapshot_bytes")
    events = [e for r in report.of("wrapped") for e in r.stats_end.get("events", [])]
    print(f"events loopwatch reported in the wrapped runs: {len(events)}")
    for event in events[:10]:
        print(f"  {event}")
    print("loopwatch tables after warm-up -> half the calls -> all: "
          + ", ".join(f"{k} {last.stats_warm[k]} -> {last.stats_half[k]} -> {last.stats_end[k]}" for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mix", choices=("honest", "hostile"), default="honest")
    args = parser.parse_args()
    report = anyio.run(run, args.calls, args.clients, args.rounds, args.mix)
    show(report, args.calls, args.clients, args.mix)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        anyio.run(serve, sys.argv[2])
    else:
        main()
