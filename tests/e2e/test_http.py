"""`loopwatch run` over streamable HTTP and SSE, for all three kinds of server, with a real MCP client."""

import socket
import subprocess
import sys
import time

import anyio
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client

from helpers import FIXTURES, free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVERS = [("inventory_server.py", "lookup", {"sku": "H"}), ("fm_server.py", "lookup", {"sku": "H"}),
           ("low_server.py", "lookup", {})]


@pytest.fixture
def anyio_backend():
    return "asyncio"




def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not listen in time")


def blocks_of(path, tool, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = read_events(path)
        found = [e for e in lines if e["event"] == "loop_blocked" and e["tool"] == tool]
        if found:
            return found
        time.sleep(0.05)
    return []


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
@pytest.mark.parametrize(("server", "tool", "args"), SERVERS, ids=[s[0] for s in SERVERS])
async def test_blocks_are_blamed_over_http_transports(server, tool, args, transport, tmp_path):
    port, events = free_port(), tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(FIXTURES / server), "--transport", transport,
         "--port", str(port), "--events", str(events)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        with anyio.fail_after(60):
            if transport == "sse":
                async with sse_client(f"http://127.0.0.1:{port}/sse") as (read, write), ClientSession(read, write) as s:
                    await s.initialize()
                    await s.call_tool("ping", {})  # the server's first call warms its caches, off the record
                    await s.call_tool(tool, args)
            else:
                async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                    await client.call_tool("ping", {})
                    await client.call_tool(tool, args)
        [event] = blocks_of(events, tool)
        assert event["method"] == "tools/call" and event["kind"] == "wait"
        # the line to fix is in the server's own code (its helper module, for inventory_server), on its way
        assert event["culprit"]["file"].startswith(str(FIXTURES))
        assert any(f["file"].endswith(server) for f in event["frames"])
        if transport == "streamable-http":
            assert event["session_id"], "handshake-era streamable HTTP carries a session id"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.stdout.read() == b""  # nothing on stdout, even over HTTP
