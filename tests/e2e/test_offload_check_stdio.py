"""Over stdio through `loopwatch run` (offload auto): a blocking writer and an honest reader that share a
start-up asyncio.Lock answer every call as on the bare server; the writer stays on the loop, said why."""

import os
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SERVER = FIXTURES / "shared_server.py"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def params(*args):
    return StdioServerParameters(command=sys.executable, args=list(args), env={**os.environ}, cwd=str(FIXTURES))


async def answers(parameters):
    seen = []

    async def call(client, name, args):
        seen.append((name, (await client.call_tool(name, args)).model_dump(exclude={"meta"})))

    with anyio.fail_after(120):
        async with Client(parameters, mode="legacy") as client:
            for i in range(4):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, client, "writer", {"text": str(i)})
                    await anyio.sleep(0.05)  # the writer holds the lock: the reader waits for it
                    tg.start_soon(call, client, "reader", {})
            for name in ("count_hit", "whoami", "reader"):
                await call(client, name, {})
    return seen


async def test_tools_sharing_loop_and_thread_bound_objects_answer_as_on_the_bare_server(tmp_path):
    events = tmp_path / "events.jsonl"
    bare = await answers(params("-c", "import shared_server; shared_server.mcp.run()"))
    watched = await answers(params("-m", "loopwatch", "run", str(SERVER), "--events", str(events)))
    assert watched == bare
    assert not any(row["is_error"] for _, row in bare)
    with anyio.fail_after(10):
        while {"writer", "count_hit", "whoami"} - {e["tool"] for e in read_events(events) if e["event"] == "pinned"}:
            await anyio.sleep(0.05)
    assert not [e for e in read_events(events) if e["event"] == "offloaded"]
