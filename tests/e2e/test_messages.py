"""What loopwatch says on stderr, as a newcomer reads it: each line once, one `loopwatch` per line, the URL a
client connects to, the start-up line as the README quotes it. Real commands and real MCP clients."""

import re
import subprocess
import sys
import time

import anyio
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client

from e2e.launching import LOOPWATCH, run, session_answers, stdio

from helpers import FIXTURES

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

DOUBLED = re.compile(r"loopwatch (DEBUG|INFO|WARNING|ERROR|CRITICAL) loopwatch\b")


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_a_cpu_block_of_a_moved_tool_gives_its_advice_once_and_no_line_says_loopwatch_twice(tmp_path):
    err = tmp_path / "stderr.log"
    params = stdio([*LOOPWATCH, "run", str(FIXTURES / "cpu_server.py")], err)
    with anyio.fail_after(120):
        got = await session_answers(params, "legacy", [("crunch", {"rounds": 5_000_000})])
    assert got["answers"][0]["structured_content"]["rounds"] == 5_000_000
    lines = err.read_text().splitlines()
    moved = [line for line in lines if "tool crunch now runs off the loop (in a thread)" in line]
    blocked = [line for line in lines if "loop blocked" in line and "crunch" in line]
    advice = [line for line in lines if "--offload-policy crunch=process would cure it" in line]
    assert len(moved) == 1 and len(blocked) == 1 and "[cpu]" in blocked[0], lines
    assert len(advice) == 1 and "WARNING tool crunch runs in a thread: crunch is CPU-bound" in advice[0], lines
    assert not [line for line in lines if DOUBLED.search(line) or "WARNING loopwatch:" in line], lines


def test_the_start_up_line_of_a_launched_server_reads_as_the_readme_quotes_it():
    done = run([*LOOPWATCH, "run", "--", sys.executable, "-c", "from mcp.server.mcpserver import MCPServer; "
                "MCPServer('mcp-git')"])
    err = done.stderr.decode()
    assert done.returncode == 0, err
    [line] = [line for line in err.splitlines() if "watches server" in line]
    assert re.fullmatch(r"\S+ \S+ loopwatch INFO watches server 'mcp-git' in pid \d+ \(threshold 100 ms\)", line), line
    readme = (FIXTURES.parent.parent / "README.md").read_text()
    assert "`loopwatch INFO watches server 'mcp-git' in pid" in readme


def wait_for_url(path, proc, timeout=60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(r" at (http://\S+) \(threshold", path.read_text())
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no URL in time: {path.read_text()}")


@pytest.mark.parametrize(("transport", "path"), [("streamable-http", "/mcp"), ("sse", "/sse")])
async def test_target_mode_over_http_says_the_url_a_client_connects_to_once(tmp_path, transport, path):
    err = tmp_path / "stderr.log"
    with open(err, "w") as log:
        proc = subprocess.Popen([*LOOPWATCH, "run", str(FIXTURES / "inventory_server.py"), "--transport", transport,
                                 "--port", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        url = wait_for_url(err, proc)
        assert re.fullmatch(rf"http://127\.0\.0\.1:\d+{path}", url) and not url.endswith(":0" + path), url
        with anyio.fail_after(60):  # the URL said is the one a real client reaches the server at
            if transport == "sse":
                async with sse_client(url) as (read, write), ClientSession(read, write) as session:
                    await session.initialize()
                    answer = await session.call_tool("ping", {})
            else:
                async with Client(url, mode="legacy") as client:
                    answer = await client.call_tool("ping", {})
        assert answer.is_error is False
    finally:
        proc.terminate()
        proc.wait(30)
    text = err.read_text()
    assert text.count("http://") == 1 and text.count(f"watching {FIXTURES / 'inventory_server.py'} over "
                                                     f"{transport} at {url}") == 1, text
