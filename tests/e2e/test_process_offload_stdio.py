"""`loopwatch run` with tools in worker processes, over stdio (and streamable HTTP): answers as the bare server's,
progress delivered, and no worker left running once the server ends, however it ends (SIGTERM, SIGKILL, stdin
closed)."""

import json
import os
import signal
import subprocess
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SERVER = FIXTURES / "cpu_server.py"
POLICY = "crunch=process,words=process,refuse=process,crash=process,progress=process,where=process,stuck_in_c=process"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def params(*args):
    return StdioServerParameters(command=sys.executable, args=list(args), env={**os.environ}, cwd=str(FIXTURES))


def wrapped(events):
    return params("-m", "loopwatch", "run", str(SERVER), "--offload-policy", POLICY, "--offload-processes", "1",
                  "--events", str(events))


CALLS = [("crunch", {"rounds": 20000}), ("words", {"text": "x y"}), ("refuse", {"why": "closed"}),
         ("crash", {"secret": "s3"}), ("crunch", {"rounds": -1.5}), ("progress", {"steps": 3})]


async def answers(parameters, mode):
    out, progress = [], []

    async def on_progress(value, total, message):
        progress.append(message)

    async with Client(parameters, mode=mode) as client:
        for name, args in CALLS:
            result = await client.call_tool(name, args, progress_callback=on_progress)
            out.append(result.model_dump(exclude={"meta"}))
    return out, progress


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_answers_errors_and_progress_are_the_bare_servers_when_tools_run_in_processes(tmp_path, mode):
    bare = await answers(params("-c", "import cpu_server; cpu_server.mcp.run()"), mode)
    events = tmp_path / "events.jsonl"
    moved = await answers(wrapped(events), mode)
    assert moved == bare
    assert bare[1] == ["step 1", "step 2", "step 3"]
    decisions = [e for e in read_events(events) if e["event"] == "offloaded"]
    assert {e["tool"] for e in decisions if e["executes"] == "process"} == set(POLICY.replace("=process", "").split(","))
    assert not [e for e in read_events(events) if e["event"] == "pinned"]


async def test_over_streamable_http_the_tool_runs_in_a_process_with_its_progress(tmp_path):
    from helpers import free_port

    port, events = free_port(), tmp_path / "events.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(SERVER), "--transport", "streamable-http", "--port", str(port),
         "--offload-policy", POLICY, "--offload-processes", "1", "--events", str(events)],
        cwd=str(FIXTURES), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    progress = []

    async def on_progress(value, total, message):
        progress.append(message)

    try:
        with anyio.fail_after(90):
            while True:
                try:
                    async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                        result = await client.call_tool("progress", {"steps": 2}, progress_callback=on_progress)
                        worker = (await client.call_tool("where", {})).structured_content["result"]
                    break
                except Exception:  # not listening yet
                    assert server.poll() is None, "the server exited"
                    await anyio.sleep(0.2)
    finally:
        server.terminate()
        server.wait(30)
    assert result.is_error is False and progress == ["step 1", "step 2"]
    assert worker != server.pid
    with anyio.move_on_after(10):
        while alive(worker):
            await anyio.sleep(0.05)
    assert not alive(worker), "the worker ended with the server"


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def call(request_id, name, args):
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name, "arguments": args}}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def read_response(process, request_id):
    while True:
        line = await anyio.to_thread.run_sync(process.stdout.readline)
        assert line, "the server closed stdout"
        message = json.loads(line)
        if message.get("id") == request_id:
            return message


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "stdin closed"])
async def test_no_worker_process_outlives_the_server_even_one_stuck_in_c(tmp_path, how):
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(SERVER), "--offload-policy", POLICY,
         "--offload-processes", "1"], cwd=str(FIXTURES),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        with anyio.fail_after(60):
            messages = [INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"}, call(2, "where", {})]
            process.stdin.write("".join(json.dumps(m) + "\n" for m in messages).encode())
            process.stdin.flush()
            await read_response(process, 1)
            worker = (await read_response(process, 2))["result"]["structuredContent"]["result"]
            assert worker != process.pid and alive(worker)
            process.stdin.write((json.dumps(call(3, "stuck_in_c", {})) + "\n").encode())
            process.stdin.flush()
            await anyio.sleep(0.5)  # the worker is in the C call now
            if how == "stdin closed":
                process.stdin.close()
            else:
                process.send_signal(getattr(signal, how))
            await anyio.to_thread.run_sync(process.wait, 30)
            while alive(worker):
                await anyio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert not alive(worker)


async def test_notifications_cancelled_kills_a_worker_stuck_in_c_and_a_new_one_answers(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(SERVER), "--offload-policy", POLICY,
         "--offload-processes", "1"], cwd=str(FIXTURES),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )

    def send(*messages):
        process.stdin.write("".join(json.dumps(m) + "\n" for m in messages).encode())
        process.stdin.flush()

    try:
        with anyio.fail_after(90):
            send(INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"}, call(2, "where", {}))
            await read_response(process, 1)
            stuck = (await read_response(process, 2))["result"]["structuredContent"]["result"]
            send(call(3, "stuck_in_c", {}))
            await anyio.sleep(0.5)
            send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}})
            while alive(stuck):  # killed after the grace period (2 s): the C call never checks for signals
                await anyio.sleep(0.05)
            send(call(4, "where", {}))
            fresh = (await read_response(process, 4))["result"]["structuredContent"]["result"]
    finally:
        process.kill()
        process.wait(10)
    assert fresh != stuck and fresh != process.pid


async def test_a_launched_command_runs_its_tool_in_a_process_and_the_worker_is_not_watched(tmp_path):
    events = tmp_path / "events.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", "--offload-policy", "where=process", "--events", str(events),
         "--", sys.executable, "-c", "import cpu_server; cpu_server.mcp.run()"], cwd=str(FIXTURES),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp_path / "stderr.log").open("w"),
    )
    try:
        with anyio.fail_after(90):
            messages = [INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"}, call(2, "where", {})]
            process.stdin.write("".join(json.dumps(m) + "\n" for m in messages).encode())
            process.stdin.flush()
            await read_response(process, 1)
            worker = (await read_response(process, 2))["result"]["structuredContent"]["result"]
    finally:
        process.kill()
        process.wait(10)
    assert worker != process.pid  # the launched command is exec'd: its pid is the server's
    assert {e.get("pid") for e in read_events(events)} == {process.pid}
    watched = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if "watches server" in line]
    assert len(watched) == 1 and f"pid {process.pid}" in watched[0], "a worker process is never watched itself"
