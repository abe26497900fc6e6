"""Published servers from PyPI, installed in an environment of their own with loopwatch, run from their own
console scripts with their own flags under `loopwatch run -- ...`, driven over stdio by a real MCP client in
both protocol eras, against the same command run bare."""

import subprocess
import time
import urllib.request
from pathlib import Path

import anyio
import pytest
from venvs import venv_fixture

from e2e.launching import session_answers, stdio

from helpers import free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

GIT = "mcp-server-git==2026.10.19"
TIME = "mcp-server-time==2026.10.19"
published = venv_fixture("launch-published", [GIT, TIME], loopwatch="[prometheus]")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(path)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True, timeout=60)
    (path / "notes.txt").write_text("first\n")
    subprocess.run([*git, "add", "notes.txt"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "first note"], check=True, timeout=60)
    (path / "notes.txt").write_text("first\nsecond\n")
    return path


def git_calls(repo) -> list[tuple[str, dict]]:
    where = {"repo_path": str(repo)}
    return [("git_status", where), ("git_diff_unstaged", where), ("git_branch", {**where, "branch_type": "local"}),
            ("git_show", {**where, "revision": "no-such-rev"})]


def scrape(port: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def sample(text: str, name: str, tool: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'gen_ai_tool_name="{tool}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_server_git_from_its_console_script_answers_as_bare_with_metrics_and_events(
    published, repo, tmp_path, mode
):
    env = published.env()
    command = ["mcp-server-git", "--repository", str(repo), "-v"]
    port = free_port()
    events = tmp_path / "events.jsonl"
    loopwatch = [published.exe("loopwatch"), "run", "--metrics-port", str(port), "--events", str(events), "--"]
    calls = git_calls(repo)
    with anyio.fail_after(120):
        bare = await session_answers(stdio(command, tmp_path / "bare.err", env), mode, calls)
        watched = await session_answers(stdio([*loopwatch, *command], tmp_path / "watched.err", env), mode, calls,
                                        during=lambda: scrape(port))
    metrics = watched.pop("during")
    assert watched == bare
    assert "notes.txt" in watched["answers"][0]["content"][0]["text"] and watched["answers"][3]["is_error"] is True
    # its start-up ran as bare: `-v` set its log level to INFO and its --repository check logged the repository
    for run in ("bare", "watched"):
        assert f"Using repository at {repo}" in (tmp_path / f"{run}.err").read_text()
    assert "watches server 'mcp-git'" in (tmp_path / "watched.err").read_text()
    for tool in ("git_status", "git_diff_unstaged", "git_branch", "git_show"):
        assert sample(metrics, "mcp_server_operation_duration_seconds_count", tool) == 1.0, tool
    assert sample(metrics, "loopwatch_tool_offloaded", "git_status") == 0.0  # a `def` tool: the SDK's thread
    # Its tools are `def` functions the SDK runs in threads: none blocks its loop, and none is blamed.
    assert events.exists() and [e for e in read_events(events) if e.get("tool")] == []


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_server_time_with_its_timezone_flag_answers_as_bare(published, tmp_path, mode):
    env = published.env()
    command = ["mcp-server-time", "--local-timezone", "Europe/Paris"]
    calls = [("convert_time", {"source_timezone": "Europe/Paris", "time": "12:00", "target_timezone": "Asia/Tokyo"}),
             ("get_current_time", {"timezone": "Nowhere/Atlantis"})]
    with anyio.fail_after(120):
        bare = await session_answers(stdio(command, tmp_path / "bare.err", env), mode, calls)
        watched = await session_answers(
            stdio([published.exe("loopwatch"), "run", "--", *command], tmp_path / "watched.err", env), mode, calls
        )
    assert watched == bare
    assert watched["answers"][1]["is_error"] is True
    assert "Use 'Europe/Paris' as local timezone" in str(watched["tools"])  # its flag reached it
    assert "watches server 'mcp-time'" in (tmp_path / "watched.err").read_text()


def test_a_bad_flag_fails_the_same_way_watched_as_bare(published, tmp_path):
    env = published.env()
    cases = [["mcp-server-time", "--local-timezone", "Mars/Olympus"],
             ["mcp-server-git", "--repository", str(tmp_path / "missing")],
             ["mcp-server-git", "--no-such-flag"]]
    for command in cases:
        bare = subprocess.run(command, capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        watched = subprocess.run([published.exe("loopwatch"), "run", "--", *command], capture_output=True, env=env,
                                 timeout=60, stdin=subprocess.DEVNULL)
        assert bare.returncode != 0 and watched.returncode == bare.returncode, command
        assert watched.stdout == bare.stdout == b""
        theirs = [line for line in watched.stderr.decode().splitlines() if "loopwatch" not in line]
        assert theirs == bare.stderr.decode().splitlines(), command


def test_a_console_script_main_as_target_is_refused_with_the_command_to_run(published):
    done = subprocess.run([published.exe("loopwatch"), "run", "mcp_server_git:main"], capture_output=True,
                          env=published.env(), timeout=60, stdin=subprocess.DEVNULL)
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert "console script 'mcp-server-git'" in err and "loopwatch run -- mcp-server-git" in err


def test_a_factory_with_a_required_argument_as_target_names_it(published):
    done = subprocess.run([published.exe("loopwatch"), "run", "mcp_server_git.server:create_server"],
                          capture_output=True, env=published.env(), timeout=60, stdin=subprocess.DEVNULL)
    err = done.stderr.decode()
    assert done.returncode == 2
    assert "create_server() needs arguments (repository)" in err and "loopwatch run -- mcp-server-git" in err


@pytest.fixture(scope="module")
def alone(published, tmp_path_factory):
    """Another virtualenv, whose Python has no loopwatch (a `uvx` tool's, say): a bare venv that sees the
    published servers' packages through a .pth line. That folder's own .pth files are not read from there, so
    the editable loopwatch installed beside them is not importable."""
    import sys

    from venvs import Venv

    path = tmp_path_factory.mktemp("alone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    venv = Venv(path)
    site = subprocess.run([venv.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    theirs = subprocess.run([published.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(site) / "published.pth").write_text(theirs + "\n")
    return venv


async def test_a_server_whose_python_has_no_loopwatch_is_watched_by_the_launchers_copy(alone, tmp_path):
    import sys

    check = subprocess.run([alone.python, "-c", "import importlib.util as u; print(bool(u.find_spec('loopwatch')), "
                            "bool(u.find_spec('mcp_server_time')), bool(u.find_spec('aiomonitor')))"],
                           capture_output=True, text=True, timeout=60, env=alone.env())
    assert check.stdout.split() == ["False", "True", "False"], check.stderr
    events = tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "loopwatch", "run", "--monitor", "--events", str(events), "--",
               "python", "-m", "mcp_server_time", "--local-timezone", "Europe/Paris"]
    calls = [("get_current_time", {"timezone": "Europe/Paris"})]
    with anyio.fail_after(120):
        got = await session_answers(stdio(command, tmp_path / "err", alone.env()), "legacy", calls)
        bare = await session_answers(stdio(command[command.index("--") + 1:], tmp_path / "bare.err", alone.env()),
                                     "legacy", calls)
    assert got["tools"] == bare["tools"] and got["answers"][0]["is_error"] is False
    err = (tmp_path / "err").read_text().splitlines()
    missing = [line for line in err if "aiomonitor is not installed" in line]
    assert len(missing) == 1 and "loopwatch[monitor]" in missing[0] and alone.python in missing[0]
    assert any("watches server 'mcp-time'" in line for line in err)
    assert events.exists()  # the lent copy took the launcher's options
