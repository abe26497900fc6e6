"""`loopwatch run` with tracing set up from OTEL_* variables, through the real OTLP/HTTP exporter.

A small OTLP/HTTP receiver runs in the test (a thread, 127.0.0.1 only) and decodes each protobuf payload;
the server runs as `loopwatch run ... --transport streamable-http` in a child process, and its block events
come from `--events`, so spans are compared with what the watchdog measured, never with the wall clock.
"""

import gzip
import os
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from helpers import free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ASYNCIO = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
FIXTURES = Path(__file__).parent.parent / "fixtures"
SERVER = FIXTURES / "inventory_server.py"


class Receiver:
    """An OTLP/HTTP trace endpoint: `answer` is "ok", "silent" (never responds) or "refuse" (503)."""

    def __init__(self, answer: str = "ok") -> None:
        self.answer = answer
        self.payloads: list[ExportTraceServiceRequest] = []
        self.released = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.answer == "silent":
                    receiver.released.wait(30)
                    return
                if receiver.answer == "refuse":
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.payloads.append(ExportTraceServiceRequest.FromString(decompress(body, self.headers)))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def spans(self) -> list[tuple[dict, Span]]:
        """(resource attributes, span) for every span received so far."""
        found = []
        for payload in list(self.payloads):
            for resource_spans in payload.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found


def decompress(body: bytes, headers) -> bytes:
    encoding = headers.get("Content-Encoding", "")
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def attributes(pairs) -> dict:
    values = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values




def line_of(path: Path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def ns(seconds: float) -> int:
    return round(seconds * 1e6) * 1000


class Served:
    """`loopwatch run` over streamable HTTP in a child process, stopped (and reaped) on exit."""

    def __init__(self, tmp_path: Path, otel_env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.events = tmp_path / "events.jsonl"
        self.stdout = tmp_path / "stdout.txt"
        self.stderr = tmp_path / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))}
        env.update({"OTEL_SERVICE_NAME": "inventory-e2e", "OTEL_BSP_SCHEDULE_DELAY": "50", **otel_env})
        command = [
            sys.executable, "-m", "loopwatch", "run", str(SERVER), "--transport", "streamable-http",
            "--host", "127.0.0.1", "--port", str(self.port), "--events", str(self.events), *args,
        ]
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def ready(self) -> None:
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"loopwatch run exited {self.process.returncode}: {self.stderr.read_text()}")
            try:
                stream = await anyio.connect_tcp("127.0.0.1", self.port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return

    def all_events(self) -> list[dict]:
        return read_events(self.events)

    def blocks(self, tool: str | None = None) -> list[dict]:
        blocks = [e for e in self.all_events() if e["event"] == "loop_blocked"]
        return [b for b in blocks if b["tool"] == tool] if tool else blocks

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await anyio.to_thread.run_sync(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await anyio.to_thread.run_sync(self.process.wait, 10)


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(otel_env: dict[str, str], *args: str) -> Served:
        started.append(Served(tmp_path, otel_env, *args))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def by_name(spans, name):
    return [span for _, span in spans if span.name == name]


@ASYNCIO
async def test_a_block_reaches_the_collector_as_an_event_on_its_call_and_a_back_dated_span(served, anyio_backend):
    with Receiver() as receiver:
        server = served({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"})
        with anyio.fail_after(60):
            await server.ready()
            async with Client(server.url, mode="legacy") as client:
                assert (await client.call_tool("ping", {"n": 2})).structured_content == {"result": 2}
                assert not (await client.call_tool("lookup", {"sku": "A-1"})).is_error
                while not server.blocks("lookup") or not by_name(receiver.spans(), "event_loop.blocked") or not [
                    s for s in by_name(receiver.spans(), "tools/call lookup") if s.events
                ]:
                    await anyio.sleep(0.05)
        spans = receiver.spans()
    (block,) = server.blocks("lookup")
    (call,) = by_name(spans, "tools/call lookup")
    resource, _ = next((r, s) for r, s in spans if s.span_id == call.span_id)
    assert resource["service.name"] == "inventory-e2e"
    assert call.kind == Span.SpanKind.SPAN_KIND_SERVER
    call_attrs = attributes(call.attributes)
    assert call_attrs["jsonrpc.request.id"] == block["request_id"]
    assert call_attrs["loopwatch.loop_blocked_s"] == block["duration_s"]
    assert call_attrs["loopwatch.execution"] == "loop"
    assert call_attrs["network.transport"] == "tcp"
    assert call_attrs["mcp.session.id"]

    (event,) = [e for e in call.events if e.name == "loopwatch.loop_blocked"]
    found = attributes(event.attributes)
    # The blocking line in the application: the sleep in the server's own helper module.
    helper = SERVER.parent / "legacy.py"
    line = line_of(helper, "time.sleep(delay)")
    assert Path(found["code.file.path"]).resolve() == helper.resolve()
    assert found["code.line.number"] == line == block["culprit"]["line"]
    assert found["code.function.name"] == "fetch_record"
    assert found["loopwatch.duration_s"] == block["duration_s"]
    assert found["loopwatch.kind"] == block["kind"]
    assert f"line {line}, in fetch_record" in found["code.stacktrace"]
    assert f"line {line_of(SERVER, 'record = legacy.fetch_record(sku)')}, in lookup" in found["code.stacktrace"]
    assert event.time_unix_nano == ns(block["time"])

    (blocked,) = [s for s in by_name(spans, "event_loop.blocked") if s.parent_span_id == call.span_id]
    assert blocked.trace_id == call.trace_id
    assert blocked.start_time_unix_nano == ns(block["time"])
    assert blocked.end_time_unix_nano - blocked.start_time_unix_nano == round(block["duration_s"] * 1e9)
    assert len(by_name(spans, "tools/call ping")[0].events) == len(server.blocks("ping"))

    decisions = [e for e in server.all_events() if e["event"] == "offloaded" and e["tool"] == "lookup"]
    offloads = [attributes(e.attributes) for e in call.events if e.name == "loopwatch.offload"]
    assert [(o["loopwatch.offload.action"], o["loopwatch.offload.reason"]) for o in offloads] == [
        ("offloaded", d["reason"]) for d in decisions
    ]
    assert server.stdout.read_text() == ""


@ASYNCIO
@pytest.mark.parametrize("collector", ["closed port", "silent", "refusing"])
async def test_a_collector_that_is_down_slow_or_refusing_does_not_touch_calls_or_the_loop(
    collector, served, anyio_backend
):
    with Receiver("silent" if collector == "silent" else "refuse") as receiver:
        port = free_port() if collector == "closed port" else receiver.port
        # An export on the loop would stall it for the exporter's retry backoff (1 s) or timeout (2 s);
        # a 0.5 s threshold sees that and not the garbage-collection pauses of a busy shared machine.
        otel_env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        }
        server = served(otel_env, "--threshold", "0.5")
        with anyio.fail_after(90):
            await server.ready()
            async with Client(server.url, mode="legacy") as client:
                results = [(await client.call_tool("ping", {"n": n})).structured_content for n in range(60)]
            while "Failed to export" not in server.stderr.read_text() and "retrying" not in server.stderr.read_text():
                await anyio.sleep(0.05)
            await server.stop()
    assert results == [{"result": n} for n in range(60)]
    assert server.blocks() == []
    assert server.stdout.read_text() == ""


@ASYNCIO
async def test_the_console_exporter_writes_to_stderr_so_stdio_stays_clean(tmp_path, anyio_backend):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))}
    env.update({"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"})
    params = StdioServerParameters(command=sys.executable, args=["-m", "loopwatch", "run", str(SERVER)], env=env)
    errors = tmp_path / "stderr.txt"
    with anyio.fail_after(60), errors.open("w") as errlog:
        from mcp.client.stdio import stdio_client

        async with Client(stdio_client(params, errlog=errlog)) as client:
            assert (await client.call_tool("ping", {"n": 4})).structured_content == {"result": 4}
            while '"name": "tools/call ping"' not in errors.read_text():
                await anyio.sleep(0.05)
    printed = errors.read_text()
    assert '"loopwatch.loop_blocked_s": 0.0' in printed
    assert '"network.transport": "pipe"' in printed
