"""`loopwatch run --offload auto` over stdio: the blocker moves, its context keeps working, answers don't change."""

import os
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SERVER = FIXTURES / "offload_server.py"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def params(*args):
    return StdioServerParameters(command=sys.executable, args=list(args), env={**os.environ}, cwd=str(FIXTURES))


async def beside(client, progress):
    async def on_progress(value, total, message):
        progress.append(message)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(client.call_tool, "ping", {"n": i})
        await anyio.sleep(0.005)
        tg.start_soon(lambda: client.call_tool("lookup", {"sku": "A"}, progress_callback=on_progress))


async def test_a_blocking_tool_moves_after_its_first_block_and_keeps_reporting_progress(tmp_path):
    events = tmp_path / "events.jsonl"
    progress: list[str] = []
    async with Client(params("-m", "loopwatch", "run", str(SERVER), "--offload", "auto", "--events", str(events))) as c:
        for _ in range(6):
            await beside(c, progress)
            await anyio.sleep(0.05)
    with anyio.fail_after(10):
        while not events.exists() or "offloaded" not in events.read_text():
            await anyio.sleep(0.05)
    lines = read_events(events)
    blocks = [e for e in lines if e["event"] == "loop_blocked" and e["tool"] == "lookup"]
    [moved] = [e for e in lines if e["event"] == "offloaded"]
    assert moved["tool"] == "lookup" and moved["blocks"] == 1
    assert len(blocks) == 1, "the tool blocked the loop again after it moved"
    assert not [e for e in lines if e["event"] == "loop_blocked" and e["tool"] == "ping"]
    assert progress == ["starting", "fetched", "parsed", "done"] * 6


async def test_answers_and_error_texts_are_the_same_as_the_bare_server(tmp_path):
    calls = [("strict", {"count": 2}), ("strict", {"count": -1}), ("strict", {"count": "x"}), ("nope", {})]

    async def answers(parameters):
        async with Client(parameters) as client:
            return [(await client.call_tool(n, a)).model_dump(exclude={"meta"}) for n, a in calls * 2]

    bare = await answers(params("-c", "import offload_server; offload_server.mcp.run()"))
    wrapped = await answers(params("-m", "loopwatch", "run", str(SERVER), "--offload-policy", "strict=always"))
    assert wrapped == bare
