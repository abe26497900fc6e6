"""A real Prometheus scrapes wrapped servers (streamable HTTP with --metrics-path, stdio with --metrics-port)
and evaluates every query of the Grafana dashboard and every alert rule."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters

from helpers import FIXTURES, free_port

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if PROMETHEUS is None:
    pytest.skip("the prometheus binary is not installed (.ci/prometheus.sh installs it)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "loopwatch.json"
RULES = ROOT / "dashboards" / "prometheus" / "loopwatch.rules.yml"
RULES_TEST = ROOT / "dashboards" / "prometheus" / "loopwatch.rules.test.yml"
SERVER = FIXTURES / "inventory_server.py"
GRAFANA_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "job": ".*",
    "instance": ".*",
    "tool": ".*",
}
STDIO_PINGS = (
    'mcp_server_operation_duration_seconds_count{job="mcp-stdio", network_transport="pipe", gen_ai_tool_name="ping"}'
)
BLOCKING_CALLS = 5
"""lookup blocks the loop about 0.3 s each time; after this many blocks loopwatch moves it off the loop."""




def get(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class Stack:
    """A wrapped HTTP server, a port for a wrapped stdio server, and a Prometheus scraping both."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.http_port, self.stdio_metrics_port, self.prom_port = free_port(), free_port(), free_port()
        self.prom = f"http://127.0.0.1:{self.prom_port}"
        self.mcp_url = f"http://127.0.0.1:{self.http_port}/mcp"
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self) -> None:
        self._spawn(
            "server",
            [sys.executable, "-m", "loopwatch", "run", str(SERVER), "--transport", "streamable-http",
             "--port", str(self.http_port), "--metrics-path", "/metrics", "--offload", "auto",
             "--offload-strikes", str(BLOCKING_CALLS)],
        )  # fmt: skip
        metrics = f"http://127.0.0.1:{self.http_port}/metrics"
        wait_until(lambda: get(metrics)[0] == 200, 60, f"the wrapped server at {metrics}")
        config = self.tmp / "prometheus.yml"
        config.write_text(self._config())
        self._spawn(
            "prometheus",
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}", "--storage.tsdb.retention.time=1h"],
        )  # fmt: skip
        wait_until(lambda: get(f"{self.prom}/-/ready")[0] == 200, 60, "Prometheus to be ready")
        self.wait_present('up{job="mcp-http"} == 1')  # the first scrape comes a few seconds after ready

    def _config(self) -> str:
        return json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "mcp-http",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [f"127.0.0.1:{self.http_port}"]}],
                    },
                    {
                        "job_name": "mcp-stdio",
                        "static_configs": [{"targets": [f"127.0.0.1:{self.stdio_metrics_port}"]}],
                    },
                ],
            }  # fmt: skip
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        self.processes.append((process, log))

    def stop(self) -> None:
        for process, _ in reversed(self.processes):
            process.terminate()
        for process, _ in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.processes)

    # -- Prometheus's HTTP API --------------------------------------------------------------------
    def api(self, path: str, **params: str) -> dict:
        status, body = get(f"{self.prom}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, expr: str, minimum: float, timeout: float = 60.0) -> None:
        wait_until(lambda: self.value(expr) >= minimum, timeout, f"{expr} >= {minimum} in Prometheus")

    def wait_present(self, expr: str, timeout: float = 60.0) -> None:
        wait_until(lambda: self.query(expr), timeout, f"{expr} in Prometheus")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("prometheus"))
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()


def stdio_server(metrics_port: int) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "loopwatch", "run", str(SERVER), "--metrics-port", str(metrics_port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def drive(stack: Stack) -> None:
    with anyio.fail_after(180):
        async with Client(stack.mcp_url) as client:
            await client.list_tools()
            await client.call_tool("ping", {"n": 0})  # after a listing: every tool's series exist at 0
            zeros = 'loopwatch_event_loop_blocked_seconds_total{job="mcp-http", gen_ai_tool_name="lookup"}'
            await anyio.to_thread.run_sync(stack.wait_present, zeros)
            await anyio.sleep(2.5)  # a few scrapes of those zeros, so rate() sees the first block
            await client.call_tool("fail", {"reason": "first"})
            # A series born with its first count hides that count from rate(); the alert sees the rest.
            failures = 'mcp_server_operation_duration_seconds_count{job="mcp-http", gen_ai_tool_name="fail"}'
            await anyio.to_thread.run_sync(stack.wait_present, failures)
            await anyio.sleep(1.5)
            for n in range(20):
                await client.call_tool("ping", {"n": n})
                await client.call_tool("fail", {"reason": f"out of stock {n}"})
            for n in range(BLOCKING_CALLS):  # one after the other: back-to-back blocks would merge into one
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.call_tool, "ping", {"n": n})
                    tg.start_soon(client.call_tool, "lookup", {"sku": f"sku-{n}"})
            await client.call_tool("checksum", {"rounds": 20000})
            offloaded = 'loopwatch_tool_offloaded{job="mcp-http", gen_ai_tool_name="lookup"}'
            await anyio.to_thread.run_sync(stack.wait_for, offloaded, 1)
            await client.call_tool("lookup", {"sku": "on-the-pool"})
        async with Client(stdio_server(stack.stdio_metrics_port)) as stdio:
            for n in range(3):
                await stdio.call_tool("ping", {"n": n})
            await anyio.to_thread.run_sync(stack.wait_for, f"sum({STDIO_PINGS})", 3)
    blocks = 'sum(loopwatch_event_loop_blocks_total{job="mcp-http", gen_ai_tool_name="lookup"})'
    await anyio.to_thread.run_sync(stack.wait_for, blocks, BLOCKING_CALLS)
    await anyio.to_thread.run_sync(stack.wait_for, f"sum({failures})", 21)
    await anyio.sleep(3)  # a few more scrapes: rates over the window after the last change


@pytest.fixture(scope="module")
def driven(stack):
    try:
        anyio.run(drive, stack)
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    return stack


def grafana_to_promql(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VALUES[m.group(1)], expr)


def dashboard_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["refId"], target["expr"]


def rule_exprs():
    text = RULES.read_text()
    return re.findall(r"- alert: (\w+)\n\s+expr: \|\n((?:\s{10}.*\n)+)", text)


# -- the tests ----------------------------------------------------------------------------------------


def test_every_dashboard_query_is_accepted_and_the_key_ones_return_data(driven):
    empty = []
    targets = list(dashboard_targets())
    assert len(targets) >= 15
    for title, ref, expr in targets:
        result = driven.query(grafana_to_promql(expr))  # raises unless Prometheus accepts it
        if not result:
            empty.append(f"{title} [{ref}]")
    assert not empty, f"no data for: {empty}"


def test_the_dashboard_shows_the_blocking_tool_and_the_failing_one(driven):
    by_tool = {
        r["metric"]["gen_ai_tool_name"]: float(r["value"][1])
        for title, _, expr in dashboard_targets()
        if title == "Blocked seconds per second by tool"
        for r in driven.query(grafana_to_promql(expr))
    }
    assert by_tool["lookup"] > 0 and by_tool["lookup"] == max(by_tool.values())
    (error_rate,) = [expr for title, _, expr in dashboard_targets() if title == "Error rate by tool"]
    rates = {r["metric"]["gen_ai_tool_name"]: float(r["value"][1]) for r in driven.query(grafana_to_promql(error_rate))}
    assert rates["fail"] == 1.0 and rates["ping"] == 0.0


def test_every_dashboard_variable_query_returns_values(driven):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in variables} >= {"job", "instance", "tool"}
    for variable in variables:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = grafana_to_promql(match.group(1)), match.group(2)
        values = driven.api(f"label/{label}/values", **{"match[]": selector})
        assert values, f"no values for ${variable['name']}"
    tools = driven.api("label/gen_ai_tool_name/values", **{"match[]": "mcp_server_operation_duration_seconds_count"})
    assert {"ping", "fail", "lookup"} <= set(tools)


def test_every_alert_rule_is_loaded_evaluated_and_its_expression_accepted(driven):
    exprs = dict(rule_exprs())
    assert set(exprs) == {
        "LoopwatchEventLoopLagHigh",
        "LoopwatchToolBlocksEventLoop",
        "LoopwatchEventLoopBlocked",
        "LoopwatchToolErrorRateHigh",
        "LoopwatchToolOffloaded",
    }
    results = {name: driven.query(expr) for name, expr in exprs.items()}
    assert {r["metric"]["gen_ai_tool_name"] for r in results["LoopwatchToolBlocksEventLoop"]} == {"lookup"}
    assert {r["metric"]["gen_ai_tool_name"] for r in results["LoopwatchToolErrorRateHigh"]} == {"fail"}
    assert {r["metric"]["gen_ai_tool_name"] for r in results["LoopwatchToolOffloaded"]} == {"lookup"}
    rules = [rule for group in driven.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(exprs)
    wait_until(
        lambda: all(r["health"] == "ok" for g in driven.api("rules")["groups"] for r in g["rules"]),
        30,
        "every rule evaluated without error",
    )
    states = {a["labels"]["alertname"] for a in driven.api("alerts")["alerts"]}
    assert {"LoopwatchToolBlocksEventLoop", "LoopwatchToolErrorRateHigh", "LoopwatchToolOffloaded"} <= states


def test_the_stdio_server_was_scraped_on_its_own_metrics_port(driven):
    calls = driven.query(f"max_over_time({STDIO_PINGS}[5m])")  # the server exited since: its series are stale
    assert calls and float(calls[0]["value"][1]) == 3


async def call_unknown(url: str, tools: list[str], methods: list[str]) -> None:
    with anyio.fail_after(180):
        async with Client(url) as client:
            for name in tools:
                await client.call_tool(name, {})
            # The SDK has no public way to send any method: its dispatcher, with what HTTP requires.
            meta = {
                "io.modelcontextprotocol/protocolVersion": client.protocol_version,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            for method in methods:
                with pytest.raises(MCPError, match="Method not found"):
                    await client.session._dispatcher.send_raw_request(
                        method, {"_meta": meta}, {"headers": {"Mcp-Method": method}}
                    )


def random_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{uuid.uuid4().hex}" for _ in range(count)]


def test_300_calls_to_random_unknown_tool_names_add_no_series(driven):
    count = 'count({job="mcp-http", __name__=~"mcp_server_.+|loopwatch_.+"})'
    other = 'sum(mcp_server_operation_duration_seconds_count{job="mcp-http", gen_ai_tool_name="_OTHER"})'
    other_methods = 'sum(mcp_server_operation_duration_seconds_count{job="mcp-http", mcp_method_name="_OTHER"})'
    anyio.run(call_unknown, driven.mcp_url, random_names("tool_", 1), random_names("x/", 1))
    driven.wait_for(other, 1)
    driven.wait_for(other_methods, 1)
    time.sleep(2)  # scrapes after the _OTHER series appeared
    before, calls_before = driven.value(count), driven.value(other)
    tools, methods = random_names("tool_", 300), random_names("x/", 30)
    anyio.run(call_unknown, driven.mcp_url, tools, methods)
    driven.wait_for(other, calls_before + 300)
    driven.wait_for(other_methods, 1 + 30)
    assert driven.value(count) == before
    _, body = get(f"http://127.0.0.1:{driven.http_port}/metrics")
    assert not [name for name in tools + methods if name in body]


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    assert PROMTOOL, "promtool is missing though prometheus is installed: run .ci/prometheus.sh"
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout
