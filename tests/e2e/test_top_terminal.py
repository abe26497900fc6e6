"""`loopwatch top` in a real terminal (tmux) against stdio servers that a real MCP client started under
`loopwatch run`; `loopwatch ls` and `top --once` against the same; a killed server's socket cleaned."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import jsonschema
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/tmux.sh installs it)"),
]
SERVER = FIXTURES / "stuck_server.py"
SCHEMA = Path(__file__).parent.parent / "speedscope-file-format.schema.json"
SLEEP_LINE = next(n for n, line in enumerate(SERVER.read_text().splitlines(), 1) if "must show" in line)
WHILE_LINE = SLEEP_LINE - 1


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def runtime():
    """XDG_RUNTIME_DIR of this test alone: the servers announce there and `top` reads only there."""
    root = tempfile.mkdtemp(prefix="lw-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def server_params(name, runtime):
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "loopwatch", "run", str(SERVER)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": runtime, "STUCK_SERVER_NAME": name},
    )


class Terminal:
    """A tmux session running one command: type with send-keys, read the screen with capture-pane."""

    def __init__(self, command, env, cwd, width=200, height=50):
        self.name = f"lwtop-{os.getpid()}-{time.monotonic_ns()}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        "-c", str(cwd), f"env {exports} {command}"], check=True)

    def screen(self):
        done = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return done.stdout

    def keys(self, *keys):
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def alive(self):
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)

    async def wait_for(self, check, timeout=30.0, what="the screen"):
        screen = ""
        with anyio.move_on_after(timeout):
            while True:
                screen = self.screen()
                if check(screen):
                    return screen
                await anyio.sleep(0.1)
        raise AssertionError(f"{what} never appeared; last screen:\n{screen}")


def table_rows(screen):
    """The server table's rows, by name, in screen order."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*name\s+pid\s+transport", line))
    rows = []
    for line in lines[start + 1:]:
        words = line.split()
        if len(words) < 4 or not words[1].isdigit():
            break
        rows.append((words[0], words[3]))
    return rows


def shows_beta_stuck(screen, where):
    """beta's panel above the table, with its call and line; beta first in the table and the others ok."""
    lines = screen.splitlines()
    stuck_at = [i for i, line in enumerate(lines) if line.lstrip().startswith("BLOCKED") and " beta (pid" in line]
    header_at = [i for i, line in enumerate(lines) if re.match(r"\s*name\s+pid\s+transport", line)]
    if not stuck_at or not header_at or stuck_at[0] > header_at[0] or "1 stuck" not in lines[0]:
        return False
    panel = "\n".join(lines[stuck_at[0]:header_at[0]])
    rows = table_rows(screen)
    return (
        "tools/call stall (request" in lines[stuck_at[0]] and where in panel and blocked_for(screen, "beta")
        and rows[:1] == [("beta", "BLOCKED")] and sorted(rows[1:]) == [("alpha", "ok"), ("gamma", "ok")]
    )


def blocked_for(screen, name):
    found = re.search(rf"BLOCKED\s+([\d.]+) (ms|s)\s+{name} \(pid", screen)
    if not found:
        return None
    return float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)


async def test_top_shows_the_stuck_server_first_with_its_call_and_line_while_it_is_stuck_then_recovers(runtime):
    release = Path(runtime) / "release"
    names = ("alpha", "beta", "gamma")
    python = sys.executable
    async with Client(server_params("alpha", runtime)) as alpha, Client(server_params("beta", runtime)) as beta, \
            Client(server_params("gamma", runtime)) as gamma:
        for client in (alpha, beta, gamma):
            await client.call_tool("ping", {})
        terminal = Terminal(f"{python} -m loopwatch top --interval 0.3", {"XDG_RUNTIME_DIR": runtime}, runtime)
        try:
            screen = await terminal.wait_for(lambda s: all(f" {n} " in s for n in names), what="three servers")
            assert "0 stuck" in screen
            async with anyio.create_task_group() as tg:
                result = {}

                async def stall():
                    result["text"] = (await beta.call_tool("stall", {"seconds": 60, "until": str(release)})).content[0].text

                tg.start_soon(stall)
                where = f"stuck_server.py:{SLEEP_LINE} in stall"
                # one whole screen (a capture can catch textual mid-redraw: every check is on one capture)
                screen = await terminal.wait_for(lambda s: shows_beta_stuck(s, where), what="beta stuck, first")
                first = blocked_for(screen, "beta")
                await terminal.wait_for(  # updated while it stays stuck: later, the same call and line
                    lambda s: shows_beta_stuck(s, where) and blocked_for(s, "beta") > first + 0.5,
                    what="the stuck time growing",
                )
                release.touch()
            assert result["text"] == "released"
            await terminal.wait_for(
                lambda s: "0 stuck" in s and "BLOCKED" not in s and sorted(table_rows(s)) == [
                    ("alpha", "ok"), ("beta", "ok"), ("gamma", "ok")],
                what="beta recovered",
            )

            terminal.keys("/")
            await terminal.wait_for(lambda s: "filter: part of a name" in s, what="the filter field")
            await anyio.sleep(0.3)  # focus moves to the field right after it shows
            terminal.keys("bet")
            screen = await terminal.wait_for(lambda s: [n for n, _ in table_rows(s)] == ["beta"], what="the filter")
            await terminal.wait_for(lambda s: "beta (pid" in s and "recent blocks" in s and "[wait] tools/call stall" in s,
                                    what="beta's detail with its block")
            terminal.keys("Enter")  # the filter stays, its field goes, the table has the keys again
            await terminal.wait_for(lambda s: "▔▔▔▔" not in s, what="the filter field closed")
            terminal.keys("w")  # beta's recent blocks, written as flame graphs in top's working directory
            written = lambda: sorted(Path(runtime).glob("loopwatch-beta-*"))  # noqa: E731
            await terminal.wait_for(lambda s: len(written()) == 2, what="beta's profile files")
            profile = next(p for p in written() if p.name.endswith(".speedscope.json"))
            await terminal.wait_for(lambda s: "blocked time written" in s, what="the notice of the files written")
            data = json.loads(profile.read_text())
            jsonschema.validate(data, json.loads(SCHEMA.read_text()))
            folded = profile.with_suffix("").with_suffix(".folded").read_text()
            assert f"stall (fixtures/stuck_server.py:{SLEEP_LINE})" in folded or \
                f"stall (fixtures/stuck_server.py:{WHILE_LINE})" in folded
            terminal.keys("Escape")
            await terminal.wait_for(lambda s: len(table_rows(s)) == 3, what="the filter cleared")
            terminal.keys("s")
            await terminal.wait_for(lambda s: "sort: lag" in s, what="the next sort order")
            terminal.keys("q")
            with anyio.fail_after(15):
                while terminal.alive():
                    await anyio.sleep(0.1)
        finally:
            terminal.close()


async def test_ls_and_top_once_list_the_servers_and_a_killed_servers_socket_is_removed(runtime):
    # the cache folder too: readers also look in ~/.cache/loopwatch/run, where servers without XDG_RUNTIME_DIR are
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime, "XDG_CACHE_HOME": os.path.join(runtime, "cache")}
    server = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env={**env, "STUCK_SERVER_NAME": "doomed"},
    )
    try:
        directory = Path(runtime) / "loopwatch"
        with anyio.fail_after(30):
            while not list(directory.glob("*.sock")):
                await anyio.sleep(0.05)
        [sock] = directory.glob("*.sock")
        assert sock.name.startswith(f"{server.pid}.")
        listed = subprocess.run([sys.executable, "-m", "loopwatch", "ls"], env=env, capture_output=True, text=True)
        assert listed.returncode == 0
        [row] = [line for line in listed.stdout.splitlines() if "doomed" in line]
        assert row.split()[:4] == [str(server.pid), "doomed", "stdio", "ok"]
        once = subprocess.run([sys.executable, "-m", "loopwatch", "top", "--once"], env=env, capture_output=True,
                              text=True)
        assert "1 server, 0 stuck" in once.stdout and "doomed" in once.stdout
        server.send_signal(signal.SIGSTOP)  # alive but answering nobody (as a native call holding the GIL)
        try:
            once = subprocess.run([sys.executable, "-m", "loopwatch", "top", "--once"], env=env,
                                  capture_output=True, text=True)
        finally:
            server.send_signal(signal.SIGCONT)
        assert "1 server, 1 stuck" in once.stdout
        assert f"NO ANSWER  ? (pid {server.pid}): no answer (TimeoutError)" in once.stdout
        assert sock.exists()  # a silent server is not a dead one: its socket stays
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert sock.exists()  # nobody removed it: the process had no chance
        listed = subprocess.run([sys.executable, "-m", "loopwatch", "ls"], env=env, capture_output=True, text=True)
        assert f"loopwatch: removed a stale announcement: {sock}" in listed.stderr  # stdout: the table only
        assert listed.stdout == "no watched servers\n"
        assert not sock.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
