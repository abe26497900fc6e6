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

Off by default; `LOOPWATCH_PRIVATE_FDS=1` turns it on (never with prometheus-client's multiprocess mode,
`PROMETHEUS_MULTIPROC_DIR`: each metric's value file is opened, and kept open, by the thread that first sets
it, and metrics are set on the watchdog). Experimental, for one hazard this design cannot rule out: Python
runs finalizers on whichever thread drops an object's last reference or triggers a collection, and the
watchdog allocates while it samples a blocked loop. A socket or file of the server's collected there is
closed in the watchdog's table, not the process's: the process's descriptor stays open (a peer never sees
its EOF), or, if its number is one the watchdog kept, that one is closed instead.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

from ._timer import _libc

CLONE_FILES = 0x400
_FD_MAX = 2**31 - 1
_SIGNALS: set[signal.Signals] | None = None


def _all_signals() -> set[signal.Signals]:
    """`signal.valid_signals()`, once a process (it takes about 0.1 ms: a watch's start paid it)."""
    global _SIGNALS
    if _SIGNALS is None:
        _SIGNALS = signal.valid_signals()
    return _SIGNALS


def wanted() -> bool:
    """Whether the watchdog should try a table of its own: on Linux, when `LOOPWATCH_PRIVATE_FDS` is true."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        return False  # prometheus-client's multiprocess values keep a file open per metric, made where first set
    return os.environ.get("LOOPWATCH_PRIVATE_FDS", "").strip().lower() not in ("", "0", "false", "no", "off")


def _close_ranges(kept: set[int]) -> bool:
    """Close every descriptor but `kept` with close_range(2), a call per gap; False where there is none."""
    try:
        close_range = _libc().close_range
    except (OSError, AttributeError):
        return False
    low = 0
    for fd in sorted(kept) + [_FD_MAX + 1]:
        if low < fd and close_range(low, fd - 1, 0) != 0:
            return False  # refused (ENOSYS, a seccomp profile): the caller lists what is left instead
        low = fd + 1
    return True


def go_private(keep: Iterable[int]) -> bool:
    """On the calling thread: take a descriptor table of its own and close in it every descriptor but `keep`
    and 2 (0 and 1 become /dev/null). False, with nothing changed, where the system refuses (a seccomp
    profile, another OS): the thread then shares the process's table as before."""
    try:
        unshare = _libc().unshare
    except (OSError, AttributeError):
        return False
    if unshare(CLONE_FILES) != 0:
        return False
    # No signal for this thread: its handler's write to the wake-up descriptor (asyncio's, set by the loop
    # thread) would miss the process's table, and the loop would sleep through Ctrl-C. The kernel gives a
    # signal for the process to a thread that does not block it.
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _all_signals())
    except (AttributeError, OSError, ValueError):
        pass
    kept = {fd for fd in keep if fd > 2} | {2}
    if not _close_ranges(kept):
        # No close_range(2) (Linux before 5.9, or a C library without it): what the thread's table holds.
        try:
            open_fds = [int(name) for name in os.listdir("/proc/thread-self/fd")]
        except (OSError, ValueError):
            open_fds = []
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
