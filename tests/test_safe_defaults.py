"""Safe defaults: loopback-only endpoints, no REPL, and no tool argument value in any report unless asked for."""

import json
import logging
import os
import time

import anyio
import pytest
from mcp.server.mcpserver import MCPServer
from prometheus_client import CollectorRegistry, generate_latest

import loopwatch
from loopwatch.cli import build_parser, run_options

from helpers import client_for
from helpers import free_port as free_ports

pytestmark = pytest.mark.anyio

SECRET = "hunter2-s3cr3t-token"


@pytest.fixture
def anyio_backend():
    return "asyncio"


# -- where things listen ------------------------------------------------------------------------------


def test_every_listening_option_defaults_to_loopback_and_the_repl_to_off(monkeypatch):
    for name in ("HOST", "METRICS_HOST", "MONITOR_HOST", "MONITOR_CONSOLE", "INCLUDE_ARGUMENTS"):
        monkeypatch.delenv(f"LOOPWATCH_{name}", raising=False)
    defaults = loopwatch.Options()
    args = build_parser().parse_args(["run", "server.py"])
    options = run_options(args)
    assert args.host == defaults.metrics_host == defaults.monitor_host == "127.0.0.1"
    assert options["metrics_host"] == options["monitor_host"] == "127.0.0.1"
    assert defaults.monitor is defaults.monitor_console is options["monitor_console"] is False
    assert defaults.include_arguments is options["include_arguments"] is False


def listening(port):
    """Local addresses with a socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1




@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads listening sockets from /proc/net/tcp")
@pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")  # aiomonitor's own web UI
async def test_the_metrics_endpoint_and_the_console_listen_on_loopback_only_and_no_repl_listens(anyio_backend):
    server = MCPServer("defaults")

    @server.tool()
    async def ping() -> str:
        return "pong"

    console_port = free_ports()
    handle = loopwatch.instrument(
        server, metrics_port=0, metrics_registry=CollectorRegistry(), monitor=True, monitor_port=console_port,
        log_blocks=False,
    )
    metrics_port = next(e for e in handle.extensions if type(e).__name__ == "PrometheusExporter").port
    try:
        async with client_for(server) as client:
            console = next(e for e in handle.extensions if type(e).__name__ == "ConsoleIntegration").console
            assert await anyio.to_thread.run_sync(console.wait_started, 30)
            assert (await client.call_tool("ping", {})).content[0].text == "pong"
            assert listening(metrics_port) and listening(metrics_port) <= LOOPBACK
            assert listening(console_port) and listening(console_port) <= LOOPBACK
            assert listening(console_port + 1) <= LOOPBACK  # aiomonitor's web UI, if it serves one
            assert listening(console_port + 2) == set()  # the Python REPL: off unless asked for
    finally:
        handle.uninstrument()


# -- argument values ----------------------------------------------------------------------------------



def login_server():
    server = MCPServer("secrets")

    @server.tool()
    async def login(user: str, password: str) -> str:
        time.sleep(0.2)  # blocks: a report is written, and the tool moves off the loop
        return f"welcome {user}"

    return server


def span_text(spans):
    parts = []
    for span in spans:
        parts.append(json.dumps(dict(span.attributes or {}), default=str))
        parts += [json.dumps(dict(e.attributes or {}), default=str) for e in span.events]
        parts.append(span.name)
    return "\n".join(parts)


async def reports_of_a_blocking_call(tmp_path, exporter, caplog, **options):
    exporter.clear()
    events = tmp_path / "events.jsonl"
    registry = CollectorRegistry()
    server = login_server()
    handle = loopwatch.instrument(
        server, threshold=0.1, events=str(events), metrics_registry=registry, **options
    )
    with caplog.at_level(logging.INFO, logger="loopwatch"):
        async with client_for(server) as client:
            for _ in range(2):  # on the loop, then offloaded
                assert (await client.call_tool("login", {"user": "ann", "password": SECRET})).content
            await handle.monitor.settle()
    handle.uninstrument()
    assert "login" in [e.tool for e in handle.monitor.recent if isinstance(e, loopwatch.BlockEvent)]
    return {
        "events file": events.read_text(),
        "log": "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("loopwatch")),
        "snapshot": json.dumps(handle.snapshot()),
        "spans": span_text(exporter.get_finished_spans()),
        "metrics": generate_latest(registry).decode(),
    }


async def test_no_report_holds_a_tool_argument_value_by_default(anyio_backend, tmp_path, exporter, caplog):
    reports = await reports_of_a_blocking_call(tmp_path, exporter, caplog)
    assert "loop_blocked" in reports["events file"] and "loop blocked" in reports["log"]
    assert "loopwatch.loop_blocked" in reports["spans"]
    for where, text in reports.items():
        assert SECRET not in text, f"the argument value is in the {where}"


async def test_argument_values_reach_the_reports_only_when_the_user_opts_in(anyio_backend, tmp_path, exporter, caplog):
    reports = await reports_of_a_blocking_call(tmp_path, exporter, caplog, include_arguments=True)
    assert SECRET in reports["events file"] and SECRET in reports["snapshot"]
