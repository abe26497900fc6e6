"""The lag sentinel: a task on the watched loop that beats on a short interval.

Written with anyio so it runs on asyncio, uvloop and trio. Time comes from a monotonic clock,
never `loop.time()`, which virtual-time test loops fake. The loop-side cost of a beat is a read of the
loop thread's CPU clock, a deque append, one tuple assignment and the watchdog's `handoff` (which now and
then re-arms the stall timer); everything else happens on the watchdog thread. In place, inside a request
on an in-memory round trip, a beat costs about 31 us (measured; it was 49 us as an `anyio.sleep` task).
"""

from __future__ import annotations

import logging
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

    __slots__ = ("beat", "lags", "late", "interval", "threshold", "_cpu")

    def __init__(self, interval: float, threshold: float, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self.threshold = threshold
        self.beat: tuple[int, float] = (0, clock())
        self.lags: deque[float] = deque(maxlen=4096)
        self.late: deque[tuple[int, float, float, float | None]] = deque(maxlen=256)
        """(beat count, time, lag, the loop thread's CPU seconds since the beat before, or None)."""
        self._cpu: float | None = None

    def restart(self, now: float, cpu: float | None) -> None:
        """The sentinel's baseline: the beat count goes on from where it was."""
        self._cpu = cpu
        self.beat = (self.beat[0], now)

    def record(self, count: int, now: float, lag: float, cpu: float | None = None) -> None:
        """One beat, with the loop thread's CPU clock read at it (None: unknown). `late` is appended before
        `beat` moves, so a reader that sees the beat sees the record."""
        self.lags.append(lag)
        if lag >= self.threshold:
            before = self._cpu
            self.late.append((count, now, lag, None if cpu is None or before is None else cpu - before))
        self._cpu = cpu
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


def _unknown() -> None:
    return None


class _Beats:
    """The sentinel's state and its one beat, shared by the asyncio callback and the anyio task."""

    __slots__ = ("hb", "clock", "check", "on_beat", "cpu", "interval", "count", "last", "_failed")

    def __init__(self, heartbeat: Heartbeat, clock: Clock, check, on_beat, cpu) -> None:
        self.hb, self.clock, self.check, self.on_beat = heartbeat, clock, check, on_beat
        self.cpu: Callable[[], float | None] = cpu or _unknown
        self.interval = heartbeat.interval
        self.count, self.last = heartbeat.beat[0], clock()
        heartbeat.restart(self.last, self.cpu())
        self._failed = False
        self._hooks(self.last, self.count)  # the baseline is a beat too: a stall timer counts from it

    def beat(self) -> None:
        now = self.clock()
        self.count = count = self.count + 1
        self.hb.record(count, now, max(0.0, now - self.last - self.interval), self.cpu())
        self.last = now
        self._hooks(now, count)

    def _hooks(self, now: float, count: int) -> None:
        try:
            if self.on_beat is not None:
                self.on_beat(now)
            if self.check is not None and count and count % CHECK_EVERY == 0:
                self.check()
        except Exception:  # the watch's own hooks: never the loop's problem
            if not self._failed:
                self._failed = True
                logging.getLogger("loopwatch").exception("loopwatch sentinel hook failed; the sentinel goes on")

    def finish(self) -> None:
        """Watching ends (the loop is closing, maybe right after a block): a block still unfinished gets its
        late record now, so the watchdog's last poll reports it instead of losing it."""
        now = self.clock()
        lag = now - self.last - self.interval
        if lag >= self.hb.threshold:
            self.hb.record(self.count + 1, now, lag, self.cpu())


async def run_sentinel(
    heartbeat: Heartbeat,
    clock: Clock = time.monotonic,
    check: Callable[[], None] | None = None,
    on_beat: Callable[[float], None] | None = None,
    cpu: Callable[[], float] | None = None,
    *,
    task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    """Beat every `interval` until cancelled. On asyncio (and uvloop) a beat is a timer callback on the loop:
    a beat inside a request cost it 8 us that way, against 19 us as an `asyncio.sleep` task and 33 us through
    `anyio.sleep` (measured in place, on an in-memory round trip). Elsewhere (trio) it is this task's sleep."""
    beats = _Beats(heartbeat, clock, check, on_beat, cpu)
    task_status.started()  # the baseline is set before the caller goes on: no block at start-up is lost
    try:
        if current_backend() == "asyncio":
            await _beat_by_callback(beats)
        else:
            while True:
                await anyio.sleep(beats.interval)
                beats.beat()
    finally:
        beats.finish()


async def _beat_by_callback(beats: _Beats) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    interval, beat = beats.interval, beats.beat
    handle: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal handle
        try:
            beat()
        finally:
            handle = loop.call_later(interval, tick)

    handle = loop.call_later(interval, tick)
    try:
        await anyio.sleep_forever()
    finally:
        handle.cancel()
