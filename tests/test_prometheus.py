"""Prometheus metrics: names and labels as documented, bounded series, exposition, multiprocess mode."""

import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.server.mcpserver import MCPServer
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import OffloadEvent
from loopwatch import prometheus as lw_prometheus
from loopwatch._blame import CallRecord
from loopwatch.cli import build_parser, run_options

from helpers import FIXTURES, client_for, fresh

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "grafana" / "loopwatch.json"
RULES = ROOT / "dashboards" / "prometheus" / "loopwatch.rules.yml"
DURATION = "mcp_server_operation_duration_seconds"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def registry():
    return CollectorRegistry()


def instrumented(registry, module="inventory_server", attr="mcp", **options):
    server = fresh(module, attr)
    handle = loopwatch.instrument(server, metrics_registry=registry, log_blocks=False, **options)
    return server, handle


def exporter_of(handle):
    return next(e for e in handle.extensions if isinstance(e, lw_prometheus.PrometheusExporter))


def calls(registry, tool, error="", method="tools/call", transport="pipe"):
    labels = {
        "mcp_method_name": method,
        "gen_ai_tool_name": tool,
        "error_type": error,
        "network_transport": transport,
    }
    return registry.get_sample_value(f"{DURATION}_count", labels) or 0


def series(registry):
    """Every (name, labels) the registry exposes, but for blocks (a slow machine may add a block anywhere)."""
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for m in registry.collect()
        for s in m.samples
        if not s.name.startswith("loopwatch_event_loop_block")
    }


def tool_labels(registry):
    return {
        s.labels["gen_ai_tool_name"] for m in registry.collect() for s in m.samples if "gen_ai_tool_name" in s.labels
    }


def blocks(registry, tool):
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "loopwatch_event_loop_blocks_total" and s.labels["gen_ai_tool_name"] == tool
    )


async def eventually(check, limit=10.0):
    """Block events reach the metrics on the watchdog thread: poll for them, bounded."""
    with anyio.fail_after(limit):
        while not check():  # noqa: ASYNC110 - the watchdog thread sets no event to wait on
            await anyio.sleep(0.02)


# -- per-call metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "attr"), [("inventory_server", "mcp"), ("low_server", "server"), ("fm_server", "app")]
)
async def test_tool_calls_are_timed_with_the_semantic_convention_labels(registry, module, attr):
    server, _ = instrumented(registry, module, attr)
    async with client_for(server) as client:
        await client.list_tools()
        await client.call_tool("ping", {"n": 1})
        await client.call_tool("ping", {"n": 2})
    assert calls(registry, "ping") == 2
    assert registry.get_sample_value(f"{DURATION}_sum", _labels("ping")) > 0
    bucket = registry.get_sample_value(f"{DURATION}_bucket", {**_labels("ping"), "le": "300.0"})
    assert bucket == 2
    assert registry.get_sample_value(f"{DURATION}_bucket", {**_labels("ping"), "le": "0.0001"}) is not None


def _labels(tool, error=""):
    return {
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": tool,
        "error_type": error,
        "network_transport": "pipe",
    }


async def test_a_result_with_is_error_is_labelled_tool_error(registry):
    server, _ = instrumented(registry)
    async with Client(server) as client:
        result = await client.call_tool("fail", {"reason": "out of stock"})
    assert result.is_error
    assert calls(registry, "fail", error="tool_error") == 1
    assert calls(registry, "fail") == 0


async def test_a_json_rpc_error_is_labelled_with_its_code(registry):
    server, _ = instrumented(registry, "low_server", "server")
    async with Client(server) as client:
        await client.list_tools()
        with pytest.raises(MCPError):
            await client.call_tool("fail", {})
    assert calls(registry, "_OTHER", error="-32001") == 1  # the server does not list "fail"


async def test_calls_to_300_unknown_tool_names_add_no_series(registry):
    server, handle = instrumented(registry)
    async with Client(server) as client:
        await client.call_tool("no_such_tool", {})
        exporter_of(handle).flush()  # requests are otherwise recorded within a watchdog poll
        before = series(registry)
        names = {f"tool_{uuid.uuid4().hex}" for _ in range(300)}
        for name in names:
            await client.call_tool(name, {})
    assert series(registry) == before
    assert calls(registry, "_OTHER", error="tool_error") == 301
    assert tool_labels(registry) <= {
        "",
        "_OTHER",
        "ping",
        "lookup",
        "checksum",
        "report",
        "fail",
        "sync_lookup",
    }
    assert len(exporter_of(handle).calls._duration_children) < 10


async def test_unknown_methods_are_labelled_other_and_add_no_series(registry):
    server, handle = instrumented(registry)
    async with Client(server) as client:
        send = client.session._dispatcher.send_raw_request  # the SDK has no public way to send any method
        with pytest.raises(MCPError):
            await send("bogus/first", None, {})
        exporter_of(handle).flush()
        before = series(registry)
        for _ in range(100):
            with pytest.raises(MCPError):
                await send(f"bogus/{uuid.uuid4().hex}", None, {})
    assert series(registry) == before
    assert calls(registry, "", error="-32601", method="_OTHER") == 101
    assert len(exporter_of(handle).calls._duration_children) < 10


def test_requests_are_recorded_at_once_when_the_loop_is_not_watched(registry):
    _, handle = instrumented(registry)
    hook = exporter_of(handle).calls
    call = CallRecord("tools/call", "ping", 1, SimpleNamespace(request=None), "ping")
    hook.start(call)
    hook.end(call, 0.001, None)
    assert not hook.pending
    assert calls(registry, "ping") == 1


async def test_in_flight_counts_the_tool_calls_being_served(registry):
    server = MCPServer("gate")
    release = anyio.Event()
    entered = anyio.Event()

    @server.tool()
    async def wait() -> str:
        entered.set()
        await release.wait()
        return "done"

    loopwatch.instrument(server, metrics_registry=registry, log_blocks=False)
    in_flight = {"gen_ai_tool_name": "wait"}
    async with Client(server) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "wait", {})
        with anyio.fail_after(10):
            await entered.wait()
        # Recorded by the watchdog thread, off the loop, within one of its polls.
        await eventually(lambda: registry.get_sample_value("loopwatch_tool_calls_in_flight", in_flight) == 1)
        release.set()
    assert registry.get_sample_value("loopwatch_tool_calls_in_flight", in_flight) == 0


# -- the loop -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "anyio_backend",
    [("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})],
    ids=["asyncio", "uvloop", "trio"],
)
async def test_a_block_is_counted_for_the_tool_that_blocked(registry, anyio_backend):
    server, handle = instrumented(registry)
    async with Client(server) as client:
        await client.call_tool("lookup", {"sku": "a1"})
        await handle.monitor.settle()
        await eventually(lambda: blocks(registry, "lookup") == 1)
        assert registry.get_sample_value("loopwatch_event_loop_lag_max_seconds") > 0
    kinds = {
        s.labels["kind"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "loopwatch_event_loop_blocked_seconds_total" and s.labels["gen_ai_tool_name"] == "lookup"
    }
    assert set(kinds) <= {"cpu", "wait", "gil", "import", "gc", "unknown"}
    assert sum(kinds.values()) > 0
    assert registry.get_sample_value("loopwatch_event_loop_lag_seconds_count") > 0
    assert registry.get_sample_value("loopwatch_event_loop_lag_max_seconds") == 0  # no longer watched


async def test_a_block_outside_any_call_has_an_empty_tool_label(registry):
    server, handle = instrumented(registry)
    async with Client(server) as client:
        await client.call_tool("ping", {})
        time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is blocked, by no tool call
        await handle.monitor.settle()
        await eventually(lambda: blocks(registry, "") >= 1)
    assert blocks(registry, "ping") == 0


async def test_the_loop_threads_cpu_time_is_counted(registry):
    server, _ = instrumented(registry)
    cpu = "loopwatch_event_loop_thread_cpu_seconds_total"
    async with Client(server) as client:
        with anyio.fail_after(15):
            while not registry.get_sample_value(cpu):
                await client.call_tool("checksum", {"rounds": 2000})
                await anyio.sleep(0.05)
    assert registry.get_sample_value(cpu) > 0


async def test_the_series_of_listed_tools_exist_at_zero_before_anything_happens_to_them(registry):
    server, _ = instrumented(registry)
    async with Client(server) as client:
        await client.list_tools()
        await client.call_tool("ping", {})  # the first request after a listing creates them
    blocked = "loopwatch_event_loop_blocked_seconds_total"
    for tool in ("lookup", "checksum", "", "_OTHER"):
        for kind in ("cpu", "wait", "gil", "import", "gc", "unknown"):
            value = registry.get_sample_value(blocked, {"gen_ai_tool_name": tool, "kind": kind})
            # The test process's collector may hold the loop at any time (a full pass here took 108 ms once):
            # its series must exist, its value is the heap's business.
            assert value == 0 or (kind == "gc" and value is not None), (tool, kind, value)
    assert registry.get_sample_value("loopwatch_tool_calls_in_flight", {"gen_ai_tool_name": "lookup"}) == 0
    assert offloaded(registry, "lookup") == 0
    decisions = {"gen_ai_tool_name": "lookup", "action": "offloaded"}
    assert registry.get_sample_value("loopwatch_tool_offload_decisions_total", decisions) == 0


def test_the_window_max_forgets_values_older_than_its_window():
    window = lw_prometheus.WindowMax(60)
    assert window.add(0.5, now=1000.0) == 0.5
    assert window.add(0.1, now=1030.0) == 0.5
    assert window.add(0.2, now=1059.9) == 0.5
    assert window.add(0.0, now=1060.0) == 0.2
    assert window.add(0.0, now=1200.0) == 0.0


# -- offload ------------------------------------------------------------------------------------------


def offloaded(registry, tool):
    return registry.get_sample_value("loopwatch_tool_offloaded", {"gen_ai_tool_name": tool})


async def test_a_tool_moved_off_the_loop_shows_in_the_offloaded_gauge_until_restored(registry):
    server, handle = instrumented(registry, offload="auto")
    async with Client(server) as client:
        await client.call_tool("lookup", {"sku": "a1"})
        await handle.monitor.settle()
        await eventually(lambda: offloaded(registry, "lookup") == 1)
        await client.call_tool("lookup", {"sku": "a2"})  # now on the pool: no block
        assert registry.get_sample_value("loopwatch_offload_pool_size") == handle.options.offload_workers
        handle.set_tool_policy("lookup", "never")
        await eventually(lambda: offloaded(registry, "lookup") == 0)
    decisions = "loopwatch_tool_offload_decisions_total"
    assert registry.get_sample_value(decisions, {"gen_ai_tool_name": "lookup", "action": "offloaded"}) == 1
    assert registry.get_sample_value(decisions, {"gen_ai_tool_name": "lookup", "action": "restored"}) == 1
    assert blocks(registry, "lookup") == 1


async def test_offload_decisions_taken_before_the_metrics_existed_are_replayed(registry):
    _, handle = instrumented(registry, offload="auto", tool_policies={"checksum": "always"})
    assert offloaded(registry, "checksum") == 1


async def test_offload_events_of_unknown_tools_count_as_other(registry):
    _, handle = instrumented(registry)
    handle.monitor.post(OffloadEvent(time.time(), "no_such_tool", "offloaded", "saved state", 2))
    assert offloaded(registry, "_OTHER") == 1


# -- exposition ---------------------------------------------------------------------------------------


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), response.read().decode()


async def test_the_standalone_endpoint_serves_the_metrics_until_uninstrumented(registry):
    server, handle = instrumented(registry, metrics_port=0)
    port = exporter_of(handle).port
    assert port
    async with Client(server) as client:
        await client.call_tool("ping", {})
    status, content_type, body = await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert 'gen_ai_tool_name="ping"' in body and "loopwatch_event_loop_lag_seconds_bucket" in body
    handle.uninstrument()
    with pytest.raises(urllib.error.URLError):
        await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/metrics")


async def test_a_scrape_right_after_a_call_counts_it_without_waiting_for_the_watchdog(registry):
    """Calls are recorded at the watchdog's looks (once a second with a stall timer): a scrape records the
    queued ones first, so it never shows a finished call missing."""
    server, handle = instrumented(registry, metrics_port=0)
    url = f"http://127.0.0.1:{exporter_of(handle).port}/metrics"
    pattern = re.compile(r'mcp_server_operation_duration_seconds_count\{[^}]*gen_ai_tool_name="ping"[^}]*\} (\S+)')
    async with Client(server) as client:
        for n in range(1, 4):
            await client.call_tool("ping", {"n": n})
            _, _, body = await anyio.to_thread.run_sync(fetch, url)
            assert sum(float(v) for v in pattern.findall(body)) == n
    handle.uninstrument()


async def test_a_taken_port_logs_a_clear_error_and_the_server_keeps_serving(registry, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="loopwatch"):
            server, handle = instrumented(registry, metrics_port=port)
        async with Client(server) as client:
            result = await client.call_tool("ping", {"n": 7})
    assert not result.is_error
    assert exporter_of(handle).port is None
    (record,) = [r for r in caplog.records if r.name == "loopwatch" and r.levelno == logging.ERROR]
    assert f"127.0.0.1:{port}" in record.getMessage() and "keeps running" in record.getMessage()
    assert calls(registry, "ping") == 1


async def test_metrics_path_adds_a_route_to_the_servers_own_http_app(registry):
    server, handle = instrumented(registry, metrics_path="/metrics")
    async with Client(server) as client:
        await client.call_tool("ping", {})
    app = server.streamable_http_app()
    app.router.routes.extend(handle.routes)  # what `loopwatch run` does
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        response = await http.get("/metrics")
        openmetrics = await http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert 'mcp_server_operation_duration_seconds_count{error_type="",gen_ai_tool_name="ping"' in response.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


async def test_two_servers_can_share_one_registry(registry):
    first, _ = instrumented(registry)
    second, _ = instrumented(registry, "low_server", "server")
    async with Client(first) as a, Client(second) as b:
        await a.call_tool("ping", {})
        await b.list_tools()
        await b.call_tool("ping", {})
    assert calls(registry, "ping") == 2


async def test_uninstrument_stops_the_updates(registry):
    server, handle = instrumented(registry)
    handle.uninstrument()
    handle.uninstrument()
    async with Client(server) as client:
        await client.call_tool("ping", {})
    assert calls(registry, "ping") == 0


def test_the_cli_passes_the_metrics_options_to_instrument():
    args = build_parser().parse_args(
        ["run", "server.py", "--metrics-port", "9464", "--metrics-host", "::1", "--metrics-path", "/metrics"]
    )
    options = run_options(args)
    assert (options["metrics_port"], options["metrics_host"], options["metrics_path"]) == (
        9464,
        "::1",
        "/metrics",
    )
    defaults = run_options(build_parser().parse_args(["run", "server.py"]))
    assert (defaults["metrics_port"], defaults["metrics_host"], defaults["metrics_path"]) == (
        None,
        "127.0.0.1",
        None,
    )


# -- multiprocess mode --------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {fixtures!r}]
    import anyio
    from mcp import Client
    from helpers import fresh
    import loopwatch

    server = fresh("inventory_server", "mcp")
    loopwatch.instrument(server, metrics=True, log_blocks=False)

    async def main():
        async with Client(server) as client:
            for n in range(int(sys.argv[1])):
                await client.call_tool("ping", {{"n": n}})

    anyio.run(main)
    """
)


def run_worker(tmp_path, multiproc_dir, count):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), fixtures=str(FIXTURES)))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    return subprocess.Popen(
        [sys.executable, str(script), str(count)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_multiprocess_mode_sums_the_calls_of_every_process(tmp_path, monkeypatch):
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    workers = [run_worker(tmp_path, multiproc, count) for count in (3, 4)]
    for worker in workers:
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err.decode()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))
    combined = lw_prometheus.exposition_registry(CollectorRegistry())
    assert combined.get_sample_value(f"{DURATION}_count", _labels("ping")) == 7
    assert combined.get_sample_value("loopwatch_event_loop_lag_seconds_count") > 0
    # Both processes exited: their live gauges (in-flight calls) are dropped, their counts stay.
    assert combined.get_sample_value("loopwatch_tool_calls_in_flight", {"gen_ai_tool_name": "ping"}) is None


def test_the_aggregator_serves_every_process_and_forgets_the_dead_ones(tmp_path):
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    worker = run_worker(tmp_path, multiproc, 2)
    worker.communicate(timeout=60)
    # It exited without prometheus_client's mark_process_dead, as a killed stdio server would.
    live = multiproc / f"gauge_livesum_{worker.pid}.db"
    assert live.exists()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "loopwatch.prometheus", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line_with(aggregator.stderr, "/metrics", timeout=30)
        url = re.search(r"http://\S+/metrics", line).group(0)
        status, _, body = fetch(url)
    finally:
        aggregator.terminate()
        aggregator.wait(timeout=10)
    assert status == 200
    assert re.search(r'mcp_server_operation_duration_seconds_count\{[^}]*gen_ai_tool_name="ping"[^}]*\} 2\.0', body)
    assert not live.exists()


def _read_line_with(stream, text, timeout):
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stream], [], [], left)
        line = stream.readline() if ready else ""
        if text in line:
            return line
        if ready and not line:
            break  # the aggregator exited
    raise AssertionError(f"no line with {text!r} on the aggregator's stderr within {timeout} s")


# -- dashboards and rules name only metrics that exist ------------------------------------------------


def exported_names():
    registry = CollectorRegistry()
    metrics = lw_prometheus.Metrics(registry)
    metrics.operation_duration.labels("tools/call", "t", "", "pipe").observe(0.1)
    for metric in (metrics.blocks, metrics.blocked_seconds):
        metric.labels("t", "cpu").inc()
    metrics.in_flight.labels("t").set(0)
    metrics.offloaded.labels("t").set(0)
    metrics.offload_decisions.labels("t", "offloaded").inc()
    metrics.lag.observe(0.001)
    return {s.name for m in registry.collect() for s in m.samples}


def referenced_names(text):
    return set(re.findall(r"\b(?:mcp_server_\w+|loopwatch_\w+)", text))


def test_the_dashboard_is_importable_and_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "gen_ai_tool_name" in variables["tool"]["definition"]
    assert dashboard["uid"] and dashboard["id"] is None and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in panels)
    names = referenced_names(" ".join(exprs) + json.dumps(variables))
    assert names and names <= exported_names()
    titles = " ".join(p["title"] for p in panels)
    for wanted in ("lag p50 / p99 / max", "Blocked seconds", "Blocks by tool and kind", "latency p50 / p99",
                   "Error rate", "In-flight", "Offloaded tools"):  # fmt: skip
        assert wanted in titles


def test_the_alert_rules_query_only_exported_metrics():
    names = referenced_names(RULES.read_text())
    assert names and names <= exported_names()
