"""The aiomonitor console: the lw- commands, driven through aiomonitor's own click group."""

import asyncio
import contextvars
import io
import logging
import socket
import threading
import time

import anyio
import pytest
from aiomonitor import monitor_cli
from aiomonitor.context import command_done, current_monitor, current_stdout
from mcp import Client
from mcp.server.mcpserver import MCPServer

import loopwatch
from loopwatch import aiomonitor as console
from loopwatch._events import BlockEvent, Frame, OffloadEvent
from loopwatch.cli import build_parser, run_options
from loopwatch.mcp import handle_of

from helpers import free_port

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey"),  # aiomonitor's web UI, not ours
]

WAIT = 10.0


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request):
    return request.param


def line_of(text: str) -> int:
    for number, line in enumerate(open(__file__).read().splitlines(), 1):
        if text in line and "line_of(" not in line:
            return number
    raise AssertionError(text)




class Gate:
    """A tool holds the loop until the test opens the gate (bounded, so a failing test never hangs)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        self.opened.wait(WAIT)  # the loop is blocked here


def make_server(
    name: str = "console-test", gate: Gate | None = None, extra_tool: str | None = None
) -> MCPServer:
    server = MCPServer(name)

    @server.tool()
    async def ping() -> str:
        await anyio.sleep(0.01)
        return "pong"

    @server.tool()
    async def stall() -> str:
        (gate or Gate()).hold()  # STALL-CALL
        return "released"

    if extra_tool:
        server.tool(name=extra_tool)(ping)
    return server


def instrument(server, **options):
    options = {
        "monitor": True,
        "monitor_port": free_port(3),
        "offload": "off",
        "log_blocks": False,
        "traces": False,
        **options,
    }
    return loopwatch.instrument(server, **options)


def integration_of(handle) -> console.ConsoleIntegration:
    return next(e for e in handle.extensions if isinstance(e, console.ConsoleIntegration))


async def started_console(handle):
    integration = integration_of(handle)
    assert integration.console is not None
    assert await anyio.to_thread.run_sync(integration.console.wait_started, WAIT)
    return integration.console.aiomonitor


def lw(aiomonitor, *args: str) -> str:
    """Run one command the way aiomonitor's telnet session does, capturing what it prints."""
    out = io.StringIO()

    def run() -> None:
        current_stdout.set(out)
        current_monitor.set(aiomonitor)
        command_done.set(asyncio.Event())
        monitor_cli.main(list(args), prog_name="", obj=aiomonitor, standalone_mode=False)

    contextvars.copy_context().run(run)
    return out.getvalue()


class Offloader:
    """Stands in for loopwatch's offload controller: records the policies and reports where tools run."""

    def __init__(self, handle) -> None:
        self.policies: dict[str, tuple[str, str]] = {}
        handle.monitor.where = lambda tool: "thread" if self.policy(tool) == "always" else "loop"
        handle.extensions.insert(0, self)  # before the real one (installed with offload off too): handle.offload

    def policy(self, tool: str) -> str:
        return self.policies.get(tool, ("auto", ""))[0]

    def set_policy(self, tool: str, policy: str, reason: str) -> None:
        if tool != "nosuch":  # like the real one, it moves only tools it can find
            self.policies[tool] = (policy, reason)


@pytest.fixture
def logs():
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("loopwatch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def messages(records) -> str:
    return "\n".join(r.getMessage() for r in records)


# -- while the loop is blocked ---------------------------------------------------------------------


async def test_lw_where_names_the_tool_and_line_that_block_the_loop_while_it_is_blocked(anyio_backend):
    gate = Gate()
    server = make_server(gate=gate)
    handle = instrument(server)
    seen: dict[str, str] = {}

    def operator(aiomonitor) -> None:
        try:
            assert gate.entered.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while "BLOCKED" not in seen.get("where", "") and time.monotonic() < deadline:
                seen["where"] = lw(aiomonitor, "lw-where")
                time.sleep(0.02)
            seen["lag"] = lw(aiomonitor, "lw-lag")
            seen["tools"] = lw(aiomonitor, "lw-tools")
            time.sleep(0.3)  # most of the block's samples on the tool, not on what the loop does right after
        finally:
            gate.opened.set()

    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("ping", {})  # first-call imports happen now, not right after the block
        thread = threading.Thread(target=operator, args=(aiomonitor,))
        thread.start()
        result = await client.call_tool("stall", {})
        await anyio.to_thread.run_sync(thread.join, WAIT)
        await handle.monitor.settle()
        blocks = lw(aiomonitor, "lw-blocks")
        tools = lw(aiomonitor, "lw-tools")

    assert not result.is_error
    where, stall_line = seen["where"], line_of("# STALL-CALL")
    assert "BLOCKED for" in where
    assert "serving    tools/call stall (request" in where
    hold_line = line_of("# the loop is blocked here")  # the line to fix: the innermost of the test's own code
    assert f"-> {__file__}:{hold_line} in hold" in where
    assert "BLOCKED" in seen["lag"]
    assert "stall" in seen["tools"]  # in flight: the row exists while the call is still running
    assert "by tools/call stall" in blocks and f"test_aiomonitor.py:{hold_line} in hold" in blocks
    assert f"test_aiomonitor.py:{stall_line} in stall" in blocks  # the tool's own frame, in the stack shown
    row = next(line.split() for line in tools.splitlines() if line.startswith("stall"))
    assert row[1] == "1" and row[6] == "1" and row[-1] == "loop"  # calls, blocks, runs on


async def test_lw_where_says_the_loop_is_responsive_and_between_requests_when_it_is(anyio_backend):
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("ping", {})
        where = await anyio.to_thread.run_sync(lw, aiomonitor, "lw-where")
    assert "responsive" in where and "no call" in where


# -- the other commands ------------------------------------------------------------------------------


async def test_lw_tools_lists_each_tool_with_calls_errors_percentiles_blocks_and_where_it_runs(anyio_backend):
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        assert lw(aiomonitor, "lw-tools") == "no tool calls yet\n"
        for _ in range(3):
            await client.call_tool("ping", {})
        out = lw(aiomonitor, "lw-tools")
    header, row = out.splitlines()
    columns = "tool calls errors now p50 ms p99 ms blocks blocked s runs on"
    assert header.split() == columns.split()
    name, calls, errors, now, p50, p99, blocks, blocked, runs = row.split()
    assert (name, calls, errors, now, blocks, blocked, runs) == ("ping", "3", "0", "0", "0", "0.000", "loop")
    assert float(p50) > 0 and float(p99) >= float(p50)


async def test_lw_lag_summarises_the_beats_with_a_histogram(anyio_backend):
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("ping", {})
        await handle.monitor.settle()
        out = lw(aiomonitor, "lw-lag")
    assert out.startswith("lag now ")
    assert "BLOCKED" not in out.splitlines()[0]
    assert "histogram" in out and "<= " in out


async def test_lw_offload_under_offload_off_still_moves_the_tool(anyio_backend):
    """--offload off stops the automatic moves only: an explicit lw-offload applies."""
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("ping", {})
        out = lw(aiomonitor, "lw-offload", "ping")
        assert (await client.call_tool("ping", {})).content[0].text == "pong"
    assert out.startswith("✓ ping runs off the loop")
    assert handle.snapshot()["tools"]["ping"]["executes"] == "thread"


async def test_lw_offload_moves_a_tool_off_the_loop_lw_tools_shows_it_and_lw_restore_undoes_it(anyio_backend):
    server = make_server()
    handle = instrument(server)
    offloader = Offloader(handle)
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("ping", {})
        offloaded = lw(aiomonitor, "lw-offload", "ping")
        tools_after_offload = lw(aiomonitor, "lw-tools")
        policy_after_offload = offloader.policies["ping"]
        restored = lw(aiomonitor, "lw-restore", "ping")
        tools_after_restore = lw(aiomonitor, "lw-tools")
        unknown = lw(aiomonitor, "lw-offload", "nosuch")
    assert offloaded.startswith("✓ ping runs off the loop")
    assert policy_after_offload == ("always", "manual")
    assert tools_after_offload.splitlines()[1].split()[-1] == "thread"
    assert restored.startswith("✓ ping is back to policy auto")
    assert offloader.policies["ping"] == ("auto", "manual")
    assert tools_after_restore.splitlines()[1].split()[-1] == "loop"
    assert unknown.startswith("✗ nosuch stays on the loop")


async def test_help_lists_every_lw_command_with_what_it_does(anyio_backend):
    server = make_server()
    handle = instrument(server)
    async with Client(server):
        aiomonitor = await started_console(handle)
        out = lw(aiomonitor, "help")
        offload_help = lw(aiomonitor, "lw-offload", "--help")
    for name in ("lw-tools", "lw-blocks", "lw-lag", "lw-where", "lw-offload", "lw-restore", "lw-profile"):
        assert name in out
    assert "TOOL" in offload_help and "--server" in offload_help


async def test_lw_profile_writes_the_blocks_as_speedscope_and_folded_stacks(anyio_backend, tmp_path):
    import json
    from pathlib import Path

    import jsonschema

    gate = Gate()
    server = make_server(gate=gate)
    handle = instrument(server)
    threading.Timer(0.4, gate.opened.set).start()
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        empty = lw(aiomonitor, "lw-profile", str(tmp_path / "none"))
        await client.call_tool("stall", {})
        await handle.monitor.settle()
        out = lw(aiomonitor, "lw-profile", str(tmp_path / "stalls"))
    assert "no blocks yet" in empty
    assert "✓ 1 blocks written" in out and str(tmp_path / "stalls.speedscope.json") in out
    schema = json.loads((Path(__file__).parent / "speedscope-file-format.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "stalls.speedscope.json").read_text()), schema)
    [line] = (tmp_path / "stalls.folded").read_text().splitlines()
    assert line.startswith("tools/call stall;") and f"stall (tests/test_aiomonitor.py:{line_of('# STALL-CALL')})" in line


# -- which server a command is about ---------------------------------------------------------------


async def test_servers_on_one_loop_share_a_console_and_tool_commands_find_the_one_with_the_tool(
    anyio_backend,
):
    port = free_port(3)
    alpha, beta = make_server("alpha"), make_server("beta", extra_tool="fetch")
    a = instrument(alpha, monitor_port=port)
    b = instrument(beta, monitor_port=port)
    offload_a, offload_b = Offloader(a), Offloader(b)
    async with Client(alpha) as client_a, Client(beta) as client_b:
        aiomonitor = await started_console(a)
        assert integration_of(b).console is integration_of(a).console
        await client_a.call_tool("ping", {})
        await client_b.call_tool("fetch", {})
        tools = lw(aiomonitor, "lw-tools")
        fetch = lw(aiomonitor, "lw-offload", "fetch")
        ambiguous = lw(aiomonitor, "lw-offload", "ping")
        named = lw(aiomonitor, "lw-offload", "ping", "--server", "beta")
    assert "== alpha ==" in tools and "== beta ==" in tools
    assert tools.index("fetch") > tools.index("== beta ==")
    assert (
        fetch.startswith("✓")
        and offload_b.policies["fetch"][0] == "always"
        and "fetch" not in offload_a.policies
    )
    assert ambiguous.startswith("✗ several servers have a tool 'ping'") and "--server" in ambiguous
    assert (
        named.startswith("✓")
        and offload_b.policies["ping"][0] == "always"
        and "ping" not in offload_a.policies
    )


async def test_a_console_on_another_loop_sees_only_the_server_on_that_loop(anyio_backend):
    alpha, beta = make_server("alpha"), make_server("beta", extra_tool="fetch")
    a, b = instrument(alpha), instrument(beta)
    beta_ready, beta_done = threading.Event(), threading.Event()
    beta_monitor: list = []

    async def serve_beta() -> None:
        async with Client(beta) as client:
            await client.call_tool("fetch", {})
            beta_monitor.append(await started_console(b))
            beta_ready.set()
            await anyio.to_thread.run_sync(beta_done.wait, WAIT)

    other = threading.Thread(target=anyio.run, args=(serve_beta,))
    other.start()
    try:
        async with Client(alpha) as client:
            await client.call_tool("ping", {})
            alpha_monitor = await started_console(a)
            assert await anyio.to_thread.run_sync(beta_ready.wait, WAIT)
            seen_by_alpha = lw(alpha_monitor, "lw-tools")
            seen_by_beta = lw(beta_monitor[0], "lw-tools")
    finally:
        beta_done.set()
        await anyio.to_thread.run_sync(other.join, WAIT)
    assert "ping" in seen_by_alpha and "fetch" not in seen_by_alpha and "==" not in seen_by_alpha
    assert "fetch" in seen_by_beta and "ping" not in seen_by_beta


async def test_a_console_on_a_loop_without_instrumented_servers_says_so(anyio_backend):
    import aiomonitor

    lonely = aiomonitor.Monitor(asyncio.new_event_loop())
    try:
        out = lw(lonely, "lw-where")
    finally:
        lonely._monitored_loop.close()
    assert out.startswith("✗ no server instrumented by loopwatch")


# -- lifecycle and safety --------------------------------------------------------------------------


async def test_the_console_closes_with_the_server_and_its_ports_are_free_again(anyio_backend):
    server = make_server()
    handle = instrument(server)
    port = handle.options.monitor_port
    async with Client(server):
        await started_console(handle)
        with pytest.raises(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    closing = integration_of(handle).console
    assert await anyio.to_thread.run_sync(closing.closed.wait, WAIT)
    for taken in (port, port + 1):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", taken))
    assert console.handles_on(closing.loop) == []


async def test_uninstrument_closes_the_console_of_a_running_server(anyio_backend):
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        await started_console(handle)
        closing = integration_of(handle).console
        handle.uninstrument()
        assert await anyio.to_thread.run_sync(closing.closed.wait, WAIT)
        assert console.handles_on(closing.loop) == []
        assert handle.monitor.start_hooks == [] and handle.monitor.stop_hooks == []
        result = await client.call_tool("ping", {})
    assert not result.is_error


async def test_the_console_starts_again_when_the_server_runs_again(anyio_backend):
    server = make_server()
    handle = instrument(server)
    for _ in range(2):
        async with Client(server) as client:
            aiomonitor = await started_console(handle)
            await client.call_tool("ping", {})
            assert "ping" in lw(aiomonitor, "lw-tools")


async def test_a_port_in_use_is_reported_and_the_server_runs_on_without_the_console(anyio_backend, logs):
    server = make_server()
    handle = instrument(server)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", handle.options.monitor_port))
        squatter.listen()
        async with Client(server) as client:
            integration = integration_of(handle)
            assert not await anyio.to_thread.run_sync(integration.console.wait_started, WAIT)
            result = await client.call_tool("ping", {})
    assert not result.is_error
    assert f"no aiomonitor console: cannot listen on 127.0.0.1:{handle.options.monitor_port}" in messages(
        logs
    )


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_the_server_runs_without_the_console_and_says_so_plainly(anyio_backend, logs):
    server = make_server()
    handle = instrument(server)
    async with Client(server) as client:
        result = await client.call_tool("ping", {})
    assert not result.is_error
    assert integration_of(handle).console is None
    assert "the aiomonitor console is asyncio-only; console-test runs on trio" in messages(logs)


def test_a_non_loopback_host_is_refused_and_the_server_is_left_as_it_was():
    server = make_server()
    with pytest.raises(loopwatch.OptionError, match="not a loopback address.*--allow-remote-monitor"):
        loopwatch.instrument(server, monitor=True, monitor_host="0.0.0.0")
    assert handle_of(server) is None
    assert all(type(m).__name__ != "LoopwatchMiddleware" for m in server._lowlevel_server.middleware)


def test_an_allowed_remote_host_is_warned_about_and_the_repl_named_when_it_is_on():
    allowed = loopwatch.Options(monitor_host="0.0.0.0", monitor_allow_remote=True)
    assert "no authentication" in console.check_options(allowed)
    assert "REPL" not in console.check_options(allowed)
    with_repl = loopwatch.Options(monitor_host="0.0.0.0", monitor_allow_remote=True, monitor_console=True)
    assert "run any Python code" in console.check_options(with_repl)
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert console.check_options(loopwatch.Options(monitor_host=loopback)) is None


@pytest.mark.parametrize("port", [0, 65534, -1])
def test_a_console_port_without_room_for_the_web_ui_and_repl_is_refused(port):
    with pytest.raises(loopwatch.OptionError, match="monitor_port"):
        console.check_options(loopwatch.Options(monitor_port=port))


def test_the_command_line_flags_reach_the_options():
    args = build_parser().parse_args(
        ["run", "server.py", "--monitor", "--monitor-port", "20201", "--monitor-console",
         "--monitor-host", "10.0.0.5", "--allow-remote-monitor", "--monitor-webui"]
    )  # fmt: skip
    options = run_options(args)
    assert {k: v for k, v in options.items() if k.startswith("monitor")} == {
        "monitor": True,
        "monitor_host": "10.0.0.5",
        "monitor_port": 20201,
        "monitor_console": True,
        "monitor_allow_remote": True,
        "monitor_webui": True,
    }
    defaults = run_options(build_parser().parse_args(["run", "server.py"]))
    assert (defaults["monitor"], defaults["monitor_host"], defaults["monitor_console"]) == (
        False,
        "127.0.0.1",
        False,
    )


# -- what the commands print, from plain data --------------------------------------------------------


def test_lw_blocks_text_folds_framework_frames_marks_the_culprit_and_lists_offload_decisions():
    import anyio as anyio_module

    framework = f"{anyio_module.__file__.rsplit('/', 1)[0]}/_core/_tasks.py"
    frames = (
        Frame(framework, 10, "run"),
        Frame(framework, 20, "step"),
        Frame("/srv/app/server.py", 42, "lookup"),
        Frame("/srv/app/legacy.py", 7, "fetch"),
    )
    block = BlockEvent(
        time=0.0, duration_s=0.5, kind="wait", tool="lookup", method="tools/call", request_id="3",
        session_id=None, cpu_s=0.0, samples=40, frames=frames, culprit=frames[2],
    )  # fmt: skip
    offload = OffloadEvent(time=1.0, tool="lookup", action="offloaded", reason="manual", blocks=1)
    text = console.blocks_text([block, offload])
    assert "loop blocked 500 ms [wait] by tools/call lookup (request 3)" in text
    assert "... 2 frames in anyio" in text
    assert "-> /srv/app/server.py:42 in lookup" in text
    assert text.index("-> /srv/app/server.py:42") < text.index(
        "   /srv/app/legacy.py:7 in fetch"
    )  # innermost last
    assert "offload decisions:" in text and offload.describe() in text
    assert f"{framework}:10 in run" in console.blocks_text([block], full=True)
    assert console.blocks_text([]) == "no blocks yet"
