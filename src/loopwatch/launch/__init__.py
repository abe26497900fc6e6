"""`loopwatch run [OPTIONS] -- COMMAND [ARGS...]`: run a server as its client's config launches it, watched.

The way in is the one `opentelemetry-instrument` and `ddtrace-run` use: the start-up hook's folder
(`_boot/`, holding only a `sitecustomize.py`) goes first on PYTHONPATH, the options go into the LOOPWATCH_*
variables the CLI reads, and loopwatch *execs* COMMAND. Exec, not a child: the client's process is the server
itself (its pid, its signals, its exit status, its stdin/stdout/stderr), nothing sits between the client and
the protocol bytes, and a client that kills the process it started kills the server, never an orphan. (A
watcher process, no child of the command, says on stderr when a command that started no Python exits:
`_nothing.py`.)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
# transport, host and port choose how `loopwatch run TARGET` serves; under `--` the command chooses.
NOT_PASSED = ("transport", "host", "port")


def option_text(value: Any) -> str | None:
    """An option's value as its LOOPWATCH_* variable spells it (None: leave the variable unset)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return ",".join(f"{tool}={policy}" for tool, policy in value.items())
    return str(value)


def hook_env(base: Mapping[str, str], options: Mapping[str, str | None], debug: bool = False) -> dict[str, str]:
    """The command's environment: the hook first on PYTHONPATH, the options in LOOPWATCH_* variables."""
    env = dict(base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOT_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *paths])
    for name, text in options.items():
        if text is None:
            env.pop(name, None)
        else:
            env[name] = text
    if debug:
        env["LOOPWATCH_DEBUG"] = "1"
    env.pop("LOOPWATCH_LAUNCH_TOP", None)  # a `loopwatch run` inside a watched command starts a new tree
    env.pop("LOOPWATCH_LAUNCH_OFF", None)
    env.pop("LOOPWATCH_LAUNCH_UNSEEN", None)  # an outer launch's: this one starts its own watcher (_nothing)
    env["LOOPWATCH_LAUNCH_DIR"] = record_dir()
    return env


def record_dir() -> str:
    """A folder private to the user where a watched process tells the command's first one it watched."""
    path = os.path.join(tempfile.gettempdir(), f"loopwatch-launch-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid():  # someone else's: a fresh one of our own
        return tempfile.mkdtemp(prefix="loopwatch-launch-")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def resolve(command: str, path: str | None = None) -> tuple[str | None, str]:
    """The executable COMMAND names, or None and the shell's one-line reason."""
    if os.sep in command:
        if not os.path.isfile(command):
            return None, f"{command}: no such file"
        if not os.access(command, os.X_OK):
            return None, f"{command}: permission denied (not executable)"
        return command, ""
    found = shutil.which(command, path=path)
    if found is None:
        return None, f"{command}: command not found"
    return found, ""


def launch(command: Sequence[str], options: Mapping[str, str | None], debug: bool = False) -> int:
    """Exec COMMAND with the hook; returns only when it cannot (127 not found, 126 not executable)."""
    executable, reason = resolve(command[0], os.environ.get("PATH"))
    if executable is None:
        print(f"loopwatch: {reason}", file=sys.stderr)
        return 126 if "permission denied" in reason else 127
    env = hook_env(os.environ, options, debug)
    if os.name == "nt":  # no exec there (os.execve starts another process and this one exits): wait for it
        import subprocess

        return subprocess.call([executable, *command[1:]], env=env)
    _restore_signals()
    sys.stdout.flush()
    sys.stderr.flush()
    from . import _nothing

    unseen = _nothing.start(command[0], env)  # one line at its exit if COMMAND starts no Python
    try:
        os.execve(executable, list(command), env)
    except OSError as exc:
        _nothing.forget(unseen)
        print(f"loopwatch: {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126
    return 0  # not reached


def _restore_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and exec keeps what is ignored: give the command the defaults it
    gets when its client starts it."""
    for name in ("SIGPIPE", "SIGXFSZ"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_DFL)
