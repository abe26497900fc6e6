"""Blame on a workload of seven blockers: is every block found, with the right kind and the right line?

    python benchmarks/bench_blame.py [--rounds 5] [--honest 20] [--backends asyncio,uvloop,trio] [--crunch N]

The server (benchmarks/blame_workload/server.py, in this process, driven by the SDK's in-memory `Client`)
has seven tools that block the loop, each its own way: a sleep in the application's helper module, a
pure-Python crunch, one native call that holds the GIL (`sum(range(...))`), synchronous HTTP to a local
server that answers after 0.3 s, an import of a slow module (dropped from `sys.modules` before each round),
`subprocess.run`, and a lock another thread holds for 0.3 s. Each round calls each blocker once with
`--honest` honest calls beside it (they await, never block), on each backend, with loopwatch's detection and
traces on (offload off: each round must block again). `--crunch N` runs the crunch N steps (default: about
0.3 s, like the others; 2000000 puts it just over the 0.1 s threshold on a quiet machine, two or three looks).

For each backend it prints, out of rounds x 7: blocks found (exactly one block blamed on the blocker), the
kind right, the line right (the `file:line` the one-line report ends its `at ... <- ...` chain with names
the blocking application line), and the OpenTelemetry span event's `code.line.number` on that line; the
GIL-held call's line (out of rounds); honest calls blamed, and extra reports (other blocks during the round;
collections, told `during` a call or outside any, charged to nobody, counted apart).
"""

from __future__ import annotations

import argparse
import http.server
import importlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

WORKLOAD = Path(__file__).parent / "blame_workload"
EXPECTED_KIND = {
    "sleeper": "wait", "crunch": "cpu", "native": "gil", "http": "wait", "importer": "import",
    "subproc": "wait", "locked": "wait",
}
MARKER = {
    "sleeper": ("helpers.py", "BLOCKER sleep"), "crunch": ("server.py", "BLOCKER crunch"),
    "native": ("server.py", "BLOCKER native"), "http": ("server.py", "BLOCKER http"),
    "importer": ("server.py", "BLOCKER import"), "subproc": ("server.py", "BLOCKER subprocess"),
    "locked": ("server.py", "BLOCKER lock"),
}


def expected_line(tool: str) -> tuple[str, int]:
    name, marker = MARKER[tool]
    path = WORKLOAD / name
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if marker in text)
    return str(path), line


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        time.sleep(0.3)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def start_http() -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    # A long poll interval: a thread that wakes every half second would take the GIL now and then just as a
    # native call lets it go (that costs the GIL-held call its line: measured here, not hidden; see README).
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 60}, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def hold_lock(lock: threading.Lock, ready: threading.Event) -> None:
    with lock:
        ready.set()
        time.sleep(0.3)


def load_server() -> Any:
    sys.path.insert(0, str(WORKLOAD))
    for name in ("server", "helpers", "slow_module"):
        sys.modules.pop(name, None)
    return importlib.import_module("server")


def tracing() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def span_lines(exporter: Any, tool: str) -> list[int]:
    lines = []
    for span in exporter.get_finished_spans():
        if span.name == f"tools/call {tool}":
            lines += [e.attributes.get("code.line.number") for e in span.events if e.name == "loopwatch.loop_blocked"]
    return lines


ARGS: dict[str, dict[str, Any]] = {}


async def trial(client: Any, module: Any, tool: str, honest: int) -> None:
    if tool == "importer":
        sys.modules.pop("slow_module", None)
    if tool == "locked":
        ready = threading.Event()
        threading.Thread(target=hold_lock, args=(module.LOCK, ready), daemon=True).start()
        ready.wait(5)
    async with anyio.create_task_group() as tg:
        for i in range(honest):
            tg.start_soon(client.call_tool, "ping", {"n": i})
        await anyio.sleep(0.005)
        tg.start_soon(client.call_tool, tool, ARGS.get(tool, {}))


async def run_backend(rounds: int, honest: int, exporter: Any) -> dict[str, Any]:
    from mcp import Client

    import loopwatch

    module = load_server()
    module.URL["value"] = start_http()
    handle = loopwatch.instrument(module.mcp, threshold=0.1, log_blocks=False, offload="off")
    tally: dict[str, Any] = {"found": 0, "kind": 0, "line": 0, "otel": 0, "gil_line": 0, "honest_blamed": 0,
                             "extra": 0, "gc_outside": 0, "misses": []}
    async with Client(module.mcp) as client:
        for tool in ["ping", *EXPECTED_KIND]:  # warm-up: first-call imports, not counted
            await trial(client, module, tool, 0)
        await handle.monitor.settle()
        for _ in range(rounds):
            for tool in EXPECTED_KIND:
                seen = len(handle.monitor.recent)
                exporter.clear()
                with anyio.fail_after(120):
                    await trial(client, module, tool, honest)
                    await handle.monitor.settle()
                score(tally, tool, list(handle.monitor.recent)[seen:], span_lines(exporter, tool))
    handle.uninstrument()
    return tally


def score(tally: dict[str, Any], tool: str, events: list[Any], otel_lines: list[int]) -> None:
    import loopwatch

    blocks = [e for e in events if isinstance(e, loopwatch.BlockEvent)]
    mine = [e for e in blocks if e.tool == tool and e.kind != "gc"]
    # A collection is told `during` the call it ran in, and charged to nobody: counted apart, as are those
    # outside any call (the heap's cost: the test process's whole heap, loaded as the machine is).
    tally["honest_blamed"] += sum(
        1 for e in blocks if e.tool == "ping" and (e.kind != "gc" or getattr(e, "offloaded", False))
    )
    tally["gc_outside"] += sum(1 for e in blocks if e.kind == "gc" and not getattr(e, "offloaded", False))
    extra = [e for e in blocks if e.tool != tool and not (e.kind == "gc" and not getattr(e, "offloaded", False))]
    tally["extra"] += len(extra)
    tally["misses"] += [f"extra during {tool}: {e.describe()}" for e in extra]
    if len(mine) != 1:
        tally["extra"] += max(0, len(mine) - 1)
        tally["misses"].append(f"{tool}: {len(mine)} blocks blamed on it: {[e.describe() for e in mine]}")
        return
    [event] = mine
    tally["found"] += 1
    file, line = expected_line(tool)
    shown = f"{Path(file).name}:{line} in "
    kind_ok = event.kind == EXPECTED_KIND[tool]
    line_ok = event.culprit is not None and (event.culprit.file, event.culprit.line) == (file, line)
    line_ok = line_ok and shown in event.describe()
    tally["kind"] += kind_ok
    tally["line"] += line_ok
    tally["otel"] += otel_lines == [line] and event.culprit is not None and event.culprit.file == file
    if tool == "native":
        released = getattr(event, "released_at", None)  # (None on loopwatch before it named GIL-held calls)
        tally["gil_line"] += released is not None and (released.file, released.line) == (file, line)
    if not (kind_ok and line_ok):
        tally["misses"].append(f"{tool}: {event.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--honest", type=int, default=20)
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    parser.add_argument("--crunch", type=int, default=None, help="steps of the crunch (default: the workload's)")
    args = parser.parse_args()
    if args.crunch is not None:
        ARGS["crunch"] = {"n": args.crunch}
    exporter = tracing()
    total = args.rounds * len(EXPECTED_KIND)
    for backend in args.backends.split(","):
        name, options = ("asyncio", {"use_uvloop": True}) if backend == "uvloop" else (backend, {})
        tally = anyio.run(run_backend, args.rounds, args.honest, exporter, backend=name, backend_options=options)
        print(f"{backend:8} found {tally['found']}/{total}  kind {tally['kind']}/{total}  line {tally['line']}/{total}"
              f"  otel line {tally['otel']}/{total}  GIL-held call's line {tally['gil_line']}/{args.rounds}"
              f"  honest blamed {tally['honest_blamed']}  extra reports {tally['extra']}"
              f"  (collections, the heap's: {tally['gc_outside']})")
        for miss in tally["misses"]:
            print(f"    miss: {miss}")


if __name__ == "__main__":
    main()
