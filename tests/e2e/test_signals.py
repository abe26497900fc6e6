"""SIGTERM in the middle of a call to `loopwatch run`, over stdio and over streamable HTTP.

The wrapped server ends exactly as the bare one does (same exit status, bounded time), whether the call
in flight awaits or holds the loop: nothing hangs, stdout holds only whole protocol lines, and the events
file only whole JSON lines. Bare and wrapped run side by side.
"""

import json
import signal
import subprocess
import sys

import anyio
import pytest
from mcp import Client

from helpers import FIXTURES, free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
WAIT = 60

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
CALLS = {  # a call that awaits, and one that holds the loop (it would move off the loop only after this block)
    "awaiting": ("slow_async", {"seconds": 60}),
    "blocking": ("stuck", {"seconds": 2.0}),
}


@pytest.fixture
def anyio_backend():
    return "asyncio"




def command(wrapped, transport, port, events):
    if wrapped:
        http = ["--transport", "streamable-http", "--port", str(port)] if transport == "http" else []
        return [sys.executable, "-m", "loopwatch", "run", str(FIXTURES / "offload_server.py"), "--events", str(events),
                "--threshold", "0.1", *http]
    run = f"transport='streamable-http', port={port}" if transport == "http" else ""
    return [sys.executable, "-c", f"import offload_server; offload_server.mcp.run({run})"]


async def stdio_case(wrapped, call, tmp_path):
    events = tmp_path / f"events-{wrapped}.jsonl"
    process = subprocess.Popen(
        command(wrapped, "stdio", 0, events), cwd=str(FIXTURES),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        name, args = CALLS[call]
        messages = [INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name, "arguments": args}}]
        process.stdin.write("".join(json.dumps(m) + "\n" for m in messages).encode())
        process.stdin.flush()
        first = await anyio.to_thread.run_sync(process.stdout.readline)
        assert json.loads(first)["id"] == 1
        await anyio.sleep(0.3)  # the call is in flight (and the loop held, for the blocking one)
        process.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(process.wait, WAIT)
        rest = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return code, rest, events


async def http_case(wrapped, call, tmp_path):
    port, events = free_port(), tmp_path / f"events-{wrapped}.jsonl"
    process = subprocess.Popen(
        command(wrapped, "http", port, events), cwd=str(FIXTURES),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    outcome = []
    try:
        while True:
            assert process.poll() is None, "the server did not start"
            try:
                await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                break
            except OSError:
                await anyio.sleep(0.05)
        async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
            assert (await client.call_tool("ping", {"n": 1})).structured_content == {"result": 1}

            async def in_flight():
                try:
                    await client.call_tool(*CALLS[call])
                    outcome.append("answered")
                except Exception as exc:
                    outcome.append(type(exc).__name__)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await anyio.sleep(0.3)
                if wrapped and call == "blocking":  # loopwatch says the call holds the loop: it is in flight
                    with anyio.fail_after(WAIT):
                        while '"offloaded"' not in (events.read_text() if events.exists() else ""):
                            await anyio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                code = await anyio.to_thread.run_sync(process.wait, WAIT)
                with anyio.fail_after(WAIT):  # the client's call ends too: it is not left hanging
                    while not outcome:
                        await anyio.sleep(0.02)
        rest = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return code, rest, events, outcome


def whole_lines(data: bytes, key: str):
    for line in data.splitlines():
        assert key in json.loads(line)


@pytest.mark.parametrize("call", CALLS)
async def test_sigterm_during_a_call_over_stdio_ends_the_server_as_it_ends_the_bare_one(call, tmp_path, anyio_backend):
    found = {}
    with anyio.fail_after(2 * WAIT):
        async with anyio.create_task_group() as tg:
            for wrapped in (False, True):
                async def case(wrapped=wrapped):
                    found[wrapped] = await stdio_case(wrapped, call, tmp_path)
                tg.start_soon(case)
    (bare_code, _, _), (code, rest, events) = found[False], found[True]
    assert code == bare_code == -signal.SIGTERM
    whole_lines(rest, "jsonrpc")
    whole_lines(events.read_bytes() if events.exists() else b"", "event")


@pytest.mark.parametrize("call", CALLS)
async def test_sigterm_during_a_call_over_http_ends_the_server_as_it_ends_the_bare_one(call, tmp_path, anyio_backend):
    found = {}
    with anyio.fail_after(2 * WAIT):
        async with anyio.create_task_group() as tg:
            for wrapped in (False, True):
                async def case(wrapped=wrapped):
                    found[wrapped] = await http_case(wrapped, call, tmp_path)
                tg.start_soon(case)
    (bare_code, _, _, bare_outcome), (code, rest, events, outcome) = found[False], found[True]
    assert code == bare_code
    assert outcome == bare_outcome
    assert rest == b""
    whole_lines(events.read_bytes() if events.exists() else b"", "event")
    if call == "blocking":  # the block that was going on when the signal came is in the file
        blocks = read_events(events)
        assert [b["tool"] for b in blocks if b["event"] == "loop_blocked" and b["tool"]] == ["stuck"]
