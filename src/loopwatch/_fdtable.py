"""A descriptor table of the watchdog's own (Linux, opt-in: `LOOPWATCH_PRIVATE_FDS=1`), so that the loop
thread keeps the kernel's fast path.

While two threads share a descriptor table, Linux takes and drops a reference to the file at every system
call on a descriptor (`fdget`: a thread alone in its table only borrows it). A hot loop makes one such call
an iteration, its poll: a thread parked beside it, any thread, costs asyncio's `sleep(0)` loop 2.5 to 4%,
uvloop's 4 to 6% (see the README's Performance section). A thread that calls `unshare(CLONE_FILES)` gets a
copy of the table, and the process's table has one user again. Only a process whose loop thread is its only
other thread gains anything: a stdio server of the SDK already has worker threads in the table.

The copy holds a reference to every file open at that moment, which would keep sockets and pipes open after
the process closes them (a peer would never see its EOF). So everything is closed in the copy at once but
what the watchdog itself uses (its wake-up pipe, the stall timer, the loop thread's schedstat), and standard
error; standard input and output are /dev/null there. The thread blocks every signal (a handler run there
would write asyncio's wake-up byte into the wrong table). Closing in the copy drops no POSIX record lock: those
belong to the table that took them (`fl_owner`), the process's. From then on the thread must not touch any
other descriptor of the process: whatever uses them (listeners, log handlers, hooks, the offload check's
look at a tool's objects) runs on a thread of the process's table (`_courier.Courier`).

Why it is off by default: Python runs a finalizer on whichever thread drops an object's last reference or
runs a collection. A socket or file of the server's finalized on a thread with a table of its own is closed
in that table, not the process's: the process's descriptor stays open (a peer never sees its EOF) or, if its
number is one the thread kept, that one is closed instead. Three rules keep the server's finalizers off the
watchdog, and they narrow the window without closing it:
- A collection it starts (its allocations while it samples a blocked loop cross the collector's threshold) is
  put off: `_gc`'s callback freezes every tracked object as it starts, so it finds nothing, and thaws them as
  it stops, into the oldest generation, where the next full collection frees what is garbage (later than it
  would have been). A thread switch between the freeze and the collection (rare at the default switch
  interval) lets garbage made meanwhile be collected here. A `gc.freeze()` the server made after loopwatch's
  import is thawed with them: never opt in with a pre-fork server that freezes.
- The frames it reads (and so the locals, coroutines and tasks they hold) are never dropped there: `hold`
  keeps them, under `SAMPLING`, until the loop thread `release`s them at its next beat, where the server's
  code would have freed them. Values it reads from a frame's `f_locals` (a call's context) are not covered:
  on Python 3.11 and 3.12 a second read refreshes the frame's copy of its locals on this thread.
- What inspects a tool's objects (the offload check) runs on the courier.
Code of other libraries that runs on every thread (gc callbacks registered before loopwatch's, audit and
trace hooks) is not covered at all.
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
_held: dict[int, object] = {}
SAMPLING = threading.Lock()
"""Held by a thread with a table of its own from its first reference to the loop's frames until it has
dropped its last one but those in `_held`: `release` never empties `_held` meanwhile."""


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
    Not while a thread with a table of its own is sampling (`SAMPLING`: the frames it still refers to would
    then be dropped there, not here): the next beat does it. The dropping happens outside the lock."""
    global _held
    if not SAMPLING.acquire(blocking=False):
        return
    try:
        kept, _held = _held, {}
    finally:
        SAMPLING.release()
    kept.clear()


def leave() -> None:
    """A thread with a table of its own ends: its last step (what threading runs after it is not covered)."""
    PRIVATE_THREADS.discard(threading.get_ident())


def _all_signals() -> set[signal.Signals]:
    """`signal.valid_signals()`, once a process (it takes about 0.1 ms: a watch's start paid it)."""
    global _SIGNALS
    if _SIGNALS is None:
        _SIGNALS = signal.valid_signals()
    return _SIGNALS


def wanted() -> bool:
    """Whether loopwatch's watchdog should try a table of its own: on Linux, when `LOOPWATCH_PRIVATE_FDS` is
    true (1, true, yes, on). Off by default: see this module's docstring."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("LOOPWATCH_PRIVATE_FDS", "").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        return False  # prometheus-client's multiprocess values keep a file open per metric, made where first set
    if gc.get_freeze_count() > _FROZEN_AT_IMPORT:
        return False  # the server froze objects (a pre-fork server): a put-off collection would thaw them
    return True


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
    PRIVATE_THREADS.add(threading.get_ident())  # before the table is its own: a collection then is put off
    if unshare(CLONE_FILES) != 0:
        PRIVATE_THREADS.discard(threading.get_ident())
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
