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

On by default on Linux; `LOOPWATCH_PRIVATE_FDS=0` turns it off. Never with prometheus-client's multiprocess
mode (`PROMETHEUS_MULTIPROC_DIR`: each metric's value file is opened, and kept open, by the thread that first
sets it, and metrics are set on the watchdog), nor in a process that froze objects with `gc.freeze()` before
the watch began (see below).

Python runs a finalizer on whichever thread drops an object's last reference or runs a collection. A socket
or file of the server's finalized on a thread with a table of its own would be closed in that table, not the
process's: the process's descriptor would stay open (a peer never sees its EOF) or, if its number is one the
thread kept, that one would be closed instead. Two rules keep the server's finalizers off such a thread:
- A collection it starts (its allocations while it samples a blocked loop cross the collector's threshold) is
  put off: `_gc`'s callback freezes every tracked object as it starts, so it finds nothing, and thaws them as
  it stops, into the oldest generation, where the next full collection frees what is garbage. Nothing is
  freed on that thread, and nothing is lost. (A `gc.freeze()` the server makes after the watch began is
  thawed with them: harmless, but its objects are then looked at by full collections again.)
- The frames it reads (and so the locals, coroutines and tasks they hold) are never dropped there: `hold`
  keeps them until the loop thread `release`s them at its next beat, where the server's code would have freed
  them.
Threads that take a table of their own: the watchdog, and `loopwatch top`'s announcement threads.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Iterable

from ._timer import _libc

CLONE_FILES = 0x400
_FD_MAX = 2**31 - 1
_SIGNALS: set[signal.Signals] | None = None
_FROZEN_AT_IMPORT = gc.get_freeze_count()  # the interpreter's own (3.12 freezes a few hundred at start-up)

PRIVATE_THREADS: set[int] = set()
"""Threads with a table of their own (`go_private` to `leave`): collections they start are put off (`_gc`),
frames they read are held for the loop (`hold`)."""
BORN: set[object] = set()
"""A token per thread being born in a table of its own and not yet in PRIVATE_THREADS: while there is one,
`_gc` puts off every collection, on whichever thread (a moment's worth)."""
_held: dict[int, object] = {}


def hold(objects: object) -> None:
    """On a thread with a table of its own (a no-op elsewhere): keep each of `objects` (an iterable) alive
    until the loop thread's next beat drops it (`release`), so that what its last reference frees (a frame's
    locals: a socket, a file) is freed there, in the process's table."""
    if threading.get_ident() in PRIVATE_THREADS:
        held = _held
        for obj in objects:  # type: ignore[attr-defined]
            held[id(obj)] = obj


def release() -> None:
    """On a thread of the process's table (the loop's, at each beat; the watch's end): drop what `hold` kept.
    `dict.clear` empties the dict before it drops a reference, so a `hold` meanwhile (the GIL changes hands
    in a finalizer) lands in the emptied dict, for the next release."""
    _held.clear()


def leave() -> None:
    """A thread with a table of its own ends."""
    PRIVATE_THREADS.discard(threading.get_ident())


def _all_signals() -> set[signal.Signals]:
    """`signal.valid_signals()`, once a process (it takes about 0.1 ms: a watch's start paid it)."""
    global _SIGNALS
    if _SIGNALS is None:
        _SIGNALS = signal.valid_signals()
    return _SIGNALS


def wanted() -> bool:
    """Whether loopwatch's threads should try tables of their own: on Linux unless `LOOPWATCH_PRIVATE_FDS` is
    false (0, false, no, off)."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        return False  # prometheus-client's multiprocess values keep a file open per metric, made where first set
    if gc.get_freeze_count() > _FROZEN_AT_IMPORT:
        return False  # the server froze objects (a pre-fork server): a put-off collection would thaw them
    return os.environ.get("LOOPWATCH_PRIVATE_FDS", "").strip().lower() not in ("0", "false", "no", "off")


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
    profile, another OS): the thread then shares the process's table as before. The caller has `_gc`'s
    callback in place (`GC_CLOCK.acquire`) from before this call until after its `leave`."""
    try:
        unshare = _libc().unshare
    except (OSError, AttributeError):
        return False
    if unshare(CLONE_FILES) != 0:
        return False
    PRIVATE_THREADS.add(threading.get_ident())
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
