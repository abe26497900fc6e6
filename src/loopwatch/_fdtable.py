"""A descriptor table of the watchdog's own (Linux), so that the loop thread keeps the kernel's fast path.

While two threads share a descriptor table, Linux takes and drops a reference to the file at every system
call on a descriptor (`fdget`: a thread alone in its table only borrows it). A hot loop makes one such call
an iteration, its poll: a thread parked beside it, any thread, costs asyncio's `sleep(0)` loop 2.5 to 4%,
uvloop's 4 to 6% (see the README's Performance section). A thread that calls `unshare(CLONE_FILES)` gets a
copy of the table, and the process's table has one user again.

The copy holds a reference to every file open at that moment, which would keep sockets and pipes open after
the process closes them (a peer would never see its EOF). So everything is closed in the copy at once but
what the watchdog itself uses (its wake-up pipe, the stall timer, the loop thread's schedstat), and standard
error; standard input and output are /dev/null there. The thread blocks every signal (a handler run there
would write asyncio's wake-up byte into the wrong table). Closing in the copy drops no POSIX record lock: those
belong to the table that took them (`fl_owner`), the process's. From then on the thread must not touch any
other descriptor of the process: whatever uses them (listeners, log handlers, hooks) runs on a thread of the
process's table (`_courier.Courier`).

`LOOPWATCH_SHARED_FDS=1` keeps the watchdog in the process's table (the behaviour before this), as does
prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`: each metric's value file is opened, and
kept open, by the thread that first sets it, and metrics are set on the watchdog).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterable

CLONE_FILES = 0x400
_FD_MAX = 2**31 - 1


def wanted() -> bool:
    """Whether the watchdog should try a table of its own: on Linux, unless `LOOPWATCH_SHARED_FDS` is true."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        return False  # prometheus-client's multiprocess values keep a file open per metric, made where first set
    return os.environ.get("LOOPWATCH_SHARED_FDS", "").strip().lower() in ("", "0", "false", "no", "off")


def go_private(keep: Iterable[int]) -> bool:
    """On the calling thread: take a descriptor table of its own and close in it every descriptor but `keep`
    and 2 (0 and 1 become /dev/null). False, with nothing changed, where the system refuses (a seccomp
    profile, another OS): the thread then shares the process's table as before."""
    try:
        unshare = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return False
    if unshare(CLONE_FILES) != 0:
        return False
    # No signal for this thread: its handler's write to the wake-up descriptor (asyncio's, set by the loop
    # thread) would miss the process's table, and the loop would sleep through Ctrl-C. The kernel gives a
    # signal for the process to a thread that does not block it.
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    except (AttributeError, OSError, ValueError):
        pass
    kept = {fd for fd in keep if fd > 2} | {2}
    try:
        # The thread's own table now: precise, where closing up to a high limit would loop on old systems.
        open_fds = [int(name) for name in os.listdir("/proc/thread-self/fd")]
    except (OSError, ValueError):
        open_fds = []
        low = 0
        for fd in sorted(kept):
            if low < fd:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, _FD_MAX)
    for fd in open_fds:
        if fd not in kept:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, closed already
                pass
    try:
        null = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return True
    for target in (0, 1):
        if null != target:
            os.dup2(null, target, inheritable=False)
    if null > 1:
        os.close(null)
    return True
