"""`loopwatch run [OPTIONS] -- COMMAND [ARGS...]`: a server run as its client's config launches it, watched by
the start-up hook, driven by a real MCP client over stdio in both protocol eras."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import pytest

from e2e.launching import LOOPWATCH, SH, run, session_answers, stdio, wrapped

from helpers import FIXTURES, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVER = FIXTURES / "launched_server.py"
BLOCKING_LINE = next(n for n, line in enumerate(SERVER.read_text().splitlines(), 1) if "# the blocking line" in line)
PY = sys.executable


@pytest.fixture
def anyio_backend():
    return "asyncio"


def server_command(*flags: str) -> list[str]:
    return [PY, str(SERVER), *flags]


def wait_for_events(path, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        events = read_events(path)
        if predicate(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_file_server_run_by_its_main_answers_as_bare_and_its_blocking_tool_is_found_with_kind_and_line(
    tmp_path, mode
):
    events = tmp_path / "events.jsonl"
    calls = [("ping", {"n": 1}), ("lookup", {"sku": "a-1"}), ("ping", {"n": 2})]
    flags = ["--name", "inventory", "--delay", "0.3", "--log-level", "INFO"]
    with anyio.fail_after(90):
        bare = await session_answers(stdio(server_command(*flags), tmp_path / "bare.err"), mode, calls)
        watched_params = stdio(wrapped(server_command(*flags), "--events", str(events), "--offload", "off"),
                               tmp_path / "watched.err")
        watched = await session_answers(watched_params, mode, calls)
    assert watched == bare
    assert watched["answers"][1]["content"][0]["text"] == "a-1: 3 in stock"
    found = wait_for_events(events, lambda es: any(e.get("tool") == "lookup" for e in es))
    [block] = [e for e in found if e["event"] == "loop_blocked" and e["tool"] == "lookup"]
    assert (block["tool"], block["kind"]) == ("lookup", "wait")
    assert block["culprit"]["line"] == BLOCKING_LINE and block["culprit"]["file"].endswith("launched_server.py")
    assert block["server"] == "inventory" and block["pid"] > 0
    err = (tmp_path / "watched.err").read_text()
    assert "launched INFO serving inventory" in err  # the server's own logging set-up ran, at its level
    assert "watches server 'inventory'" in err and "watched nothing" not in err


async def test_the_command_is_exec_ed_its_pid_exit_code_and_stdout_are_the_commands_own(tmp_path):
    code = "import os, sys; print(os.getpid()); sys.stdout.flush(); sys.exit(3)"
    proc = subprocess.Popen(wrapped([PY, "-c", code]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert out.decode().split() == [str(proc.pid)]  # nothing but the command's bytes on stdout
    assert err.decode().count("watched nothing") == 1


async def test_a_signal_to_the_process_the_client_started_reaches_the_server(tmp_path):
    ready = tmp_path / "ready"
    code = f"import pathlib, time; pathlib.Path({str(ready)!r}).write_text('1'); time.sleep(60)"
    proc = subprocess.Popen(wrapped([PY, "-c", code]), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_a_process_that_creates_no_server_gets_no_thread_and_no_loopwatch_import():
    code = (
        "import sys, threading; import mcp.server.lowlevel.server, mcp.server.mcpserver; "
        "print(threading.active_count(), sorted(m for m in sys.modules if m.split('.')[0] == 'loopwatch'))"
    )
    done = run(wrapped([PY, "-c", code]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split(maxsplit=1) == ["1", "[]\n"]


def test_the_hook_leaves_a_watched_python_with_its_own_sitecustomize_running(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    code = (
        "import os, sitecustomize; from mcp.server.mcpserver import MCPServer; MCPServer('x'); "
        "print(os.environ.get('OWN_SITECUSTOMIZE'), sitecustomize.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(own)}
    done = run(wrapped([PY, "-c", code]), env=env)
    assert done.returncode == 0, done.stderr
    ran, where = done.stdout.decode().split()
    assert ran == "ran" and where == str(own / "sitecustomize.py")
    assert b"watches server 'x'" in done.stderr and b"watched nothing" not in done.stderr


def test_several_servers_each_watched_the_metrics_port_taken_by_the_first_and_the_others_say_so(tmp_path):
    from helpers import free_port

    port = free_port()
    code = (
        "from mcp.server.mcpserver import MCPServer; from mcp.server.lowlevel import Server; "
        "from fastmcp import FastMCP; a = MCPServer('first'); b = MCPServer('second'); c = Server('third'); "
        "d = FastMCP('fourth')"
    )
    done = run(wrapped([PY, "-c", code], "--metrics-port", str(port), "--offload", "off"))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    for name in ("first", "second", "third", "fourth"):  # the table's three families: each watched once
        assert err.count(f"watches server {name!r}") == 1
    assert err.count(f"serves Prometheus metrics on http://127.0.0.1:{port}/metrics") == 1
    assert err.count(f"cannot serve metrics on http://127.0.0.1:{port}/metrics") == 3
    assert "watched nothing" not in err


def test_a_server_in_a_child_process_is_watched_and_the_parent_does_not_say_it_watched_nothing(tmp_path):
    child = "from mcp.server.mcpserver import MCPServer; MCPServer('in-child')"
    code = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]))"
    done = run(wrapped([PY, "-c", code]))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "watches server 'in-child'" in err and "watched nothing" not in err


def test_a_command_that_is_not_found_is_one_line_and_exit_127():
    done = run([*LOOPWATCH, "run", "--", "no-such-mcp-server-xyz", "--flag"])
    assert done.returncode == 127
    assert done.stderr.decode().strip().splitlines() == ["loopwatch: no-such-mcp-server-xyz: command not found"]
    assert done.stdout == b""


NOTHING = "started no Python MCP server; nothing was watched"


def test_a_command_that_starts_no_python_says_so_once_at_its_exit_on_stderr_only():
    done = run(wrapped(["/bin/true"]))
    assert done.returncode == 0 and done.stdout == b""
    assert done.stderr.decode().splitlines() == [f"loopwatch: /bin/true {NOTHING}"]


def test_a_client_that_ignores_sigchld_still_gets_the_command_run_and_the_line():
    """SIGCHLD ignored is inherited through exec: the launcher's wait for its helper fork then fails (ECHILD)."""
    ignore = lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # noqa: E731
    done = subprocess.run(wrapped(["sh", "-c", "exit 3"]), capture_output=True, timeout=60, preexec_fn=ignore)
    assert done.returncode == 3
    assert done.stderr.decode().splitlines() == [f"loopwatch: sh {NOTHING}"]


def test_a_script_that_execs_a_non_python_binary_says_so_and_its_stdout_and_exit_code_are_its_own(tmp_path):
    script = tmp_path / "serve.sh"
    script.write_text("#!/bin/sh\ncat\nexit 5\n")
    script.chmod(0o755)
    done = run(wrapped([str(script)]), stdin=b'{"jsonrpc": "2.0"}\n')
    assert done.returncode == 5
    assert done.stdout == b'{"jsonrpc": "2.0"}\n'  # the protocol's bytes, nothing of loopwatch's
    assert done.stderr.decode().splitlines() == [f"loopwatch: {script} {NOTHING}"]


def test_a_python_server_that_starts_late_is_not_nothing():
    late = "from mcp.server.mcpserver import MCPServer; MCPServer('late')"
    done = run(wrapped(["sh", "-c", f'sleep 1; exec {PY} -c "{late}"']))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "watches server 'late'" in err and NOTHING not in err and "watched nothing" not in err


def launcher_processes(token: str) -> list[int]:
    """Live processes whose command line carries `token` (zombies are gone already, not counted)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_the_watcher_of_a_non_python_command_lives_as_long_as_it_and_no_longer():
    token = f"lw-token-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        wrapped(["sh", "-c", 'echo up; read line; echo "$line"', token]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 30
        while len(launcher_processes(token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        [watcher] = [pid for pid in launcher_processes(token) if pid != proc.pid]
    finally:
        out, err = proc.communicate(b"bye\n", timeout=60)
    assert out == b"bye\n" and err.decode().splitlines() == [f"loopwatch: sh {NOTHING}"]
    assert watcher not in launcher_processes(token)  # it said its line and ended: stderr's end came after it


def test_the_watcher_of_a_python_command_is_gone_once_the_python_started(tmp_path):
    """The watcher is a fork of the launcher (its command line): it ends when the command's Python starts,
    not at the command's end, and the command's process is the only one left carrying the launcher's line."""
    token = f"lw-token-{os.getpid()}-{time.monotonic_ns()}"
    code = "import sys; sys.stdout.write('up\\n'); sys.stdout.flush(); sys.stdin.read()"
    proc = subprocess.Popen(
        wrapped([PY, "-c", code, token]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 30
        while launcher_processes(token) != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher_processes(token) == [proc.pid]
    finally:
        out, err = proc.communicate(b"", timeout=60)
    assert proc.returncode == 0 and NOTHING not in err.decode()


def test_an_unknown_loopwatch_option_before_the_separator_is_usage_and_exit_2():
    done = run([*LOOPWATCH, "run", "--no-such-option", "--", PY, "-c", "print(1)"])
    assert done.returncode == 2 and done.stdout == b""
    err = done.stderr.decode()
    assert err.startswith("usage: loopwatch run") and "--no-such-option" in err


def test_a_serving_option_of_run_target_is_refused_under_the_separator():
    done = run([*LOOPWATCH, "run", "--transport", "sse", "--", PY, "-c", "print(1)"])
    assert done.returncode == 2 and done.stdout == b""
    assert "--transport: for TARGET only" in done.stderr.decode()


def test_help_shows_the_command_form_and_the_client_config_line():
    done = run([*LOOPWATCH, "run", "--help"])
    out = done.stdout.decode()
    assert done.returncode == 0
    assert "loopwatch run [OPTIONS] -- COMMAND [ARGS...]" in out
    assert '"args": ["run", "--", "mcp-server-git", "--repository", "."]' in out


def test_a_bad_option_is_refused_before_the_command_runs(tmp_path):
    marker = tmp_path / "ran"
    done = run(wrapped([PY, "-c", f"open({str(marker)!r}, 'w')"], "--threshold", "-1"))
    assert done.returncode == 2 and not marker.exists()


async def test_options_reach_the_server_policy_always_moves_a_tool_registered_after_the_server_was_made(tmp_path):
    events = tmp_path / "events.jsonl"
    params = stdio(wrapped(server_command("--delay", "0.2"), "--events", str(events), "--offload-policy",
                           "lookup=always"), tmp_path / "err")
    with anyio.fail_after(60):
        got = await session_answers(params, "legacy", [("lookup", {"sku": "b"})])
    assert got["answers"][0]["content"][0]["text"] == "b: 3 in stock"
    found = wait_for_events(events, lambda es: any(e["event"] == "offloaded" for e in es))
    assert [(e["event"], e["tool"], e["server"]) for e in found if e["event"] == "offloaded"] == [
        ("offloaded", "lookup", "launched")
    ]
    assert not [e for e in found if e["event"] == "loop_blocked" and e["tool"] == "lookup"]  # it ran off the loop


# -- loopwatch run TARGET: clearer errors --------------------------------------------------------------------


def target_error(tmp_path, source: str, suffix: str = "") -> tuple[int, str, bytes]:
    path = tmp_path / "target_server.py"
    path.write_text(source)
    done = run([*LOOPWATCH, "run", f"{path}{suffix}"], stdin=b"")
    return done.returncode, done.stderr.decode(), done.stdout


def test_a_factory_with_required_arguments_names_them_and_points_to_the_separator(tmp_path):
    code, err, out = target_error(tmp_path, (
        "from mcp.server.mcpserver import MCPServer\n"
        "def create_server(repository, read_only=False):\n    return MCPServer('x')\n"
    ), ":create_server")
    assert code == 2 and out == b""
    assert "create_server() needs arguments (repository)" in err
    assert "loopwatch run -- python " in err


def test_a_main_function_is_refused_never_called_with_loopwatchs_argv(tmp_path):
    code, err, out = target_error(tmp_path, (
        "import argparse, pathlib\n"
        "def main():\n    argparse.ArgumentParser().parse_args()\n    pathlib.Path('CALLED').write_text('1')\n"
    ), ":main")
    assert code == 2 and out == b""
    assert "main(), not a server" in err and "loopwatch run -- python" in err
    assert "usage:" not in err


def test_a_factory_that_exits_is_a_clear_error_and_never_sees_loopwatchs_argv(tmp_path):
    code, err, out = target_error(tmp_path, (
        "import sys\n"
        "def server():\n    print(sys.argv, file=sys.stderr)\n    sys.exit('server: missing --config')\n"
    ))
    assert code == 2 and out == b""
    assert "server() exited (server: missing --config): a program's main(), not a server factory" in err
    assert "'--threshold'" not in err and "'run'" not in err  # it saw its own path only


def test_a_target_whose_import_starts_serving_is_stopped_before_it_serves(tmp_path):
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    path = tmp_path / "serves_on_import.py"
    path.write_text(
        "import asyncio\nfrom mcp.server.mcpserver import MCPServer\n"
        "server = MCPServer('eager')\nasyncio.run(server.run_stdio_async())\n"
    )
    done = run([*LOOPWATCH, "run", str(path)], stdin=(init + "\n").encode())
    assert done.returncode == 2
    assert done.stdout == b""  # it never answered, unwatched
    err = done.stderr.decode()
    assert "starts serving" in err and f"loopwatch run -- python {path}" in err


def converse(command: list[str], calls: list[tuple[str, dict]], timeout: float = 90.0) -> tuple[int, list[bytes], bytes]:
    """A legacy-era client on raw pipes: initialize, then each tools/call after the previous answer, then EOF.
    Returns the exit code, the lines the server wrote on stdout, and its stderr."""
    import threading

    requests = [{"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": name, "arguments": args}}
                for n, (name, args) in enumerate(calls, 1)]
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[bytes] = []
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        for message in [init, {"jsonrpc": "2.0", "method": "notifications/initialized"}, *requests]:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
            if "id" in message:
                lines.append(proc.stdout.readline())
        proc.stdin.close()
        lines.extend(proc.stdout.read().splitlines(keepends=True))  # anything after: must be nothing
        code = proc.wait()
    finally:
        timer.cancel()
    return code, lines, b"".join(err)


def test_stdout_is_the_bare_servers_bytes_and_the_exit_code_its_own_after_a_tool_moved_off_the_loop(tmp_path):
    # the first lookup blocks and moves the tool (offload auto, one strike); the second runs on a worker loop;
    # then the client closes stdin, and the server ends as it does bare
    calls = [("lookup", {"sku": "a"}), ("lookup", {"sku": "b"}), ("ping", {"n": 1})]
    bare = converse(server_command("--delay", "0.2"), calls)
    watched = converse(wrapped(server_command("--delay", "0.2"), "--events", str(tmp_path / "ev.jsonl")), calls)
    assert watched[0] == bare[0] == 0, watched[2]
    assert watched[1] == bare[1] and len(bare[1]) == 4  # byte for byte, and nothing more
    kinds = [e["event"] for e in read_events(tmp_path / "ev.jsonl") if e["tool"] == "lookup"]
    assert kinds.count("loop_blocked") == 1 and kinds.count("offloaded") == 1


async def test_a_launched_stdio_server_announces_itself_as_stdio(tmp_path):
    """The SDK's stdio transport moves fd 0 off the wire while it serves: the announcement must still say stdio
    (it said http for mcp-server-time, whose modules load uvicorn)."""
    runtime = tempfile.mkdtemp(prefix="lw", dir="/tmp")
    os.chmod(runtime, 0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    params = stdio(wrapped(server_command("--name", "announced")), tmp_path / "watched.err", env=env)
    listed = {}

    def ask() -> None:
        from loopwatch import _announce

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not listed:
            for path in _announce.sockets([Path(runtime) / "loopwatch"]):
                with _announce.Link(path, timeout=5) as link:
                    listed.update(link.ask(op="state"))
            time.sleep(0.05)

    with anyio.fail_after(60):
        await session_answers(params, "legacy", [("ping", {"n": 1})], during=ask)
    assert listed["name"] == "announced" and listed["transport"] == "stdio"


@pytest.mark.parametrize(("flags", "says"), [
    (["--events", "/nonexistent/dir/events.jsonl"], "--events /nonexistent/dir/events.jsonl: cannot append events"),
    (["--offload-state", "/nonexistent/dir/state.json"], "--offload-state /nonexistent/dir/state.json: the folder"),
    (["--monitor", "--monitor-host", "10.1.2.3"], "monitor_host '10.1.2.3' is not a loopback address"),
])
def test_an_option_run_target_refuses_is_refused_before_the_command_runs_with_the_same_line(tmp_path, flags, says):
    marker = tmp_path / "ran"
    launched = run(wrapped([PY, "-c", f"open({str(marker)!r}, 'w')"], *flags))
    target = run([*LOOPWATCH, "run", *flags, str(FIXTURES / "inventory_server.py")])
    assert (launched.returncode, target.returncode) == (2, 2) and not marker.exists()
    [line] = launched.stderr.decode().splitlines()
    assert line.startswith(f"loopwatch: {says}") and launched.stderr == target.stderr
    assert launched.stdout == b""


def test_a_server_made_but_not_watched_says_so_once_and_never_that_it_created_none():
    """An option only the command's process can find bad (here the command sets a variable itself)."""
    code = "from mcp.server.mcpserver import MCPServer; MCPServer('calculator')"
    command = [SH, "-c", 'LOOPWATCH_EVENTS=/nonexistent/dir/x.jsonl exec "$0" "$@"', PY, "-c", code]
    done = run(wrapped(command))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    [line] = [line for line in err.splitlines() if "loopwatch" in line]
    assert "cannot watch server 'calculator': --events /nonexistent/dir/x.jsonl" in line and "unwatched" in line
    assert "loopwatch ERROR loopwatch" not in line
