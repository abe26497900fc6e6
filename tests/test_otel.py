"""OpenTelemetry: what loopwatch puts on request spans, for the three server kinds, through an in-memory exporter.

The SDK's and fastmcp's spans come from the global tracer provider, so this module installs one (or adds its
exporter to the one already installed) and clears the exporter before each test.
"""

import time
from types import SimpleNamespace

import anyio
import pytest
from mcp import Client, MCPError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import loopwatch
from loopwatch._blame import CallRecord
from loopwatch._events import BlockEvent, OffloadEvent
from loopwatch._options import OptionError
from loopwatch._sentinel import Heartbeat
from loopwatch.mcp import lowlevel_server
from loopwatch.otel import SpanCloser, _exporter, _exporter_names, configure_from_env, format_stack, ns

from helpers import FIXTURES, client_for, fresh, settle

pytestmark = pytest.mark.anyio

ASYNCIO = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
SERVERS = [("inventory_server", "mcp"), ("low_server", "server"), ("fm_server", "app")]
# Where each fixture's `lookup` blocks: the application line the block is blamed on.
BLOCKING_LINE = {
    # The blocking line in the application: for inventory_server, the sleep in its own helper module.
    "inventory_server": ("legacy", "fetch_record", "time.sleep(delay)"),
    "low_server": ("low_server", "call_tool", "time.sleep(0.3)"),
    "fm_server": ("fm_server", "lookup", "time.sleep(0.3)"),
}
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"



@pytest.fixture
def spans(exporter):
    exporter.clear()
    return exporter


@pytest.fixture
def handles():
    made = []
    yield made
    for handle in made:
        handle.uninstrument()


def instrumented(handles, module, attr, **options):
    server = fresh(module, attr)
    handle = loopwatch.instrument(server, log_blocks=False, **options)
    handles.append(handle)
    blocks: list[BlockEvent] = []
    handle.add_listener(lambda e: blocks.append(e) if isinstance(e, BlockEvent) else None)
    return server, handle, blocks


def line_of(module: str, text: str) -> int:
    source = (FIXTURES / f"{module}.py").read_text().splitlines()
    return next(number for number, line in enumerate(source, 1) if text in line)


async def finished(exporter, predicate, timeout: float = 10.0):
    """The finished spans once `predicate(spans)` holds (request spans of blocked calls end a step late)."""
    with anyio.fail_after(timeout):
        while True:
            done = exporter.get_finished_spans()
            if predicate(done):
                return done
            await anyio.sleep(0.01)


def server_spans(done, name):
    return [s for s in done if s.name == name and s.kind == SpanKind.SERVER]


def one_server_span(name):
    return lambda done: len(server_spans(done, name)) == 1


# -- request spans ------------------------------------------------------------------------------------


@ASYNCIO
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_each_request_span_gets_loop_time_execution_and_transport_and_is_not_duplicated(
    module, attr, spans, handles, anyio_backend
):
    server, handle, _ = instrumented(handles, module, attr)
    async with client_for(server) as client:
        await client.call_tool("ping", {"n": 1})
    done = await finished(spans, one_server_span("tools/call ping"))
    (span,) = server_spans(done, "tools/call ping")
    assert span.attributes["loopwatch.loop_blocked_s"] == 0.0
    assert span.attributes["loopwatch.execution"] == "loop"
    assert span.attributes["network.transport"] == "pipe"
    assert span.attributes["gen_ai.tool.name"] == "ping"
    assert span.instrumentation_scope.name != "loopwatch"  # the SDK's or fastmcp's own span, enriched


@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_a_block_is_an_event_on_the_blamed_calls_span_and_a_back_dated_child_span(
    module, attr, spans, handles, anyio_backend
):
    if module == "fm_server" and anyio_backend[0] == "trio":
        pytest.skip("fastmcp's client needs asyncio")
    server, handle, blocks = instrumented(handles, module, attr)
    async with client_for(server) as client:
        await client.call_tool("ping", {"n": 1})
        await client.call_tool("lookup", {"sku": "A-1"})
        await settle(handle.monitor)
    done = await finished(spans, lambda d: one_server_span("tools/call lookup")(d) and any(
        s.name == "event_loop.blocked" for s in d))
    (block,) = [b for b in blocks if b.tool == "lookup"]
    (call_span,) = server_spans(done, "tools/call lookup")
    (event,) = [e for e in call_span.events if e.name == "loopwatch.loop_blocked"]
    where, function, statement = BLOCKING_LINE[module]
    assert event.timestamp == ns(block.time)
    assert event.attributes["loopwatch.duration_s"] == block.duration_s
    assert event.attributes["loopwatch.kind"] == block.kind
    assert event.attributes["code.function.name"] == function
    assert event.attributes["code.file.path"] == str(FIXTURES / f"{where}.py")
    assert event.attributes["code.line.number"] == line_of(where, statement)
    assert event.attributes["code.stacktrace"] == format_stack(block.frames)
    assert f'{where}.py", line {line_of(where, statement)}, in {function}' in event.attributes["code.stacktrace"]
    assert call_span.attributes["loopwatch.loop_blocked_s"] == block.duration_s

    (blocked,) = [s for s in done if s.name == "event_loop.blocked" and s.parent == call_span.context]
    assert blocked.context.trace_id == call_span.context.trace_id
    assert blocked.start_time == ns(block.time)
    assert blocked.end_time - blocked.start_time == round(block.duration_s * 1e9)
    assert blocked.attributes["code.line.number"] == line_of(where, statement)


def test_the_span_events_code_line_is_the_blocking_application_line_not_the_library_leaf():
    """A sleep in the application's helper module, reached through a library: `code.*` names the helper's line
    (the culprit, the line to fix), the leaf keeps the library's."""
    from loopwatch._events import Frame
    from loopwatch.otel import block_attributes

    site = "/venv/lib/python3.11/site-packages"
    frames = (Frame("/srv/app/server.py", 12, "lookup"), Frame("/srv/app/helpers.py", 7, "fetch_record"),
              Frame(f"{site}/requests/sessions.py", 589, "request"))
    event = BlockEvent(time=1.0, duration_s=0.3, kind="wait", tool="lookup", method="tools/call", request_id="1",
                       session_id=None, cpu_s=0.0, samples=20, frames=frames, culprit=frames[1])
    attributes = block_attributes(event)
    assert (attributes["code.file.path"], attributes["code.line.number"]) == ("/srv/app/helpers.py", 7)
    assert attributes["code.function.name"] == "fetch_record"
    assert attributes["loopwatch.leaf"] == f"{site}/requests/sessions.py:589 in request"


@ASYNCIO
async def test_a_span_held_for_a_late_block_keeps_the_time_its_owner_ended_it(spans, handles, anyio_backend):
    server, handle, blocks = instrumented(handles, "inventory_server", "mcp")
    async with client_for(server) as client:
        with anyio.fail_after(10):
            await client.call_tool("lookup", {"sku": "A-1"})
        returned = time.time_ns()
        await settle(handle.monitor)
    done = await finished(spans, one_server_span("tools/call lookup"))
    (call_span,) = server_spans(done, "tools/call lookup")
    assert call_span.end_time <= returned  # ended when the call returned, not when the block was reported
    (block,) = [b for b in blocks if b.tool == "lookup"]
    assert ns(block.time) + round(block.duration_s * 1e9) > call_span.end_time  # reported after it ended


@ASYNCIO
async def test_a_block_outside_any_call_gets_a_span_of_its_own(spans, handles, anyio_backend):
    server, handle, blocks = instrumented(handles, "inventory_server", "mcp")
    async with client_for(server) as client:
        await client.call_tool("ping", {"n": 1})
        time.sleep(0.3)  # noqa: ASYNC251 - the test itself blocks the loop, outside any call
        await settle(handle.monitor)
    done = await finished(spans, lambda d: any(s.name == "event_loop.blocked" for s in d))
    (block,) = [b for b in blocks if b.culprit is not None and b.culprit.file == __file__]
    assert block.method is None
    (blocked,) = [s for s in done if s.name == "event_loop.blocked" and s.start_time == ns(block.time)]
    assert blocked.parent is None
    assert blocked.end_time - blocked.start_time == round(block.duration_s * 1e9)
    assert blocked.attributes["code.file.path"] == __file__
    assert "mcp.method.name" not in blocked.attributes


@ASYNCIO
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_traceparent_in_params_meta_is_honoured(module, attr, spans, handles, anyio_backend):
    server, handle, _ = instrumented(handles, module, attr)
    async with Client(lowlevel_server(server)) as client:
        await client.call_tool("ping", {"n": 1}, meta={"traceparent": TRACEPARENT})
    done = await finished(spans, one_server_span("tools/call ping"))
    (span,) = server_spans(done, "tools/call ping")
    assert span.context.trace_id == TRACE_ID
    assert span.parent.span_id == PARENT_ID and span.parent.is_remote
    assert "loopwatch.loop_blocked_s" in span.attributes


# -- where no span is opened, loopwatch opens one -----------------------------------------------------


def without_sdk_span(server):
    server.middleware[:] = [m for m in server.middleware if type(m).__name__ != "OpenTelemetryMiddleware"]
    return server


@ASYNCIO
async def test_a_server_without_a_tracing_middleware_gets_one_semconv_server_span(spans, handles, anyio_backend):
    server = without_sdk_span(fresh("low_server", "server"))
    handle = loopwatch.instrument(server, log_blocks=False)
    handles.append(handle)
    async with Client(server) as client:
        await client.call_tool("ping", {}, meta={"traceparent": TRACEPARENT})
        await client.call_tool("lookup", {"sku": "A-1"})
        unknown = await client.call_tool("nope", {})
        assert unknown.is_error
        with pytest.raises(MCPError, match="inventory backend unavailable"):
            await client.call_tool("fail", {})
        await settle(handle.monitor)
    done = await finished(spans, lambda d: len([s for s in d if s.kind == SpanKind.SERVER and
                                                 s.name.startswith("tools/call")]) == 4)
    (ping,) = server_spans(done, "tools/call ping")
    assert ping.instrumentation_scope.name == "loopwatch"
    assert dict(ping.attributes) == {
        "mcp.method.name": "tools/call",
        "mcp.protocol.version": ping.attributes["mcp.protocol.version"],
        "jsonrpc.request.id": ping.attributes["jsonrpc.request.id"],
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "ping",
        "loopwatch.loop_blocked_s": 0.0,
        "loopwatch.execution": "loop",
        "network.transport": "pipe",
    }
    assert ping.context.trace_id == TRACE_ID and ping.parent.span_id == PARENT_ID
    (lookup,) = server_spans(done, "tools/call lookup")
    assert len([e for e in lookup.events if e.name == "loopwatch.loop_blocked"]) == 1
    (nope,) = server_spans(done, "tools/call nope")
    assert nope.attributes["error.type"] == "tool_error" and nope.status.status_code == StatusCode.ERROR
    (fail,) = server_spans(done, "tools/call fail")
    assert fail.attributes["error.type"] == "-32001" and fail.status.status_code == StatusCode.ERROR
    assert fail.attributes["rpc.response.status_code"] == "-32001"


@ASYNCIO
async def test_fastmcp_with_its_telemetry_off_gets_a_span_from_loopwatch(spans, handles, anyio_backend, monkeypatch):
    import fastmcp

    monkeypatch.setattr(fastmcp.settings, "telemetry_mode", "off")
    server, handle, blocks = instrumented(handles, "fm_server", "app")
    async with Client(lowlevel_server(server)) as client:
        await client.call_tool("lookup", {"sku": "A-1"}, meta={"traceparent": TRACEPARENT})
        await settle(handle.monitor)
    done = await finished(spans, one_server_span("tools/call lookup"))
    (span,) = server_spans(done, "tools/call lookup")
    assert span.instrumentation_scope.name == "loopwatch"
    assert span.context.trace_id == TRACE_ID
    blocked = [e for e in span.events if e.name == "loopwatch.loop_blocked"]
    assert [e.attributes["code.function.name"] for e in blocked] == ["lookup"]
    assert not [s for s in done if s.instrumentation_scope.name == "fastmcp"]


# -- offload decisions, the tracer provider option, uninstrument --------------------------------------


@ASYNCIO
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_an_offload_decision_is_an_event_on_the_span_of_the_call_that_caused_it(
    module, attr, spans, handles, anyio_backend
):
    server, handle, _ = instrumented(handles, module, attr, offload="auto")
    async with client_for(server) as client:
        await client.list_tools()  # a low-level server's tool names are learnt from its listing
        await client.call_tool("lookup", {"sku": "A-1"})
        await settle(handle.monitor)
        await client.call_tool("lookup", {"sku": "A-2"})
    done = await finished(spans, lambda d: len(server_spans(d, "tools/call lookup")) == 2)
    first, second = sorted(server_spans(done, "tools/call lookup"), key=lambda s: s.start_time)
    assert sorted(e.name for e in first.events) == ["loopwatch.loop_blocked", "loopwatch.offload"]
    (offload,) = [e.attributes for e in first.events if e.name == "loopwatch.offload"]
    assert offload["gen_ai.tool.name"] == "lookup"
    assert offload["loopwatch.offload.action"] == "offloaded"
    assert offload["loopwatch.offload.blocks"] == 1
    assert "blocking the loop" in offload["loopwatch.offload.reason"]
    assert first.attributes["loopwatch.execution"] == "loop"
    assert second.attributes["loopwatch.execution"] == "thread"
    assert second.attributes["loopwatch.loop_blocked_s"] == 0.0 and not second.events


def test_a_decision_outside_any_call_gets_a_span_of_its_own(spans, handles):
    server, handle, _ = instrumented(handles, "inventory_server", "mcp")
    handle.monitor.post(OffloadEvent(1_800_000_000.25, "ping", "pinned", "manual", 0))
    (span,) = [s for s in spans.get_finished_spans() if s.name == "loopwatch.offload ping"]
    assert span.start_time == span.end_time == ns(1_800_000_000.25)
    assert [(e.name, e.attributes["loopwatch.offload.action"]) for e in span.events] == [("loopwatch.offload", "pinned")]


@ASYNCIO
async def test_the_tracer_provider_option_receives_loopwatchs_own_spans(spans, handles, anyio_backend):
    own = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own))
    server, handle, blocks = instrumented(handles, "inventory_server", "mcp", tracer_provider=provider)
    async with client_for(server) as client:
        await client.call_tool("lookup", {"sku": "A-1"})
        await settle(handle.monitor)
    await finished(own, lambda d: any(s.name == "event_loop.blocked" for s in d))
    done = await finished(spans, one_server_span("tools/call lookup"))
    assert not [s for s in done if s.name == "event_loop.blocked"]
    (call_span,) = server_spans(done, "tools/call lookup")
    assert [s for s in own.get_finished_spans() if s.parent == call_span.context]
    provider.shutdown()


@ASYNCIO
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_uninstrument_removes_every_hook_and_middleware_it_added(module, attr, handles, anyio_backend):
    server = fresh(module, attr)
    chain = lowlevel_server(server).middleware
    before = list(chain)
    handle = loopwatch.instrument(server, log_blocks=False)
    monitor = handle.monitor
    handle.uninstrument()
    handle.uninstrument()
    assert chain == before
    assert monitor.block_hooks == monitor.blocking_hooks == monitor.lag_observers == []
    assert handle.middleware.hooks == ()


@ASYNCIO
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_without_a_tracer_provider_requests_carry_no_hook_and_one_set_later_is_joined(
    module, attr, spans, handles, anyio_backend, monkeypatch
):
    unset = trace.ProxyTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: unset)  # as in a program that set none (yet)
    server = fresh(module, attr)
    chain = lowlevel_server(server).middleware
    before = list(chain)
    handle = loopwatch.instrument(server, log_blocks=False)
    handles.append(handle)
    assert handle.middleware.hooks == ()
    assert [m for m in chain if m not in before] == [handle.middleware]  # no inner middleware either
    async with client_for(server) as client:
        await client.call_tool("ping", {"n": 1})
        assert handle.middleware.hooks == ()
        monkeypatch.undo()  # the program sets its provider while the server runs
        with anyio.fail_after(15):
            while not handle.middleware.hooks:  # noqa: ASYNC110 - joined by the loop's once-a-second check
                await anyio.sleep(0.05)
        spans.clear()
        await client.call_tool("ping", {"n": 2})
    done = await finished(spans, one_server_span("tools/call ping"))
    (span,) = server_spans(done, "tools/call ping")
    assert span.attributes["loopwatch.execution"] == "loop"
    assert span.attributes["gen_ai.tool.name"] == "ping"


# -- the held end, step by step (no threads, no sleeps) -----------------------------------------------


def test_a_span_ending_mid_block_is_held_until_the_watchdog_steps_past_the_next_beat():
    provider = TracerProvider()
    done = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(done))
    now = [100.0]
    heartbeat = Heartbeat(0.01, 0.1, clock=lambda: now[0])
    monitor = SimpleNamespace(heartbeat=heartbeat, active=True, watchdog_steps=7)
    closer = SpanCloser(monitor, clock=lambda: now[0])
    call = CallRecord("tools/call", "lookup", 1, None, "lookup")
    span = provider.get_tracer("t").start_span("tools/call lookup")
    now[0] = 100.3
    closer.finish(call, span)  # the loop has not beaten for 300 ms: a block is in progress
    span.end(end_time=123)
    assert done.get_finished_spans() == ()

    closer.tick()  # the sentinel has not beaten yet
    heartbeat.record(1, 100.31, 0.3)
    closer.tick()  # it has: its late record may not be polled yet
    assert done.get_finished_spans() == ()
    call.blocked_s = 0.3
    monitor.watchdog_steps = 8
    closer.tick()  # a later step: the poll has reported the block
    (ended,) = done.get_finished_spans()
    assert ended.end_time == 123
    assert ended.attributes["loopwatch.loop_blocked_s"] == 0.3
    assert "end" not in vars(span)


def test_a_span_ending_on_a_healthy_loop_is_not_held():
    provider = TracerProvider()
    done = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(done))
    heartbeat = Heartbeat(0.01, 0.1)
    closer = SpanCloser(SimpleNamespace(heartbeat=heartbeat, active=True, watchdog_steps=0))
    span = provider.get_tracer("t").start_span("tools/call ping")
    closer.finish(CallRecord("tools/call", "ping", 1, None, "ping"), span)
    assert "end" not in vars(span)
    span.end()
    assert len(done.get_finished_spans()) == 1


# -- the SDK for `loopwatch run` ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "inventory"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, []),
    ],
)
def test_the_exporters_come_from_otel_traces_exporter_or_an_otlp_endpoint(environ, names):
    assert _exporter_names(environ) == names


def test_an_exporter_loopwatch_does_not_know_is_a_clear_option_error():
    with pytest.raises(OptionError, match="OTEL_TRACES_EXPORTER=zipkin: loopwatch run supports otlp, console, none"):
        configure_from_env(environ={"OTEL_TRACES_EXPORTER": "zipkin"})


def test_an_otlp_protocol_the_python_exporters_lack_is_a_clear_option_error():
    with pytest.raises(OptionError, match="'http/json' is not supported"):
        _exporter("otlp", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_a_tracer_provider_the_program_set_is_kept(exporter):
    before = trace.get_tracer_provider()
    assert configure_from_env(environ={"OTEL_TRACES_EXPORTER": "console"}) is None
    assert trace.get_tracer_provider() is before
