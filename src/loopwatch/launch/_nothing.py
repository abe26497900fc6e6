"""`loopwatch run -- COMMAND` where COMMAND never starts a Python: one line on stderr when it exits.

loopwatch execs COMMAND, so no loopwatch code is left in its process to say that nothing was watched (a
Python process of the command says it itself, at its exit, when it made no server). Just before the exec the
launcher leaves a file, `PID.unseen`, in its private record folder, and a small watcher process, its own
grandchild (not a child of COMMAND: nothing for COMMAND to wait for or be told about), holding a pidfd of the
launcher's process, which COMMAND becomes. The first Python process of the command removes the file at
start-up (the start-up hook: one `unlink`). The watcher waits for the file to go, and then ends at once, or
for COMMAND to exit, and then, the file still there, says the line. It holds only stderr (stdin and stdout are
/dev/null in it: a client reading the server's stdout to its end is not kept waiting), in a session of its
own (a terminal's Ctrl-C or a kill of COMMAND's process group ends COMMAND; the watcher then says its line).
A Python that is slow to start is never "nothing": only an exit is. Linux only (pidfd); elsewhere no line.
"""

from __future__ import annotations

import os
import select
import signal

UNSEEN = "LOOPWATCH_LAUNCH_UNSEEN"
"""The file the command's first Python process removes (the watcher's path, set only when one runs)."""
LONGEST_LOOK = 5.0
"""Seconds between the watcher's looks for the file, at most (it starts at 50 ms and doubles)."""


def start(name: str, env: dict[str, str]) -> str | None:
    """Before the exec: start the watcher; its file's path (also put in `env`), or None when none runs."""
    pidfd_open = getattr(os, "pidfd_open", None)
    folder = env.get("LOOPWATCH_LAUNCH_DIR")
    if pidfd_open is None or not folder:
        return None
    path = os.path.join(folder, f"{os.getpid()}.unseen")
    try:
        pidfd = pidfd_open(os.getpid())  # close-on-exec: the command never sees it; the watcher gets it by fork
    except OSError:
        return None
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        middle = os.fork()
    except OSError:
        os.close(pidfd)
        forget(path)
        return None
    if middle == 0:  # the middle process: forks the watcher and exits, so that the watcher is no child of COMMAND
        try:
            if os.fork() == 0:
                _watch(pidfd, path, name)
        finally:
            os._exit(0)
    os.close(pidfd)
    try:
        os.waitpid(middle, 0)
    except ChildProcessError:  # SIGCHLD ignored (inherited from the client): reaped by itself
        pass
    env[UNSEEN] = path
    return path


def forget(path: str | None) -> None:
    """The exec failed (the launcher says why itself): no watcher line."""
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _watch(pidfd: int, path: str, name: str) -> None:
    """The watcher process: never returns (the caller's `os._exit` covers an exception)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.closerange(3, pidfd)  # the launcher's other files (a client's pipes passed down): not held open here
    os.closerange(pidfd + 1, 1 << 20)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    wait = 0.05
    while not poller.poll(wait * 1000):  # readable: COMMAND exited
        if not os.path.exists(path):
            os._exit(0)  # a Python process started: its hook watches, or says it watched nothing
        wait = min(wait * 2, LONGEST_LOOK)
    try:
        os.unlink(path)
    except OSError:
        os._exit(0)  # removed by a Python process of the command just before it ended
    line = f"loopwatch: {name} started no Python MCP server; nothing was watched\n"
    try:
        os.write(2, line.encode(errors="replace"))
    except OSError:
        pass
    os._exit(0)
