"""When the garbage collector ran: a collection holds the GIL, so the loop stands still through it.

A collection is triggered by whichever thread allocates; it stops every thread, the loop's included, and
its cost grows with the whole heap, not with the code that happened to allocate. One callback in
`gc.callbacks` for the process notes the collections that took a millisecond or more, on the monotonic
clock the sentinel uses, so a block can say how much of it was the collector's.

The same callback puts off a collection started on a thread with a descriptor table of its own (`_fdtable`):
it freezes every tracked object as the collection starts, so the collection finds nothing to free (no
finalizer of the server's runs there, in the wrong table), and thaws them as it stops, into the oldest
generation, whose next collection (on a thread of the process's table, as likely as not) frees the garbage.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from typing import Any

from ._blame import OFFLOADED_CALLS
from ._fdtable import PRIVATE_THREADS

MIN_PAUSE = 0.001
"""Collections shorter than this are not kept: a young-generation pass takes microseconds."""
KEPT = 256


class GcClock:
    """Collections of a millisecond or more, while at least one monitor watches."""

    def __init__(self, clock: Any = time.monotonic, keep: int = KEPT) -> None:
        self._clock = clock
        self._pauses: deque[tuple[float, float, int]] = deque(maxlen=keep)
        self._holders: deque[tuple[float, float, int, tuple[Any, ...]]] = deque(maxlen=keep)
        """Collections run by a thread serving offloaded calls: (start, end, thread id, those calls)."""
        self._started: float | None = None
        self._offloaded: tuple[int, tuple[Any, ...]] | None = None
        self._thaw = False
        """A collection put off (`_fdtable`): thaw what it froze as it stops."""
        self.put_off = 0
        """Collections put off so far."""
        self._users = 0
        self._lock = threading.Lock()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap: they run holding the GIL, and the collector refuses to re-enter.
        # They run in the thread that triggered the collection: one running offloaded calls is noted (a dict
        # look-up here; loopwatch's own frame never shows as a culprit, see `_blame.drop_own_leaf`).
        if phase == "start":
            self._started = self._clock()
            thread = threading.get_ident()
            if thread in PRIVATE_THREADS:
                gc.freeze()  # nothing for it to free: no finalizer runs on a thread of another table
                self._thaw = True
                self.put_off += 1
            self._offloaded = (thread, tuple(OFFLOADED_CALLS.get(thread, ()))) if thread in OFFLOADED_CALLS else None
            return
        if self._thaw:
            self._thaw = False
            gc.unfreeze()
        # Kept before the collection is marked over: a thread switch in this callback lets the loop beat and
        # the watchdog read the block, which must see the collection either going on or kept.
        started, offloaded = self._started, self._offloaded
        if started is not None:
            ended = self._clock()
            if ended - started >= MIN_PAUSE:
                if offloaded is not None:
                    self._holders.append((started, ended, *offloaded))
                self._pauses.append((started, ended, info.get("generation", 0)))
        self._started = self._offloaded = None

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                gc.callbacks.append(self._callback)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._callback in gc.callbacks:
                gc.callbacks.remove(self._callback)

    def note(self, started: float, ended: float, generation: int = 2, thread: int | None = None,
             calls: tuple[Any, ...] = ()) -> None:
        """Record a pause directly (tests; collectors this process does not see)."""
        self._pauses.append((started, ended, generation))
        if thread is not None:
            self._holders.append((started, ended, thread, calls))

    def holders(self, start: float, end: float) -> list[tuple[float, int, tuple[Any, ...]]]:
        """Collections between `start` and `end` run by threads serving offloaded calls: (seconds of it, the
        thread, its offloaded calls then)."""
        for _ in range(3):
            try:
                kept = tuple(self._holders)
                break
            except RuntimeError:
                continue
        else:
            return []
        ongoing, offloaded = self._started, self._offloaded
        if ongoing is not None and offloaded is not None and not (kept and kept[-1][0] == ongoing):
            kept += ((ongoing, end, *offloaded),)
        return [(min(e, end) - max(b, start), t, c) for b, e, t, c in kept if e > start and b < end]

    def within(self, start: float, end: float) -> float:
        """Seconds of collection between `start` and `end` (monotonic), a collection still going on included
        (one whose finalizers let the GIL go, so the watchdog runs meanwhile)."""
        ongoing = self._started
        for _ in range(3):
            try:
                pauses = tuple(self._pauses)
                break
            except RuntimeError:  # a collection ended while the copy was taken
                continue
        else:
            return 0.0
        if ongoing is not None and not (pauses and pauses[-1][0] == ongoing):  # not if it ended meanwhile
            pauses += ((ongoing, end, 0),)
        total = 0.0
        for began, ended, _ in pauses:
            if ended > start and began < end:
                total += min(ended, end) - max(began, start)
        return total


GC_CLOCK = GcClock()
