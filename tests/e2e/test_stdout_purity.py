"""Under stdio, nothing but protocol bytes on stdout: on every path, errors and warnings included.

(Prints at import and in a tool, invalid JSON and bytes: tests/e2e/test_stdio.py. The OTel console
exporter: tests/e2e/test_otlp.py.)
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import free_port

pytestmark = pytest.mark.e2e
WAIT = 60

NOISY = textwrap.dedent("""
    import logging, os, sys, time, warnings

    warnings.warn("a warning at import", UserWarning)
    logging.basicConfig(level=logging.DEBUG)  # the root logger, at import: stderr
    logging.getLogger("noisy").info("logging configured at import")

    from mcp.server.mcpserver import MCPServer

    mcp = MCPServer("noisy")

    @mcp.tool()
    async def chatty() -> str:
        warnings.warn("a warning from a tool", RuntimeWarning)
        logging.getLogger("noisy").warning("a log line from a tool")
        print("print() from a tool")
        sys.stdout.write("sys.stdout.write from a tool\\n")
        sys.stdout.flush()
        os.write(1, b"os.write(1) from a tool\\n")
        time.sleep(0.2)  # a block: loopwatch's report, then its offload decision
        return "ok"

    @mcp.tool()
    async def crash() -> str:
        raise SystemExit(3)  # the server dies in the middle of the session
""")

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}




def run_loopwatch(args, stdin=b"", env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", *args], env={**full_env, **(env or {})},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(stdin, timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err.decode(errors="replace")


def protocol_only(out: bytes) -> list[dict]:
    messages = [json.loads(line) for line in out.splitlines()]  # a line that is not JSON raises here
    assert all(m.get("jsonrpc") == "2.0" for m in messages)
    return messages


def test_warnings_logs_prints_reports_the_console_the_metrics_and_a_crash_all_stay_off_stdout(tmp_path):
    server = tmp_path / "noisy.py"
    server.write_text(NOISY)
    calls = [
        INITIALIZE,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "chatty", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "chatty", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "crash", "arguments": {}}},
    ]
    # one at a time would need a reader; the server handles them in order of arrival, the crash comes last
    payload = "".join(json.dumps(m) + "\n" for m in calls[:4]).encode()
    code, out, err = run_loopwatch(
        ["--debug", "run", str(server), "--threshold", "0.05", "--monitor", "--monitor-port", str(free_port(3)),
         "--metrics-port", "0", "--events", str(tmp_path / "events.jsonl")],
        stdin=payload + (json.dumps(calls[4]) + "\n").encode(),
    )
    answers = {m["id"]: m for m in protocol_only(out) if "id" in m}
    assert answers[1]["result"]["serverInfo"]["name"] == "noisy"
    for line in ("a warning at import", "logging configured at import", "a warning from a tool",
                 "a log line from a tool", "print() from a tool", "sys.stdout.write from a tool",
                 "os.write(1) from a tool", "loop blocked", "serves Prometheus metrics"):
        assert line in err, line
    assert code != 0  # the crash ended the session: a failing exit, and still nothing but protocol on stdout


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["run", "{server}", "--threshold", "-1"], {}),
        (["run", "{server}", "--transport", "pigeon"], {}),
        (["run", "{server}"], {"LOOPWATCH_OFFLOAD": "sometimes"}),
        (["run", "{server}", "--monitor", "--monitor-host", "0.0.0.0"], {}),
        (["run", "{server}"], {"OTEL_TRACES_EXPORTER": "carrier-pigeon"}),
        (["--debug", "run", "{missing}"], {}),
        (["run", "{server}", "--events", "{missing}/events.jsonl"], {}),
    ],
    ids=["bad threshold", "bad transport", "bad env", "remote console", "bad exporter", "debug traceback", "bad events"],
)
def test_a_refused_start_writes_its_error_to_stderr_and_nothing_to_stdout(args, env, tmp_path):
    server = tmp_path / "noisy.py"
    server.write_text(NOISY)
    args = [a.format(server=server, missing=tmp_path / "missing" / "x.py") for a in args]
    code, out, err = run_loopwatch(args, env=env)
    assert code == 2
    assert out == b""
    assert "loopwatch" in err


def test_a_server_that_fails_at_start_under_stdio_writes_nothing_to_stdout(tmp_path):
    server = tmp_path / "failing.py"
    server.write_text(textwrap.dedent("""
        from contextlib import asynccontextmanager
        from mcp.server.mcpserver import MCPServer

        @asynccontextmanager
        async def lifespan(server):
            print("connecting to the database")
            raise RuntimeError("database unreachable")
            yield

        mcp = MCPServer("failing", lifespan=lifespan)
    """))
    payload = (json.dumps(INITIALIZE) + "\n").encode()
    code, out, err = run_loopwatch(["--debug", "run", str(server)], stdin=payload)
    assert code != 0
    protocol_only(out)
    assert "database unreachable" in err and "connecting to the database" in err
