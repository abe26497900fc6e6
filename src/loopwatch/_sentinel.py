"""The lag sentinel: a task on the watched loop that beats on a short interval.

Written with anyio so it runs on asyncio, uvloop and trio. Time comes from a monotonic clock,
never `loop.time()`, which virtual-time test loops fake. The loop-side cost of a beat is two
deque appends and one tuple assignment; everything else happens on the watchdog thread.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

Clock = Callable[[], float]


class Heartbeat:
    """What the sentinel publishes. Each field is replaced or appended atomically under the GIL."""

    __slots__ = ("beat", "lags", "late", "interval", "threshold")

    def __init__(self, interval: float, threshold: float, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self.threshold = threshold
        self.beat: tuple[int, float] = (0, clock())
        self.lags: deque[float] = deque(maxlen=4096)
        self.late: deque[tuple[int, float, float]] = deque(maxlen=256)

    def record(self, count: int, now: float, lag: float) -> None:
        """One beat. `late` is appended before `beat` moves, so a reader that sees the beat sees the record."""
        self.lags.append(lag)
        if lag >= self.threshold:
            self.late.append((count, now, lag))
        self.beat = (count, now)


def current_backend() -> str | None:
    """`asyncio` or `trio` for the event loop running in this thread, None outside one (no sniffio needed)."""
    import asyncio

    try:
        asyncio.get_running_loop()
        return "asyncio"
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return "trio"
        except RuntimeError:
            pass
    return None


CHECK_EVERY = 100
"""Beats between calls of the sentinel's `check` (about a second at 10 ms)."""


async def run_sentinel(
    heartbeat: Heartbeat,
    clock: Clock = time.monotonic,
    check: Callable[[], None] | None = None,
    on_beat: Callable[[float], None] | None = None,
    *,
    task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    interval = heartbeat.interval
    count, last = heartbeat.beat[0], clock()
    heartbeat.beat = (count, last)
    task_status.started()  # the baseline is set before the caller goes on: no block at start-up is lost
    try:
        while True:
            await anyio.sleep(interval)
            now = clock()
            count += 1
            heartbeat.record(count, now, max(0.0, now - last - interval))
            last = now
            if on_beat is not None:
                on_beat(now)
            if check is not None and count % CHECK_EVERY == 0:
                check()
    finally:
        # Watching ends (the loop is closing, maybe right after a block): a block still unfinished
        # gets its late record now, so the watchdog's last poll reports it instead of losing it.
        now = clock()
        if now - last - interval >= heartbeat.threshold:
            heartbeat.record(count + 1, now, now - last - interval)
