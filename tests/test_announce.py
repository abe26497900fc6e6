"""Every watched server announces itself on a private Unix socket that answers while its loop is blocked."""

import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

import loopwatch
from loopwatch import _announce
from loopwatch.top import Poller, once_text

from helpers import threads_left

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", [("asyncio", {})])


@pytest.fixture
def runtime(monkeypatch):
    """A private XDG_RUNTIME_DIR of the test's own: short (a socket path has ~107 bytes), seen by nobody else."""
    root = tempfile.mkdtemp(prefix="lw-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", root)
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(root, "cache"))
    monkeypatch.delenv("LOOPWATCH_NO_ANNOUNCE", raising=False)
    yield Path(root) / "loopwatch"
    shutil.rmtree(root, ignore_errors=True)


def make_server(name="announced", release=None):
    server = MCPServer(name)

    @server.tool()
    async def ping() -> str:
        return "pong"

    @server.tool()
    async def hold() -> str:
        release.wait(10)  # blocks the loop until the test has seen it blocked (bounded)
        return "released"

    return server


def ask(path, **request):
    with _announce.Link(path, timeout=5) as link:
        return link.ask(**({"op": "state", "detail": True} | request))


async def wait_for_sockets(directory, count, timeout=10.0):
    with anyio.fail_after(timeout):
        while len(_announce.sockets([directory])) < count:
            await anyio.sleep(0.01)
    return _announce.sockets([directory])


async def test_a_running_server_has_a_socket_only_its_user_can_open_and_it_goes_when_the_server_stops(
    anyio_backend, runtime
):
    server = make_server()
    loopwatch.instrument(server, log_blocks=False)
    before = set(threading.enumerate())
    async with Client(server) as client:
        await client.call_tool("ping", {})
        [path] = await wait_for_sockets(runtime, 1)
        assert path.parent == runtime and path.name.startswith(f"{os.getpid()}.")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
        state = await anyio.to_thread.run_sync(ask, path)  # not from the loop: that would block it
    assert state["ok"] and state["name"] == "announced" and state["pid"] == os.getpid()
    assert state["snapshot"]["tools"]["ping"]["calls"] == 1
    assert state["command"] and state["backend"] == anyio_backend[0] and not state["blocked"]
    assert any(f["function"] for f in state["stack"])  # the loop thread's stack right now
    assert not path.exists() and _announce.sockets([runtime]) == []
    assert await threads_left(before) == []


async def test_the_socket_answers_while_the_loop_is_blocked_with_the_call_and_the_line(anyio_backend, runtime):
    release = threading.Event()
    server = make_server(release=release)
    loopwatch.instrument(server, log_blocks=False, offload="off")
    seen = {}

    def watch(path):
        deadline = time.monotonic() + 10
        with _announce.Link(path, timeout=5) as link:
            while time.monotonic() < deadline:
                state = link.ask(op="state")
                if state.get("blocked"):
                    seen.update(state)
                    break
                time.sleep(0.02)
        release.set()

    async with Client(server) as client:
        [path] = await wait_for_sockets(runtime, 1)
        watcher = threading.Thread(target=watch, args=(path,))
        watcher.start()
        assert (await client.call_tool("hold", {})).content[0].text == "released"
        watcher.join(10)
    assert seen, "the socket never said the loop was blocked"
    assert seen["serving"]["method"] == "tools/call" and seen["serving"]["tool"] == "hold"
    assert seen["culprit"]["function"] == "hold" and seen["culprit"]["file"] == __file__
    assert seen["lag_now_s"] >= seen["threshold_s"] and seen["in_flight"] == 1


@asyncio_only
async def test_announce_false_and_the_environment_variable_turn_it_off(runtime, monkeypatch):
    quiet = make_server("quiet")
    loopwatch.instrument(quiet, announce=False)
    async with Client(quiet) as client:
        await client.call_tool("ping", {})
        await anyio.sleep(0.1)
        assert _announce.sockets([runtime]) == []
    monkeypatch.setenv("LOOPWATCH_NO_ANNOUNCE", "1")
    also_quiet = make_server("also-quiet")
    handle = loopwatch.instrument(also_quiet)
    async with Client(also_quiet) as client:
        await client.call_tool("ping", {})
        await anyio.sleep(0.1)
        assert _announce.sockets([runtime]) == []
    assert _announce.integration_of(handle) is None


@asyncio_only
async def test_events_stream_to_a_reader_as_they_happen(runtime):
    server = MCPServer("streamed")

    @server.tool()
    async def nap() -> str:
        time.sleep(0.3)
        return "ok"

    loopwatch.instrument(server, log_blocks=False, offload="off")
    events = []

    def read(path):
        with _announce.Link(path, timeout=10) as link:
            for event in link.stream():
                events.append(event)
                if event["event"] == "loop_blocked":
                    return

    async with Client(server) as client:
        [path] = await wait_for_sockets(runtime, 1)
        reader = threading.Thread(target=read, args=(path,))
        reader.start()
        await anyio.sleep(0.2)  # the stream is open before the block
        await client.call_tool("nap", {})
        with anyio.fail_after(10):
            while reader.is_alive():
                await anyio.sleep(0.02)
    [block] = [e for e in events if e["event"] == "loop_blocked"]
    assert block["tool"] == "nap" and block["kind"] == "wait" and block["frames"][-1]["function"] == "nap"


@asyncio_only
async def test_the_announcement_thread_sleeps_while_nobody_asks(runtime):
    """No periodic wake-ups: the thread waits in select() with no timeout (its context switches do not move)."""
    server = make_server()
    loopwatch.instrument(server, log_blocks=False)
    async with Client(server) as client:
        await client.call_tool("ping", {})
        await wait_for_sockets(runtime, 1)
        [thread] = [t for t in threading.enumerate() if t.name == "loopwatch-announce"]
        status = Path(f"/proc/self/task/{thread.native_id}/status")
        if not status.exists():
            pytest.skip("no /proc task status here")

        def switches():
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])

        await anyio.sleep(0.2)
        first = switches()
        await anyio.sleep(1.5)
        assert switches() == first


def test_a_server_that_stops_before_its_announcement_is_up_says_nothing_and_leaves_nothing(
    runtime, monkeypatch, caplog
):
    """A session shorter than the socket's set-up (a slow filesystem, a short test) is no failure: no warning."""
    runtime.mkdir(mode=0o700, parents=True)
    handle = loopwatch.instrument(make_server("brief"), log_blocks=False, announce=False)
    announcement = _announce.Announcement(handle, runtime, _announce.BlockLog())
    real_chmod = os.chmod

    def slow_chmod(path, mode, *args, **kwargs):  # the set-up is still going when the server stops
        if threading.current_thread().name == "loopwatch-announce":
            deadline = time.monotonic() + 10
            while not announcement._closing and time.monotonic() < deadline:
                time.sleep(0.005)
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", slow_chmod)
    with caplog.at_level(logging.DEBUG, logger="loopwatch"):
        announcement.start()
        assert not announcement.started.is_set()  # still setting up (held in chmod until the stop below)
        announcement.stop()
    assert announcement._closing and not announcement._thread.is_alive()
    assert [r.getMessage() for r in caplog.records if r.name == "loopwatch" and r.levelno >= logging.WARNING] == []
    assert any("stopped before its announcement" in r.getMessage() for r in caplog.records)
    assert list(runtime.iterdir()) == []  # neither the socket nor its temporary name is left behind


def test_a_socket_nobody_listens_on_is_removed_by_a_reader(runtime):
    runtime.mkdir(mode=0o700, parents=True)
    dead = runtime / "999999.1.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()  # as a killed process leaves it: the file stays, nobody listens
    poller = Poller([runtime])
    try:
        assert poller.poll() == []
    finally:
        poller.close()
    assert not dead.exists()
    assert any("999999" in line for line in poller.cleaned)
    assert "no watched servers" in once_text([])


@pytest.mark.parametrize("command", [["ls"], ["top", "--once"]])
def test_a_removed_stale_announcement_is_said_on_stderr_and_stdout_is_the_table_alone(runtime, command):
    import subprocess
    import sys

    runtime.mkdir(mode=0o700, parents=True)
    dead = runtime / "999999.1.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()
    done = subprocess.run([sys.executable, "-m", "loopwatch", *command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not dead.exists()
    assert done.stderr.splitlines() == [f"loopwatch: removed a stale announcement: {dead} (pid 999999 no longer listens)"]
    assert "stale" not in done.stdout and "no watched servers" in done.stdout


@asyncio_only
async def test_a_runtime_directory_another_user_owns_is_not_used(runtime):
    if os.getuid() != 0:
        pytest.skip("needs root to give the directory away")
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    server = make_server("careful")
    loopwatch.instrument(server, log_blocks=False)
    async with Client(server) as client:
        await client.call_tool("ping", {})
        fallback = Path(os.environ["XDG_CACHE_HOME"]) / "loopwatch" / "run"
        [path] = await wait_for_sockets(fallback, 1)
        assert list(runtime.iterdir()) == []
        assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700
        poller = Poller()
        try:
            servers = poller.poll()  # readers look in every candidate directory
        finally:
            poller.close()
        assert [s.name for s in servers if s.path == path] == ["careful"]


@asyncio_only
async def test_report_reads_a_running_servers_blocks_from_its_announcement(runtime, tmp_path, capsys):
    from loopwatch import cli

    server = MCPServer("profiled")

    @server.tool()
    async def nap() -> str:
        time.sleep(0.3)
        return "ok"

    handle = loopwatch.instrument(server, log_blocks=False, offload="off")
    async with Client(server) as client:
        await client.call_tool("nap", {})
        await handle.monitor.settle()
        await wait_for_sockets(runtime, 1)
        out = tmp_path / "live.folded"
        code = await anyio.to_thread.run_sync(cli.main, ["report", "--server", "profiled", "--folded", str(out)])
        missing = await anyio.to_thread.run_sync(cli.main, ["report", "--server", "nobody"])
    printed = capsys.readouterr()
    assert code == 0 and "tools/call nap: 1 block" in printed.out and f"profiled (pid {os.getpid()})" in printed.out
    assert out.read_text().startswith("tools/call nap;")
    assert missing == 2 and "no watched server named or numbered 'nobody'" in printed.err


@asyncio_only
async def test_a_runtime_directory_too_long_for_a_socket_path_is_passed_over(runtime, monkeypatch):
    deep = Path(os.environ["XDG_RUNTIME_DIR"]) / ("d" * 90)
    deep.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    server = make_server("deep")
    loopwatch.instrument(server, log_blocks=False)
    async with Client(server) as client:
        await client.call_tool("ping", {})
        fallback = Path(os.environ["XDG_CACHE_HOME"]) / "loopwatch" / "run"
        [path] = await wait_for_sockets(fallback, 1)
        assert (await anyio.to_thread.run_sync(ask, path))["name"] == "deep"


@asyncio_only
async def test_another_user_cannot_reach_the_socket(runtime):
    if os.getuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    import subprocess

    python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
    if python is None:
        pytest.skip("no system python3 another user may run")

    server = make_server("private")
    loopwatch.instrument(server, log_blocks=False)
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\nelse:\n    print('connected')\n"
    )
    async with Client(server) as client:
        await client.call_tool("ping", {})
        [path] = await wait_for_sockets(runtime, 1)
        other = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [python, "-c", probe, str(path)], capture_output=True, text=True, timeout=30,
            user=65534, group=65534, extra_groups=[],
        ))
    assert other.stdout.strip() == "refused", other.stderr
