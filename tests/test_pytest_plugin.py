"""The pytest plugin and `loopwatch.testing`: a test fails when the code it runs blocks the loop.

The plugin is driven through pytester in subprocesses, the way a project that installs loopwatch
meets it (entry point, no conftest). The context managers are also tested here directly.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import mcp
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

import loopwatch.testing
from loopwatch import BlockEvent, Frame
from loopwatch.testing import LoopBlockedError, collect_blocks, no_blocking

pytest_plugins = ["pytester"]

RUN_TIMEOUT = 180
EXAMPLE = Path(__file__).parent.parent / "examples" / "test_with_loopwatch.py"

SERVERS = """\
import time

import anyio
from fastmcp import FastMCP
from mcp.server.mcpserver import MCPServer

mcpserver = MCPServer("inventory")


@mcpserver.tool()
async def slow_inventory(sku: str) -> str:
    time.sleep(0.3)  # blocks: inventory
    return sku


@mcpserver.tool()
async def inventory(sku: str) -> str:
    await anyio.sleep(0.01)
    return sku


@mcpserver.tool()
def sync_inventory(sku: str) -> str:
    time.sleep(0.3)  # a def tool: the SDK runs it on a worker thread
    return sku


catalog_server = FastMCP("catalog")


@catalog_server.tool
async def slow_catalog(sku: str) -> str:
    time.sleep(0.3)  # blocks: catalog
    return sku


@catalog_server.tool
async def catalog(sku: str) -> str:
    await anyio.sleep(0.01)
    return sku
"""

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""


def blocking_line(marker: str) -> str:
    """`servers.py:<line> in <function>` of the line that carries `# blocks: <marker>`."""
    lines = SERVERS.splitlines()
    number = next(i for i, text in enumerate(lines, 1) if text.endswith(f"# blocks: {marker}"))
    function = (
        next(t for t in reversed(lines[:number]) if t.startswith("async def ")).split()[2].split("(")[0]
    )
    return f"servers.py:{number} in {function}"


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """Test name (without the file) -> PASSED / FAILED / SKIPPED..., from the `-rA` summary."""
    found = {}
    for line in result.outlines:
        match = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?:\[\d+\] )?\S*::(\S+)", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def failures(result: pytest.RunResult) -> dict[str, str]:
    """Test name -> the text of its section under FAILURES."""
    sections: dict[str, str] = {}
    name = None
    for line in result.outlines:
        header = re.match(r"^_{3,} (?:Test\w+\.)?(\S+) _{3,}$", line)
        if header:
            name = header.group(1)
            sections[name] = ""
        elif re.match(r"^={3,}", line):
            name = None
        elif name is not None:
            sections[name] += line + "\n"
    return sections


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # summary lines of the subprocesses are not cut short


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(servers=SERVERS)
    pytester.makeini(INI)
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess("-rA", "-p", "no:randomly", *args, timeout=RUN_TIMEOUT)


# -- the marker, through pytester -------------------------------------------------------------------

ANYIO_TESTS = """
import threading

import pytest
from fastmcp import Client as FastMCPClient
from mcp import Client

from servers import catalog_server, mcpserver

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio", pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request):
    return request.param


@pytest.mark.no_blocking
async def test_blocking_mcpserver():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.no_blocking
async def test_honest_mcpserver():
    async with Client(mcpserver) as client:
        await client.call_tool("inventory", {"sku": "a"})
        await client.call_tool("sync_inventory", {"sku": "a"})


@pytest.mark.no_blocking(threshold=0.05)
async def test_blocking_fastmcp(anyio_backend_name):
    if anyio_backend_name == "trio":
        pytest.skip("fastmcp.Client runs on asyncio only")
    async with FastMCPClient(catalog_server) as client:
        await client.call_tool("slow_catalog", {"sku": "a"})


@pytest.mark.no_blocking(0.05)
async def test_honest_fastmcp(anyio_backend_name):
    if anyio_backend_name == "trio":
        pytest.skip("fastmcp.Client runs on asyncio only")
    async with FastMCPClient(catalog_server) as client:
        await client.call_tool("catalog", {"sku": "a"})


async def test_unmarked_blocking_is_left_alone():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})
    assert not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"]


@pytest.mark.no_blocking
def test_sync_with_the_marker():
    pass


@pytest.mark.no_blocking(threshold="soon")
async def test_marker_with_a_bad_threshold():
    pass
"""

ASYNCIO_TESTS = """
import time

import pytest
from fastmcp import Client as FastMCPClient
from mcp import Client

from servers import catalog_server, mcpserver


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_blocking_mcpserver():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_blocking_fastmcp():
    async with FastMCPClient(catalog_server) as client:
        await client.call_tool("slow_catalog", {"sku": "a"})


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_honest():
    async with Client(mcpserver) as client:
        await client.call_tool("inventory", {"sku": "a"})
    async with FastMCPClient(catalog_server) as client:
        await client.call_tool("catalog", {"sku": "a"})


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_own_failure():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})
    assert 1 == 2, "the test's own assertion"


@pytest.mark.no_blocking
class TestInAClass:
    @pytest.mark.asyncio
    async def test_method_blocks_outside_any_call(self):
        time.sleep(0.2)  # blocks: the test itself
"""


_marker_runs: list[pytest.RunResult] = []


@pytest.fixture
def marker_run(project: pytest.Pytester) -> pytest.RunResult:
    """One subprocess for every marker case (anyio on asyncio, trio, uvloop; pytest-asyncio), run once."""
    if not _marker_runs:
        project.makepyfile(test_anyio=ANYIO_TESTS, test_asyncio=ASYNCIO_TESTS)
        _marker_runs.append(run(project))
    return _marker_runs[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio", "uvloop"])
def test_marker_fails_a_blocking_anyio_test_naming_tool_kind_and_line(marker_run, backend) -> None:
    name = f"test_blocking_mcpserver[{backend}]"
    assert outcomes(marker_run)[name] == "FAILED"
    report = failures(marker_run)[name]
    assert "loop blocked" in report
    assert "[wait] by tools/call slow_inventory" in report
    assert f"at {blocking_line('inventory')}" in report
    assert "time.sleep(0.3)" in report
    assert "test_anyio.py:" in report  # the test's own line that made the call


@pytest.mark.parametrize("backend", ["asyncio", "uvloop"])
def test_marker_blames_a_fastmcp_tool(marker_run, backend) -> None:
    name = f"test_blocking_fastmcp[{backend}]"
    assert outcomes(marker_run)[name] == "FAILED"
    report = failures(marker_run)[name]
    assert "by tools/call slow_catalog" in report
    assert f"at {blocking_line('catalog')}" in report


@pytest.mark.parametrize("backend", ["asyncio", "trio", "uvloop"])
def test_marker_passes_an_honest_test(marker_run, backend) -> None:
    assert outcomes(marker_run)[f"test_honest_mcpserver[{backend}]"] == "PASSED"
    if backend != "trio":
        assert outcomes(marker_run)[f"test_honest_fastmcp[{backend}]"] == "PASSED"


def test_plugin_does_nothing_without_the_marker_or_the_flag(marker_run) -> None:
    found = outcomes(marker_run)
    assert {found[f"test_unmarked_blocking_is_left_alone[{b}]"] for b in ("asyncio", "trio", "uvloop")} == {
        "PASSED"
    }
    assert "loopwatch: async tests fail" not in marker_run.stdout.str()


def test_marker_with_a_bad_threshold_fails_the_test_saying_why(marker_run) -> None:
    for backend in ("asyncio", "trio", "uvloop"):
        assert outcomes(marker_run)[f"test_marker_with_a_bad_threshold[{backend}]"] == "FAILED"
    marker_run.stdout.fnmatch_lines(
        ["*no_blocking: threshold must be a positive number of seconds, not 'soon'*"]
    )


def test_marker_on_a_sync_test_warns(marker_run) -> None:
    assert outcomes(marker_run)["test_sync_with_the_marker"] == "PASSED"
    marker_run.stdout.fnmatch_lines(
        ["*no_blocking applies to async test functions; test_sync_with_the_marker*"]
    )


def test_marker_fails_a_blocking_pytest_asyncio_test(marker_run) -> None:
    found, reports = outcomes(marker_run), failures(marker_run)
    assert found["test_asyncio_blocking_mcpserver"] == "FAILED"
    assert (
        f"by tools/call slow_inventory (request 2) at {blocking_line('inventory')}"
        in reports["test_asyncio_blocking_mcpserver"]
    )
    assert found["test_asyncio_blocking_fastmcp"] == "FAILED"
    assert (
        f"by tools/call slow_catalog (request 2) at {blocking_line('catalog')}"
        in reports["test_asyncio_blocking_fastmcp"]
    )
    assert found["test_asyncio_honest"] == "PASSED"


def test_marker_on_a_class_blames_the_test_itself(marker_run) -> None:
    assert outcomes(marker_run)["test_method_blocks_outside_any_call"] == "FAILED"
    report = failures(marker_run)["test_method_blocks_outside_any_call"]
    assert "outside any call at test_asyncio.py:" in report
    assert "time.sleep(0.2)  # blocks: the test itself" in report


def test_a_tests_own_failure_wins_and_carries_a_note_about_blocks(marker_run) -> None:
    assert outcomes(marker_run)["test_asyncio_own_failure"] == "FAILED"
    report = failures(marker_run)["test_asyncio_own_failure"]
    assert "AssertionError: the test's own assertion" in report
    assert "loopwatch saw the event loop blocked meanwhile:" in report
    assert "slow_inventory" in report


def test_the_summary_line_names_the_tool(marker_run) -> None:
    summary = "FAILED test_asyncio.py::test_asyncio_blocking_mcpserver - Failed: loop blocked *"
    marker_run.stdout.fnmatch_lines([f"{summary} by tools/call slow_inventory (request 2) at servers.py:*"])


# -- the flag -----------------------------------------------------------------------------------------

FLAG_TESTS = """
import time

import pytest
from mcp import Client

from loopwatch.testing import collect_blocks
from servers import mcpserver


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_anyio_blocking():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.asyncio
async def test_asyncio_blocking():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.anyio
async def test_honest():
    async with Client(mcpserver) as client:
        await client.call_tool("inventory", {"sku": "a"})


@pytest.mark.anyio
@pytest.mark.no_blocking
async def test_bare_marker_takes_the_flags_threshold():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.anyio
@pytest.mark.no_blocking(threshold=1.0)
async def test_marker_overrides_the_flag():
    async with Client(mcpserver) as client:
        await client.call_tool("slow_inventory", {"sku": "a"})


@pytest.mark.anyio
async def test_blocks_the_test_collects_itself_are_its_own():
    async with collect_blocks() as blocks:
        async with Client(mcpserver) as client:
            await client.call_tool("slow_inventory", {"sku": "a"})
    assert blocks.tools() == ["slow_inventory"]


def test_sync_blocking():
    time.sleep(0.1)
"""


def test_flag_applies_to_every_async_test(project: pytest.Pytester) -> None:
    project.makepyfile(test_flag=FLAG_TESTS)
    result = run(project, "--no-blocking", "test_flag.py")  # a path right after the flag is a path
    assert outcomes(result) == {
        "test_anyio_blocking": "FAILED",
        "test_asyncio_blocking": "FAILED",
        "test_honest": "PASSED",
        "test_bare_marker_takes_the_flags_threshold": "FAILED",
        "test_marker_overrides_the_flag": "PASSED",
        "test_blocks_the_test_collects_itself_are_its_own": "PASSED",
        "test_sync_blocking": "PASSED",
    }
    assert "by tools/call slow_inventory" in failures(result)["test_anyio_blocking"]
    result.stdout.fnmatch_lines(
        ["loopwatch: async tests fail when they block the event loop for 50 ms or more"]
    )


def test_flag_takes_a_threshold(project: pytest.Pytester) -> None:
    project.makepyfile(test_flag=FLAG_TESTS)
    result = run(project, "--no-blocking=0.6")
    assert set(outcomes(result).values()) == {"PASSED"}
    result.stdout.fnmatch_lines(["loopwatch: * for 600 ms or more"])


def test_flag_rejects_a_threshold_that_is_not_seconds(project: pytest.Pytester) -> None:
    result = run(project, "--no-blocking=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--no-blocking takes a positive number of seconds*not 'soon'*"])


GC_TESTS = """
import gc
import time

import pytest


class SlowToFinalize:
    def __init__(self):
        self.cycle = self

    def __del__(self):
        time.sleep(0.2)


@pytest.mark.anyio
@pytest.mark.no_blocking
async def test_a_collection_is_not_the_tests_fault():
    SlowToFinalize()
    gc.collect()


@pytest.mark.anyio
@pytest.mark.no_blocking(gc=True)
async def test_a_collection_fails_with_gc_true():
    SlowToFinalize()
    gc.collect()
"""


def test_garbage_collection_fails_a_test_only_when_the_marker_asks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gc_marker=GC_TESTS)
    pytester.makeini(INI)
    result = run(pytester)
    assert outcomes(result) == {
        f"test_a_collection_{name}[{backend}]": outcome
        for name, outcome in (("is_not_the_tests_fault", "PASSED"), ("fails_with_gc_true", "FAILED"))
        for backend in ("asyncio", "trio")
    }
    for backend in ("asyncio", "trio"):
        report = failures(result)[f"test_a_collection_fails_with_gc_true[{backend}]"]
        assert "[gc] outside any call: the garbage collector ran" in report


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    shutil.copy(EXAMPLE, pytester.path / EXAMPLE.name)
    result = run(pytester)
    result.assert_outcomes(passed=4, xfailed=2)


# -- loopwatch.testing, in this process ----------------------------------------------------------------

server = MCPServer("direct")


@server.tool()
async def slow_lookup(key: str) -> str:
    time.sleep(0.2)  # noqa: ASYNC251 (blocks: direct)
    return key


@server.tool()
async def lookup(key: str) -> str:
    await anyio.sleep(0.01)
    return key


SLOW_LINE = next(
    i for i, t in enumerate(Path(__file__).read_text().splitlines(), 1) if t.endswith("(blocks: direct)")
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.anyio
async def test_collect_blocks_blames_the_tool_and_line() -> None:
    with anyio.fail_after(30):
        async with collect_blocks(threshold=0.05) as blocks:
            async with Client(server) as client:
                await client.call_tool("slow_lookup", {"key": "a"})
    assert blocks.tools() == ["slow_lookup"]
    assert blocks[0].culprit == Frame(__file__, SLOW_LINE, "slow_lookup")
    assert blocks[0].kind == "wait"


@pytest.mark.anyio
async def test_no_blocking_raises_naming_tool_kind_and_frames() -> None:
    with anyio.fail_after(30), pytest.raises(LoopBlockedError) as caught:
        async with no_blocking(threshold=0.05):
            async with Client(server) as client:
                await client.call_tool("slow_lookup", {"key": "a"})
    message = str(caught.value)
    assert message.startswith("loop blocked ")
    assert (
        f"[wait] by tools/call slow_lookup (request 2) at test_pytest_plugin.py:{SLOW_LINE} in slow_lookup"
        in message
    )
    assert "time.sleep(0.2)  # noqa: ASYNC251 (blocks: direct)" in message
    assert "(loopwatch: 1 block of 50 ms or more)" in message
    assert isinstance(caught.value, AssertionError)
    assert [b.tool for b in caught.value.blocks] == ["slow_lookup"]


@pytest.mark.anyio
async def test_no_blocking_passes_an_honest_call() -> None:
    with anyio.fail_after(30):
        async with no_blocking(threshold=0.05) as blocks:
            async with Client(server) as client:
                await client.call_tool("lookup", {"key": "a"})
    assert list(blocks) == []


@pytest.mark.anyio
async def test_the_body_exception_comes_out_unwrapped_with_a_note() -> None:
    with anyio.fail_after(30), pytest.raises(KeyError) as caught:
        async with no_blocking(threshold=0.05):
            time.sleep(0.1)  # noqa: ASYNC251
            raise KeyError("the body's own")
    assert type(caught.value) is KeyError
    assert any("outside any call" in note for note in caught.value.__notes__)


@pytest.mark.anyio
async def test_an_exception_group_from_the_body_comes_out_as_it_was_raised() -> None:
    async def fail() -> None:
        raise ValueError("in a task")

    with anyio.fail_after(30), pytest.raises(ExceptionGroup) as caught:
        async with no_blocking(threshold=0.05), anyio.create_task_group() as tasks:
            tasks.start_soon(fail)
    assert [type(e) for e in caught.value.exceptions] == [ValueError]


@pytest.mark.anyio
async def test_blocks_collected_inside_no_blocking_are_the_tests_own() -> None:
    with anyio.fail_after(30):
        async with no_blocking(threshold=0.05):
            async with collect_blocks(threshold=0.05) as blocks:
                time.sleep(0.1)  # noqa: ASYNC251
    assert len(blocks) == 1


@pytest.mark.anyio
async def test_watching_costs_the_loop_no_block_of_its_own() -> None:
    here = str(Path(loopwatch.testing.__file__).parent)
    with anyio.fail_after(60):
        async with collect_blocks(threshold=0.05) as outer:
            for _ in range(5):
                async with no_blocking(threshold=0.05), collect_blocks():
                    await anyio.lowlevel.checkpoint()
    assert not [b for b in outer if any(f.file.startswith(here) for f in b.frames)]


def test_testing_all_is_exactly_the_public_names_of_the_module() -> None:
    module = loopwatch.testing
    defined = {n for n, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__}
    assert {n for n in defined if not n.startswith("_")} == set(module.__all__)
    assert isinstance(module.__all__, tuple)


def test_report_folds_library_frames_and_quotes_application_lines() -> None:
    anyio_dir, mcp_dir = Path(anyio.__file__).parent, Path(mcp.__file__).parent
    frames = (
        Frame(str(anyio_dir / "_backends" / "_asyncio.py"), 1, "wrapper"),
        Frame(__file__, SLOW_LINE - 1, "test_caller"),
        Frame(str(mcp_dir / "client" / "session.py"), 10, "call_tool"),
        Frame(str(mcp_dir / "server" / "runner.py"), 20, "_on_request"),
        Frame(__file__, SLOW_LINE, "slow_lookup"),
    )
    event = BlockEvent(
        time=0.0,
        duration_s=0.2,
        kind="wait",
        tool="slow_lookup",
        method="tools/call",
        request_id="2",
        session_id=None,
        cpu_s=0.0,
        samples=10,
        frames=frames,
        culprit=frames[-1],
    )
    lines = loopwatch.testing._format_blocks([event, event], threshold=0.05).splitlines()
    assert lines[0] == event.describe()
    assert lines[1].endswith(f"test_pytest_plugin.py:{SLOW_LINE - 1} in test_caller")
    assert lines[3] == "    ... 2 library frames (mcp)"
    assert lines[5] == "        time.sleep(0.2)  # noqa: ASYNC251 (blocks: direct)"
    assert lines[-1] == "(loopwatch: 2 blocks of 50 ms or more)"
