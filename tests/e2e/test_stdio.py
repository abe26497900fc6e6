"""`loopwatch run` over stdio with a real MCP client and a server subprocess."""

import json
import os
import subprocess
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def line_of(path, text):
    for number, line in enumerate(open(path).read().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def stdio_params(*args, events=None):
    extra = ["--events", str(events)] if events else []
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "loopwatch", "run", str(FIXTURES / "inventory_server.py"), *extra, *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def beside(client, blocker, args, honest=8):
    async with anyio.create_task_group() as tg:
        for i in range(honest):
            tg.start_soon(client.call_tool, "ping", {"n": i})
        await anyio.sleep(0.01)
        tg.start_soon(client.call_tool, blocker, args)


def read_events(path, timeout=15.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        events = [e for e in map(json.loads, lines) if e["event"] == "loop_blocked"]
        if {e.get("tool") for e in events} >= {"lookup", "checksum"} or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def long_crunch(events):
    return any(e.get("tool") == "checksum" and e["duration_s"] >= 0.25 for e in events)


async def test_two_blockers_beside_honest_calls_are_blamed_on_the_right_tool_kind_and_line(tmp_path):
    events_path = tmp_path / "events.jsonl"
    # Offload off: the crunch must stay on the loop for the rounds that make it longer (a moved tool blocks no more).
    async with Client(stdio_params("--threshold", "0.1", "--offload", "off", events=events_path)) as client:
        await client.call_tool("ping", {})
        await beside(client, "lookup", {"sku": "A-7"})
        rounds = 60000
        await beside(client, "checksum", {"rounds": rounds})
        await anyio.sleep(0.3)  # let the server's watchdog see the loop recover (it reports after the block)
        # A fast machine needs more work to block well past the threshold. A block just over it leaves the watchdog
        # a look or two, too few to tell a crunch from a native call holding the GIL (CI saw one of 198 ms
        # read as `gil`): this test asks about a crunch it can see.
        while not long_crunch(read_events(events_path, timeout=1)) and rounds < 4_000_000:
            rounds *= 4
            await beside(client, "checksum", {"rounds": rounds})
            await anyio.sleep(0.3)
    events = read_events(events_path)
    by_tool = {}
    for event in events:
        if event["kind"] != "gc":  # a collection during a call is the heap's doing, not the call's
            by_tool.setdefault(event["tool"], []).append(event)
    assert "ping" not in by_tool, by_tool.get("ping")

    [lookup] = by_tool["lookup"]
    assert lookup["kind"] == "wait" and lookup["method"] == "tools/call" and lookup["request_id"]
    leaf = lookup["frames"][-1]
    assert leaf["file"].endswith("legacy.py")
    assert leaf["line"] == line_of(FIXTURES / "legacy.py", "time.sleep(delay)")
    assert lookup["culprit"] == leaf  # the line to fix: the sleep in the server's own helper module

    crunches = [e for e in by_tool["checksum"] if e["kind"] == "cpu" and e["duration_s"] >= 0.25]
    assert crunches, by_tool["checksum"]
    loop_line = line_of(FIXTURES / "inventory_server.py", "hashlib.sha256(digest")
    assert any(e["frames"][-1]["line"] in (loop_line, loop_line - 1) for e in crunches)
    assert all(e["culprit"]["function"] == "checksum" for e in crunches)


def test_nothing_but_protocol_bytes_reach_stdout(tmp_path):
    noisy = tmp_path / "noisy.py"
    noisy.write_text(
        "import sys\n"
        "print('hello from import time')\n"
        "from mcp.server.mcpserver import MCPServer\n"
        "mcp = MCPServer('noisy')\n"
        "@mcp.tool()\n"
        "async def chatty() -> str:\n"
        "    print('hello from a tool')\n"
        "    import time; time.sleep(0.2)\n"
        "    return 'ok'\n"
    )
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "chatty", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 4, "method": "no/such/method"},
    ]
    payload = "".join(json.dumps(m) + "\n" for m in messages[:2])
    payload += "this is not json\n" + "\xff\xfe garbage\n"
    payload += "".join(json.dumps(m) + "\n" for m in messages[2:])
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(noisy), "--threshold", "0.05"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        proc.stdin.write(payload.encode("utf-8", "surrogateescape"))
        proc.stdin.flush()
        responses = {}
        lines = []
        while len(responses) < 4:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            message = json.loads(line)  # every stdout line is JSON-RPC, or this raises
            assert message["jsonrpc"] == "2.0"
            if "id" in message:
                responses[message["id"]] = message
    finally:
        try:
            rest, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, err = proc.communicate()
    for line in rest.splitlines():
        assert json.loads(line)["jsonrpc"] == "2.0"
    assert set(responses) >= {1, 2, 3, 4}
    assert responses[2]["result"]["content"][0]["text"] == "ok"
    assert b"hello from import time" in err and b"hello from a tool" in err
    assert b"loop blocked" in err and b"chatty" in err
