"""Hardening (issue 21): what clients choose stays bounded and inert in every table and report; the events
file stays whole JSON lines and bounded; state files and paths fail clearly; watching stops when asked.

Each test here failed on the code before the fix it checks.
"""

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

import loopwatch
from loopwatch._blame import CallRecord
from loopwatch._events import BlockEvent, Frame, JsonLinesWriter

from helpers import fresh

pytestmark = pytest.mark.anyio

EVIL_ID = "7\n2026-12-01 00:00:00,000 loopwatch WARNING forged line\x1b[2J\x1b]0;owned\x07" + "x" * 1_000_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def raw(client, method, params):
    try:
        return ("result", await client.session._dispatcher.send_raw_request(method, params))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


# -- 1. client-chosen strings in tables ------------------------------------------------------------------


async def test_distinct_huge_method_names_are_kept_cut_so_the_table_stays_small(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload="off")
    async with Client(server) as client:
        for i in range(40):
            await raw(client, f"no/such/{i}/" + "m" * 250_000, {})
    methods = handle.snapshot()["methods"]
    assert len(methods) >= 40  # each had a row of its own (under max_tools)
    assert max(map(len, methods)) <= 200
    assert len(json.dumps(handle.snapshot())) < 64 * 1024
    handle.uninstrument()


def test_every_client_chosen_string_of_a_call_record_is_cut_and_escaped():
    class Headers(dict):
        pass

    class Ctx:
        request = type("Request", (), {"headers": Headers({"mcp-session-id": "s\x1b[31m" + "s" * 100_000})})()

    call = CallRecord("no/such\n" + "m" * 100_000, None, EVIL_ID, Ctx())
    for text in (call.method, call.request_id, call.session_id()):
        assert len(text) <= 4 * 200 and text.isprintable(), text[:80]
    assert call.request_id.startswith("7\\x0a2026-12-01")
    assert CallRecord("ping", None, 12, None).request_id == 12  # ints as they were (no cost on the common path)


# -- 2. request ids in every report ----------------------------------------------------------------------


def test_the_console_line_and_the_span_attributes_carry_a_cut_escaped_id():
    from loopwatch.aiomonitor import describe_call
    from loopwatch.otel import request_attributes

    class Ctx:
        method = "tools/call"
        request_id = EVIL_ID
        params = {"name": "lookup\x1b[31m" + "n" * 100_000, "arguments": {}}

    line = describe_call(CallRecord("tools/call", "lookup", EVIL_ID, Ctx()))
    assert line.isprintable() and len(line) < 1024
    attributes = request_attributes(Ctx())
    for key in ("jsonrpc.request.id", "gen_ai.tool.name"):
        assert attributes[key].isprintable() and len(attributes[key]) < 1024, key


async def test_a_block_under_a_hostile_request_id_is_reported_on_one_bounded_printable_line(
    anyio_backend, caplog, tmp_path
):
    """In memory the client picks the ids, so the id goes in as the SDK hands it over: through the request
    context the middleware reads (the same object a stdio or HTTP request reaches it with)."""
    server = fresh("inventory_server", "mcp")
    events = tmp_path / "events.jsonl"
    handle = loopwatch.instrument(server, threshold=0.05, traces=False, offload="off", events=str(events))

    async def evil_ids(ctx, call_next):
        ctx.request_id = EVIL_ID
        return await call_next(ctx)

    chain = handle._lowlevel.middleware
    chain.insert(chain.index(handle.middleware), evil_ids)
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        async with Client(server) as client:
            await client.call_tool("lookup", {"sku": "A"})
            await handle.monitor.settle()
    [event] = [e for e in handle.monitor.recent if isinstance(e, loopwatch.BlockEvent) and e.tool == "lookup"]
    assert event.request_id.startswith("7\\x0a") and len(event.request_id) < 1024
    ours = [r.getMessage() for r in caplog.records if r.name == "loopwatch" and "loop blocked" in r.getMessage()]
    assert ours and all("\n" not in m and "\x1b" not in m and len(m) < 2048 for m in ours)
    lines = events.read_text().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 8 * 1024
    assert json.loads(lines[0])["request_id"] == event.request_id
    assert len(json.dumps(handle.snapshot())) < 64 * 1024
    handle.uninstrument()


# -- 3. a full disk: whole JSON lines ---------------------------------------------------------------------

FRAMES = tuple(Frame(f"/srv/app/module_{i}.py", 10 + i, f"step_{i}") for i in range(20))


def block(n, **overrides):
    fields = dict(time=1700000000.0 + n, duration_s=0.3, kind="wait", tool="lookup", method="tools/call",
                  request_id=str(n), session_id=None, cpu_s=0.01, samples=20, frames=FRAMES, culprit=FRAMES[0])
    fields.update(overrides)
    return BlockEvent(**fields)


def line_length(event):
    """The bytes one event takes in an events file (with the pid every line carries)."""
    return len(json.dumps({**event.to_dict(), "pid": os.getpid()}, separators=(",", ":"))) + 1


def assert_whole_lines(path):
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-80:]
    return [json.loads(line)["request_id"] for line in data.splitlines()]


def fill_until_refused(writer, path, caplog):
    """Events until the disk refuses one; the numbers of those written."""
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        for n in range(10_000):
            writer(block(n))
            if "cannot write events" in caplog.text:
                return n
    raise AssertionError("the disk never filled")


@contextlib.contextmanager
def small_tmpfs(tmp_path, size="64k"):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_on_a_real_full_filesystem_every_line_stays_whole_json_and_writing_resumes_after(tmp_path, caplog):
    with small_tmpfs(tmp_path) as mount:
        filler = mount / "filler"
        filler.write_bytes(b"f" * 16384)
        path = mount / "events.jsonl"
        writer = JsonLinesWriter(str(path), max_bytes=0)
        refused = fill_until_refused(writer, path, caplog)
        written = assert_whole_lines(path)
        assert written == [str(n) for n in range(refused)]  # each whole, none glued, none lost before the full disk
        filler.unlink()  # space again
        with caplog.at_level(logging.WARNING, logger="loopwatch"):
            writer(block(99_999))
        assert assert_whole_lines(path) == [*written, "99999"]
        assert "writes events to" in caplog.text


FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is cut short (then EFBIG), as on a full disk
from loopwatch._events import JsonLinesWriter
sys.path.insert(0, sys.argv[2])
from test_hardening import block
limit = int(sys.argv[3])
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
writer = JsonLinesWriter(sys.argv[1], max_bytes=0)
for n in range(40):
    writer(block(n))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit * 4, hard))  # room again
writer(block(99999))
"""


def test_a_write_cut_short_by_the_file_size_limit_is_truncated_back_to_the_last_whole_line(tmp_path):
    path = tmp_path / "events.jsonl"
    line = line_length(block(0))
    limit = line * 5 + line // 2  # the sixth event is cut in the middle
    subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(path), str(Path(__file__).parent), str(limit)],
                   check=True, timeout=60, capture_output=True)
    assert assert_whole_lines(path) == ["0", "1", "2", "3", "4", "99999"]


def test_a_half_line_left_at_the_end_of_the_file_is_cut_before_the_next_event(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"request_id": "old"}) + "\n" + '{"request_id": "half')
    JsonLinesWriter(str(path))(block(1))
    assert assert_whole_lines(path) == ["old", "1"]


def test_a_pipe_is_still_an_events_file_it_appends_to_without_seeking(tmp_path):
    import os

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        JsonLinesWriter(str(fifo))(block(5))
        assert json.loads(os.read(reader, 65536))["request_id"] == "5"
    finally:
        os.close(reader)


# -- 4. rotation -----------------------------------------------------------------------------------------


def test_the_events_file_rotates_past_its_size_and_keeps_the_backups_asked_for(tmp_path):
    path = tmp_path / "events.jsonl"
    line = line_length(block(0))
    writer = JsonLinesWriter(str(path), max_bytes=line * 4, backups=2)
    for n in range(30):
        writer(block(n))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    kept = [assert_whole_lines(tmp_path / name) for name in ("events.jsonl.2", "events.jsonl.1", "events.jsonl")]
    assert all(0 < (tmp_path / name).stat().st_size <= line * 4 for name in files)
    assert sum(kept, []) == [str(n) for n in range(30 - len(sum(kept, [])), 30)]  # the newest, in order


def test_with_no_backups_the_full_events_file_starts_over(tmp_path):
    path = tmp_path / "events.jsonl"
    line = line_length(block(0))
    writer = JsonLinesWriter(str(path), max_bytes=line * 3, backups=0)
    for n in range(10):
        writer(block(n))
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]
    assert assert_whole_lines(path) == ["9"]


def test_external_rotation_by_rename_or_delete_starts_a_new_file(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(str(path))
    writer(block(1))
    path.rename(tmp_path / "events.jsonl.old")  # logrotate
    writer(block(2))
    path.unlink()
    writer(block(3))
    assert assert_whole_lines(tmp_path / "events.jsonl.old") == ["1"]
    assert assert_whole_lines(path) == ["3"]


def test_rotation_options_are_checked_and_offered_on_the_command_line():
    from loopwatch._options import OptionError, Options
    from loopwatch.cli import build_parser

    defaults = Options()
    assert defaults.events_max_bytes == 50_000_000 and defaults.events_backups == 3
    for bad in ({"events_max_bytes": -1}, {"events_backups": 1.5}, {"events_max_bytes": True}):
        with pytest.raises(OptionError):
            Options.build(**bad)
    args = build_parser().parse_args(["run", "x.py", "--events-max-bytes", "10MiB", "--events-backups", "0"])
    assert (args.events_max_bytes, args.events_backups) == (10 * 1024 * 1024, 0)


# -- 5. relative paths, resolved once --------------------------------------------------------------------


async def test_relative_events_and_state_paths_are_resolved_once_when_watching_starts(anyio_backend, tmp_path,
                                                                                     monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False,
                                  events="events.jsonl", offload_state="state.json")
    monkeypatch.chdir(elsewhere)  # as a server may, after start-up
    async with Client(server) as client:
        await client.call_tool("lookup", {"sku": "A"})
        await handle.monitor.settle()
    handle.uninstrument()
    assert list(elsewhere.iterdir()) == []
    assert '"tool":"lookup"' in (home / "events.jsonl").read_text()
    assert "lookup" in json.loads((home / "state.json").read_text())["offloaded"]


# -- 6. the offload state file ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", ['{"offloaded": null}', '{"offloaded": "lookup"}', '{"offloaded": ["lookup"]}',
                                     '"lookup"', '["lookup"]', '{"offloaded": {"lookup": 1}}',
                                     "not json\n\x1b[2J"])
def test_a_state_file_of_the_wrong_shape_is_one_clear_line_and_a_fresh_start(tmp_path, caplog, content):
    state = tmp_path / "state.json"
    state.write_text(content)
    server = fresh("inventory_server", "mcp")
    with caplog.at_level(logging.INFO, logger="loopwatch"):
        handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload_state=str(state))
    try:
        lines = [r.getMessage() for r in caplog.records if "offload state" in r.getMessage()]
        if content.startswith('{"offloaded": {"lookup": 1}'):  # right shape, odd reason: still used
            assert handle.offload.offloaded == {"lookup": "learned earlier: "} and not lines
            return
        assert handle.offload.offloaded == {}
        assert len(lines) == 1 and "starting fresh" in lines[0] and lines[0].isprintable(), lines
    finally:
        handle.uninstrument()


def test_a_state_file_in_a_missing_folder_is_refused_at_start_and_the_server_is_left_as_it_was(tmp_path):
    from loopwatch._options import OptionError

    server = fresh("inventory_server", "mcp")
    chain = list(server._lowlevel_server.middleware)
    with pytest.raises(OptionError, match="missing"):
        loopwatch.instrument(server, offload_state=str(tmp_path / "missing" / "state.json"))
    assert server._lowlevel_server.middleware == chain and loopwatch.mcp.handle_of(server) is None


def test_a_save_that_fails_leaves_no_temporary_file_behind(tmp_path, caplog):
    state = tmp_path / "state.json"
    state.mkdir()  # the state path is a folder: every save fails at the rename
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload_state=str(state))
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        handle.set_tool_policy("lookup", "always")
        handle.set_tool_policy("checksum", "always")
    handle.uninstrument()
    assert "cannot write offload state" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_reason_a_tool_was_learned_does_not_grow_with_each_restart(tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"offloaded": {"lookup": "learned earlier: learned earlier: blocked 300 ms"}}))
    for _ in range(3):
        server = fresh("inventory_server", "mcp")
        handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload_state=str(state))
        assert handle.offload.offloaded == {"lookup": "learned earlier: blocked 300 ms"}
        handle.uninstrument()
    assert json.loads(state.read_text())["offloaded"] == {"lookup": "learned earlier: blocked 300 ms"}


# -- 10. aiomonitor's web UI -----------------------------------------------------------------------------


def listening(port):
    """Whether anything accepts connections on 127.0.0.1:`port`."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def console_running(webui, **options):
    from helpers import free_port

    port = free_port(3)
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, monitor=True, monitor_port=port,
                                  monitor_webui=webui, **options)
    return server, handle, port


def http(port, method, path, headers):
    """A real HTTP request carrying the Host (and Origin) given: the status code of the answer."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=b"{}" if method != "GET" else None, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")  # aiomonitor's own web UI
async def test_the_console_serves_no_web_ui_unless_asked_for(anyio_backend):
    server, handle, port = await console_running(webui=False)
    try:
        async with Client(server) as client:
            console = next(e for e in handle.extensions if type(e).__name__ == "ConsoleIntegration").console
            assert await anyio.to_thread.run_sync(console.wait_started, 30)
            assert (await client.call_tool("ping", {"n": 1})).structured_content == {"result": 1}
            assert listening(port) and not listening(port + 1)
    finally:
        handle.uninstrument()


@pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")
async def test_the_web_ui_when_asked_for_refuses_a_foreign_host_or_origin(anyio_backend):
    server, handle, port = await console_running(webui=True)
    web = port + 1
    try:
        async with Client(server) as client:
            console = next(e for e in handle.extensions if type(e).__name__ == "ConsoleIntegration").console
            assert await anyio.to_thread.run_sync(console.wait_started, 30)
            ask = functools.partial(anyio.to_thread.run_sync, http)
            assert await ask(web, "GET", "/api/version", {"Host": f"127.0.0.1:{web}"}) == 200
            assert await ask(web, "GET", "/", {"Host": f"rebound.example:{web}"}) == 421  # a DNS-rebinding page
            assert await ask(web, "DELETE", "/api/task", {"Host": f"rebound.example:{web}"}) == 421
            assert await ask(web, "POST", "/api/live-tasks",
                             {"Host": f"127.0.0.1:{web}", "Origin": "http://rebound.example"}) == 403
            assert (await client.call_tool("ping", {"n": 2})).structured_content == {"result": 2}
    finally:
        handle.uninstrument()


def test_the_web_ui_option_is_offered_on_the_command_line():
    from loopwatch.cli import build_parser, run_options

    assert loopwatch.Options().monitor_webui is False
    assert run_options(build_parser().parse_args(["run", "x.py"]))["monitor_webui"] is False
    assert run_options(build_parser().parse_args(["run", "x.py", "--monitor-webui"]))["monitor_webui"] is True


# -- 17. the loop thread's CPU counter --------------------------------------------------------------------


async def test_the_loop_cpu_counter_counts_from_the_start_of_a_short_watch(anyio_backend):
    from mcp.server.mcpserver import MCPServer
    from prometheus_client import CollectorRegistry

    server = MCPServer("short-lived")
    burned = []

    @server.tool()
    async def burn() -> str:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:  # CPU on the loop thread, right after start-up
            pass
        burned.append(time.thread_time() - start)
        return "done"

    registry = CollectorRegistry()
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload="off", metrics_registry=registry)
    async with Client(server) as client:
        await client.call_tool("burn", {})
    handle.uninstrument()
    counted = registry.get_sample_value("loopwatch_event_loop_thread_cpu_seconds_total")
    assert counted is not None and counted >= burned[0] * 0.9, (counted, burned)


# -- 6, 13: paths refused at start by `loopwatch run`, with the option and the path named ----------------------


def run_refused(capsys, *args):
    from loopwatch.cli import build_parser, run_command

    from helpers import FIXTURES

    code = run_command(build_parser().parse_args(["run", str(FIXTURES / "inventory_server.py"), *args]))
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, [line for line in captured.err.splitlines() if line.startswith("loopwatch:")]


def test_an_events_path_that_is_no_file_is_refused_naming_the_option_and_the_path(capsys):
    code, [line] = run_refused(capsys, "--events", "/proc/version")
    assert code == 2 and "--events /proc/version" in line and "Invalid argument" in line, line


def test_a_state_file_in_a_missing_folder_is_refused_by_the_command_with_exit_2(capsys, tmp_path):
    missing = tmp_path / "no-such-folder" / "state.json"
    code, [line] = run_refused(capsys, "--offload-state", str(missing))
    assert code == 2 and f"--offload-state {missing}" in line and "does not exist" in line, line


# -- 14: a console on ::1 -------------------------------------------------------------------------------------


def ipv6_loopback():
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("webui", [False, True])
@pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")
async def test_a_console_on_the_ipv6_loopback_is_checked_as_ipv6_and_listens_there(anyio_backend, webui):
    import socket

    server, handle, port = await console_running(webui=webui, monitor_host="::1")
    try:
        async with Client(server) as client:
            console = next(e for e in handle.extensions if type(e).__name__ == "ConsoleIntegration").console
            assert await anyio.to_thread.run_sync(console.wait_started, 30), console.error
            assert (await client.call_tool("ping", {"n": 3})).structured_content == {"result": 3}
            for listener in [port, port + 1] if webui else [port]:
                with socket.socket(socket.AF_INET6) as probe:
                    probe.settimeout(5)
                    assert probe.connect_ex(("::1", listener)) == 0, listener
                    if listener == port:
                        assert probe.recv(1)  # the telnet console speaks first (its option negotiation)
    finally:
        handle.uninstrument()


# -- 9. uninstrument() on a running server ---------------------------------------------------------------------


@pytest.mark.parametrize("on_the_loop", [False, True], ids=["from-a-thread", "on-the-loop"])
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_uninstrument_on_a_running_server_stops_watching_at_once(anyio_backend, tmp_path, caplog, on_the_loop):
    import threading

    server = fresh("inventory_server", "mcp")
    events = tmp_path / "events.jsonl"
    handle = loopwatch.instrument(server, threshold=0.05, traces=False, offload="off", events=str(events))
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        async with Client(server) as client:
            await client.call_tool("lookup", {"sku": "before"})
            await handle.monitor.settle()
            assert events.read_text().count('"tool":"lookup"') == 1
            if on_the_loop:
                handle.uninstrument()
            else:
                await anyio.to_thread.run_sync(handle.uninstrument)  # as a console or another thread may
            assert not handle.monitor.active
            assert not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog" and t.is_alive()]
            heartbeat = handle.monitor.heartbeat
            beats = heartbeat.beat[0]
            await client.call_tool("lookup", {"sku": "after"})  # blocks the loop 300 ms: nobody is watching
            await anyio.sleep(0.3)
            assert heartbeat.beat[0] - beats <= 1  # the sentinel stopped too
            assert (await client.call_tool("ping", {"n": 4})).structured_content == {"result": 4}
    assert events.read_text().count('"tool":"lookup"') == 1
    assert caplog.text.count("loop blocked") == 1


# -- 16. SIGINT in the middle of a call: the server's lifespan ends as the bare one does ---------------------


async def iterations_to_leave(lifespan) -> int:
    """Cancel a task inside `lifespan` as Ctrl-C cancels a server's main task: how many loop iterations its exit
    takes. Each one lets the SDK's stdio writer flush the `Connection closed` answer it was just handed for the
    call in flight before the transport is cancelled (the bare server: none, so it never writes it)."""
    import asyncio

    loop = asyncio.get_running_loop()
    ticks, marks, entered = [0], [], asyncio.Event()

    def tick():
        ticks[0] += 1
        ticking[0] = loop.call_soon(tick)

    async def serve():
        try:
            async with lifespan:
                entered.set()
                try:
                    await asyncio.sleep(3600)
                finally:
                    marks.append(ticks[0])
        finally:
            marks.append(ticks[0])

    task = loop.create_task(serve())
    with anyio.fail_after(30):
        await entered.wait()
    ticking = [loop.call_soon(tick)]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError), anyio.fail_after(30):
        await task
    ticking[0].cancel()
    assert len(marks) == 2, marks
    return marks[1] - marks[0]


@pytest.mark.parametrize("kind", ["lowlevel", "mcpserver", "fastmcp"])
@pytest.mark.parametrize("offload", ["auto", "off"])
async def test_a_watched_lifespan_cancelled_as_by_ctrl_c_leaves_in_as_many_loop_iterations_as_the_bare_one(
    kind, offload, anyio_backend
):
    server = {"lowlevel": lambda: fresh("low_server", "server"), "mcpserver": lambda: fresh("sleepy_server", "mcp"),
              "fastmcp": lambda: fresh("fm_server", "app")}[kind]()
    from loopwatch.mcp import lowlevel_server

    lowlevel = lowlevel_server(server)
    bare = await iterations_to_leave(lowlevel.lifespan(lowlevel))
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload=offload)
    try:
        watched = await iterations_to_leave(lowlevel.lifespan(lowlevel))
        with anyio.fail_after(30):  # the watch ends beside the unwinding, on its own
            while handle.monitor.active:
                await anyio.sleep(0.01)
    finally:
        handle.uninstrument()
    assert watched == bare
