"""Over stdio through `loopwatch run`: a moved tool's client sees exactly what the bare server's sees, in both
protocol eras, on each server family; and a blocking page parser that logs twice loses no response."""

import os
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters
from offload_diff import assert_not_vacuous, outcomes

from helpers import FIXTURES

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SERVER = FIXTURES / "context_tools.py"
TARGETS = {"lowlevel": "context_tools.py:lowlevel", "mcpserver": "context_tools.py:mcpserver",
           "fastmcp": "context_tools_fm.py:fastmcp_server"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def params(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return StdioServerParameters(command=sys.executable, args=list(args), env=env, cwd=str(FIXTURES))


def bare(family):
    return params(str(SERVER), family)


def watched(family, *options):
    return params("-m", "loopwatch", "run", str(FIXTURES / TARGETS[family]), *options)


@pytest.mark.parametrize(("family", "mode"), [
    ("lowlevel", "legacy"), ("mcpserver", "legacy"), ("fastmcp", "legacy"), ("mcpserver", "auto"),
])
async def test_over_stdio_a_moved_tool_sends_exactly_what_the_bare_server_does(family, mode):
    expected = await outcomes(bare(family), mode, timeout=120)
    assert_not_vacuous(expected)
    seen = await outcomes(watched(family, "--offload-policy", "act=always"), mode, timeout=120)
    assert seen == expected


CALLS = int(os.environ.get("LOOPWATCH_OFFLOAD_CALLS", "10"))
"""200 for the full check of issue 13 (`LOOPWATCH_OFFLOAD_CALLS=200`); each call parses 500 kB of HTML."""


async def page_answers(parameters, calls=CALLS, at_once=10):
    logs, answers = [], {}

    async def on_log(params):
        logs.append(params.data)

    async def call(client, n, limit):
        async with limit:
            answers[n] = (await client.call_tool("fetch_content", {"n": n})).model_dump(exclude={"meta"})

    limit = anyio.CapacityLimiter(at_once)
    with anyio.fail_after(60 + calls * 6):
        async with Client(parameters, mode="legacy", logging_callback=on_log) as client:
            async with anyio.create_task_group() as tg:
                for n in range(calls):
                    tg.start_soon(call, client, n, limit)
    return answers, sorted(logs)


async def test_a_blocking_page_parser_that_logs_twice_moves_and_every_response_arrives(tmp_path):
    """Issue 13's case: moved by its first block under the default `--offload auto`, legacy client."""
    events = tmp_path / "events.jsonl"
    bare_answers, bare_logs = await page_answers(params("-c", "import context_tools; context_tools.mcpserver.run()"))
    answers, logs = await page_answers(watched("mcpserver", "--events", str(events)))
    assert len(answers) == CALLS and answers == bare_answers
    assert logs == bare_logs and len(logs) == 2 * CALLS
    with anyio.fail_after(10):
        while not events.exists() or '"offloaded"' not in events.read_text():
            await anyio.sleep(0.05)
    assert '"fetch_content"' in events.read_text()
