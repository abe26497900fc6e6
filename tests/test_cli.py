"""`loopwatch run`: bad input gets one clear line and exit code 2; targets are found the way `mcp run` finds them."""

import re
import subprocess
import sys
import textwrap

import pytest

from loopwatch._target import TargetError, load_target, split_target
from loopwatch.cli import main

FIXTURES = __import__("helpers").FIXTURES


def run_cli(*args, env=None, timeout=60):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("does/not/exist.py", "no such file"),
        ("no_such_module_anywhere", "no such module"),
        (f"{FIXTURES}/legacy.py", "tried mcp, server, app"),
        (f"{FIXTURES}/inventory_server.py:nope", "tried nope"),
    ],
)
def test_a_target_that_cannot_be_used_is_one_line_and_exit_code_2(target, message):
    result = run_cli("run", target)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_target_that_fails_to_import_names_the_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_installed_package_xyz\n")
    result = run_cli("run", str(bad))
    assert result.returncode == 2
    assert "ModuleNotFoundError" in result.stderr and "not_installed_package_xyz" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("--debug", "run", str(bad))
    assert "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "-1"], "positive number of seconds"),
        (["--threshold", "soon"], "not a number"),
        (["--transport", "carrier-pigeon"], "invalid choice"),
        (["--port", "70000"], "0-65535"),
        (["--offload-workers", "0"], "--offload-workers: must be 1 or more, not 0"),
        (["--offload-strikes", "two"], "--offload-strikes: 'two' is not an integer"),
        (["--events-backups", "-1"], "--events-backups: must be 0 or more, not -1"),
    ],
)
def test_bad_option_values_are_refused_clearly(args, message):
    result = run_cli("run", f"{FIXTURES}/inventory_server.py", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_options_are_read_from_the_environment_and_checked_there_too():
    result = run_cli("run", f"{FIXTURES}/inventory_server.py", env={"LOOPWATCH_THRESHOLD": "-3"})
    assert result.returncode == 2
    assert "LOOPWATCH_THRESHOLD=-3" in result.stderr


def test_an_events_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    result = run_cli("run", f"{FIXTURES}/inventory_server.py", "--events", str(tmp_path / "no" / "dir" / "e.jsonl"))
    assert result.returncode == 2
    assert "No such file or directory" in result.stderr


def test_a_server_that_crashes_makes_loopwatch_exit_failing_and_leaves_nothing_running(tmp_path):
    crashing = tmp_path / "crashing.py"
    crashing.write_text(textwrap.dedent("""
        from contextlib import asynccontextmanager
        from mcp.server.mcpserver import MCPServer

        @asynccontextmanager
        async def lifespan(server):
            raise RuntimeError("database unreachable")
            yield

        mcp = MCPServer("crashing", lifespan=lifespan)
    """))
    result = run_cli("run", str(crashing), "--transport", "streamable-http", "--port", "0")
    assert result.returncode != 0
    assert "database unreachable" in result.stderr


def test_targets_split_on_the_last_colon_only_before_an_identifier():
    assert split_target("server.py:app") == ("server.py", "app")
    assert split_target("pkg.mod:mcp") == ("pkg.mod", "mcp")
    assert split_target("server.py") == ("server.py", None)
    assert split_target("C:server.py") == ("C:server.py", None)


def test_default_names_then_factories_are_tried(tmp_path, monkeypatch):
    (tmp_path / "factory_server.py").write_text(textwrap.dedent("""
        from mcp.server.mcpserver import MCPServer

        def server():
            return MCPServer("made")
    """))
    found = load_target(str(tmp_path / "factory_server.py"))
    assert found.name == "made"


def test_a_module_path_target_imports_from_sys_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    sys.modules.pop("low_server", None)
    assert load_target("low_server:server").name == "low-inventory"
    with pytest.raises(TargetError, match="tried nope"):
        load_target("low_server:nope")


def test_the_version_and_help_work_without_a_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "loopwatch" in capsys.readouterr().out


def test_run_help_shows_defaults_as_they_are_typed_never_python_reprs():
    done = run_cli("run", "--help", env={"COLUMNS": "200", "LOOPWATCH_OFFLOAD_POLICY": "calculate=process"})
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    defaults = re.findall(r"\(env LOOPWATCH_\w+(?:; default ([^)]*))?\)", text)
    assert len(defaults) > 25 and not [d for d in defaults if d in ("None", "False", "True", "{}")], defaults
    assert "--events FILE append every event as a JSON line (env LOOPWATCH_EVENTS) " in text
    assert "lw- commands (env LOOPWATCH_MONITOR; default no) " in text
    assert "process, auto (env LOOPWATCH_OFFLOAD_POLICY; default calculate=process) " in text
    assert "0: never (env LOOPWATCH_EVENTS_MAX_BYTES; default 50MB) " in text
    assert "seconds of stall that count (env LOOPWATCH_THRESHOLD; default 0.1) " in text
