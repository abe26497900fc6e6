"""The lag sentinel: a task on the watched loop that beats on a short interval.

Written with anyio so it runs on asyncio, uvloop and trio. Time comes from a monotonic clock,
never `loop.time()`, which virtual-time test loops fake. The loop-side cost of a beat is a read of the
loop thread's CPU clock, a deque append, one tuple assignment and the watchdog's `handoff` (which now and
then re-arms the stall timer); everything else happens on the watchdog thread. In place, inside a request
on an in-memory round trip, a beat costs about 31 us (measured; it was 49 us as an `anyio.sleep` task); in
a hot `sleep(0)` loop 30-40 us. While the loop idles it does not beat at all (see `_Beats`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import weakref
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

    @property
    def cpu_at_beat(self) -> float | None:
        """The loop thread's CPU clock as read at the latest beat (None: unknown)."""
        return self._cpu

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


CHECK_EVERY = 1.0
"""Seconds between calls of the sentinel's `check`, at a beat or a wake-up (none while the loop idles)."""
IDLE_CPU = 0.05
"""A beat finds the loop idle when its thread used less than this share of a core since the beat before."""


def _unknown() -> None:
    return None


class _Beats:
    """The sentinel's state and its one beat, shared by every backend's way of beating.

    Idle (only with `pause`, which stops the stall timer): a beat on time after a quiet interval lets the
    sentinel stop beating until the loop wakes. A loop with nothing to do cannot be blocked, and whatever
    wakes it (I/O, a timer due, a call from another thread) runs `wake` first, before any callback: a new
    baseline, and the stall timer armed again. A block that follows is timed from that moment, as from a
    beat.
    """

    __slots__ = (
        "hb", "clock", "check", "on_beat", "cpu", "interval", "count", "last", "pause", "_cpu_at", "_checked", "_failed"
    )

    def __init__(self, heartbeat: Heartbeat, clock: Clock, check, on_beat, cpu, pause=None) -> None:
        self.hb, self.clock, self.check, self.on_beat = heartbeat, clock, check, on_beat
        self.cpu: Callable[[], float | None] = cpu or _unknown
        self.pause: Callable[[], None] | None = pause
        self.interval = heartbeat.interval
        self.count, self.last = heartbeat.beat[0], clock()
        self._cpu_at = self.cpu()
        heartbeat.restart(self.last, self._cpu_at)
        self._failed = False
        self._checked = self.last
        self._hooks(self.last)  # the baseline is a beat too: a stall timer counts from it

    def beat(self) -> bool:
        """One beat; True when the loop was idle since the beat before (then the caller may `sleep`)."""
        now, cpu = self.clock(), self.cpu()
        self.count = count = self.count + 1
        last, before = self.last, self._cpu_at
        lag = max(0.0, now - last - self.interval)
        self.hb.record(count, now, lag, cpu)
        self.last, self._cpu_at = now, cpu
        self._hooks(now)
        return (
            self.pause is not None
            and lag < self.interval
            and cpu is not None
            and before is not None
            and cpu - before < IDLE_CPU * (now - last)
        )

    def sleep(self) -> None:
        """Stop beating: no beat is due (the watchdog sees no stall), and the stall timer is off."""
        self.hb.beat = (self.count, math.inf)
        self._call(self.pause)

    def wake(self) -> None:
        """The loop woke: the baseline moves to now and the stall timer is armed, before anything else runs."""
        now, cpu = self.clock(), self.cpu()
        self.last, self._cpu_at = now, cpu
        self.hb.restart(now, cpu)
        self._hooks(now)  # a server idle for hours runs its once-a-second check at the first request

    def _hooks(self, now: float) -> None:
        try:  # one frame a beat: no `_call` for the hook that runs at every beat
            if self.on_beat is not None:
                self.on_beat(now)
            if self.check is not None and now - self._checked >= CHECK_EVERY:
                self._checked = now
                self.check()
        except Exception:  # the watch's own hooks: never the loop's problem
            self._log_failure()

    def _call(self, hook, *args) -> None:
        try:
            if hook is not None:
                hook(*args)
        except Exception:  # the watch's own hooks: never the loop's problem
            self._log_failure()

    def _log_failure(self) -> None:
        """In an `except` block: the first failure is logged with its traceback, later ones not at all."""
        if not self._failed:
            self._failed = True
            logging.getLogger("loopwatch").exception("loopwatch sentinel hook failed; the sentinel goes on")

    def finish(self) -> None:
        """Watching ends (the loop is closing, maybe right after a block): a block still unfinished gets its
        late record now, so the watchdog's last poll reports it instead of losing it."""
        now = self.clock()
        lag = now - self.last - self.interval
        if lag >= self.hb.threshold and self.hb.beat[1] != math.inf:
            self.hb.record(self.count + 1, now, lag, self.cpu())


async def run_sentinel(
    heartbeat: Heartbeat,
    clock: Clock = time.monotonic,
    check: Callable[[], None] | None = None,
    on_beat: Callable[[float], None] | None = None,
    cpu: Callable[[], float] | None = None,
    pause: Callable[[], None] | None = None,
    *,
    task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    """Beat every `interval` until cancelled; with `pause` (which stops the stall timer), not while the loop
    is idle.

    On asyncio and uvloop a beat is a callback the loop runs when a timerfd it polls fires (Linux): unlike a
    `call_later` timer, nothing in asyncio's scheduled heap, which costs every iteration of a busy loop a
    look at its head (about 5% of an `await asyncio.sleep(0)` loop, measured). Without a timerfd, a
    `call_later` timer (a beat inside a request cost it 8 us that way, against 19 us as an `asyncio.sleep`
    task and 33 us through `anyio.sleep`, measured in place). On trio, this task waiting on a timerfd (else
    its sleep): nothing in trio's deadline heap either. The sentinel itself waits on nothing timed. While
    asyncio's heap holds others' timers, the beat rides there (`_beat_by_timerfd`)."""
    beats = _Beats(heartbeat, clock, check, on_beat, cpu, pause)
    task_status.started()  # the baseline is set before the caller goes on: no block at start-up is lost
    try:
        if current_backend() == "asyncio":
            await _beat_on_asyncio(beats)
        else:
            await _beat_on_trio(beats)
    finally:
        beats.finish()


async def _beat_on_asyncio(beats: _Beats) -> None:
    import asyncio

    from ._timer import stall_timer

    loop = asyncio.get_running_loop()
    timer = stall_timer(beats.interval)
    if timer is None or timer.fd is None:
        await _beat_by_callback(beats, loop)
        return
    try:
        await _beat_by_timerfd(beats, loop, timer)
    finally:
        timer.close()


async def _beat_by_timerfd(beats: _Beats, loop, timer) -> None:
    """Beats on the timerfd, or, while asyncio's scheduled heap holds timers of others, as a `call_later`
    timer: there the loop already looks at the heap's head every iteration, so one more timer costs it
    nothing, and the beat is not a kernel timer firing (which costs a virtual machine an exit and an
    interrupt: a 10 ms do-nothing wake-up cost an in-memory round trip 1.0% as a timerfd reader against
    0.2% as a `call_later` timer, measured in one run). A hot `sleep(0)` loop keeps the heap empty, and the
    timerfd. uvloop's heap is C: the timerfd always."""
    fd, arm, beat, interval = timer.fd, timer.arm, beats.beat, beats.interval
    scheduled = getattr(loop, "_scheduled", None)
    if not isinstance(scheduled, list):
        scheduled = None
    later = None  # the pending `call_later` beat, when the beat is on the heap

    def wake() -> None:
        beats.wake()
        arm()

    waker = _waker(loop, wake) if beats.pause is not None else None

    def tick(from_fd: bool) -> None:
        nonlocal later
        later = None
        idle = False
        try:
            idle = beat() and waker is not None and not getattr(loop, "_ready", None)
        finally:
            if idle:
                timer.disarm()
                beats.sleep()
                if not waker.arm():  # type: ignore[union-attr]  # last: the profile waker fires on any call
                    wake()
            elif scheduled:  # others' timers (the one that ran this beat is off the heap by now)
                if from_fd:
                    timer.disarm()  # the expiry read, and nothing more from the fd until it is armed again
                later = loop.call_later(interval, tick, False)
            else:
                arm()

    try:
        loop.add_reader(fd, tick, True)
    except NotImplementedError:  # a loop without readers (a proactor): the scheduled heap it is
        await _beat_by_callback(beats, loop)
        return
    try:
        await _park()
    finally:
        loop.remove_reader(fd)
        if later is not None:
            later.cancel()
        if waker is not None:
            waker.disarm()


async def _park() -> None:
    """Wait until cancelled, leaving asyncio's scheduled heap empty. `anyio.sleep_forever()` is `sleep(inf)`: a
    timer in that heap for good, which every other timer pushed (the SDK starts one per request) is compared
    with, in Python (`TimerHandle.__lt__`), and which every loop iteration looks at; an event nobody sets is
    just a future."""
    await anyio.Event().wait()


async def _beat_by_callback(beats: _Beats, loop) -> None:
    import asyncio

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
        await _park()
    finally:
        handle.cancel()


async def _beat_on_trio(beats: _Beats) -> None:
    """Trio: a beat is this task woken by a timerfd it waits on (Linux), re-armed after each beat: unlike a
    sleep, nothing in trio's deadline heap, which a busy run loop otherwise looks at in every batch (about 2%
    of a `trio.sleep(0)` loop, measured by ablation). Without a timerfd, a sleep."""
    import trio

    from ._timer import stall_timer

    timer = stall_timer(beats.interval)
    if timer is None or timer.fd is None:
        await _beat_by_sleep_on_trio(beats)
        return
    fd, arm, beat = timer.fd, timer.arm, beats.beat
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            if beat() and beats.pause is not None and not trio.lowlevel.current_statistics().tasks_runnable:
                timer.disarm()
                await _sleep_on_trio(beats)
            arm()  # the next beat; the expiry that woke this one is dropped (setting a timerfd resets its count)
    finally:
        trio.lowlevel.notify_closing(fd)
        timer.close()


async def _beat_by_sleep_on_trio(beats: _Beats) -> None:
    import trio

    interval, beat = beats.interval, beats.beat
    while True:
        await anyio.sleep(interval)
        if beat() and beats.pause is not None and not trio.lowlevel.current_statistics().tasks_runnable:
            await _sleep_on_trio(beats)


def _waker(loop, wake: Callable[[], None]) -> _SelectWake | _ProfileWaker:
    """What tells the sentinel that an idle asyncio loop woke: its selector's return, or else (uvloop, whose
    loop is C) the first Python event on the loop thread."""
    selector = getattr(loop, "_selector", None)
    if selector is not None and callable(getattr(selector, "select", None)):
        shared = _SELECTORS.get(selector)
        if shared is None:
            shared = _SELECTORS[selector] = _SelectWaker(selector)
        return _SelectWake(shared, wake)
    return _ProfileWaker(wake)


class _SelectWaker:
    """Shadows a loop's `selector.select` while a sentinel on it sleeps: its first return (the loop woke: I/O,
    a timer due, a call from another thread) calls the sleepers' `wake`, before the loop runs any callback.
    One per selector, so watches nested on one loop never wrap each other; busy loops never see it (it is
    there only while a sentinel sleeps)."""

    def __init__(self, selector) -> None:
        self._selector = selector
        self._waiting: list[Callable[[], None]] = []
        self._had: object = None
        self._original: Callable[..., object] = selector.select

    def arm(self, wake: Callable[[], None]) -> None:
        if not self._waiting:
            selector = self._selector
            self._had = vars(selector).get("select", _MISSING)  # someone's instance attribute: put back after
            self._original = selector.select
            selector.select = self._select
        self._waiting.append(wake)

    def disarm(self, wake: Callable[[], None]) -> None:
        if wake in self._waiting:
            self._waiting.remove(wake)
            if not self._waiting:
                self._restore()

    def _restore(self) -> None:
        selector = self._selector
        if vars(selector).get("select") == self._select:
            if self._had is _MISSING:
                del selector.select
            else:
                selector.select = self._had

    def _select(self, timeout: float | None = None):
        try:
            return self._original(timeout)
        finally:
            waiting, self._waiting = self._waiting, []
            self._restore()
            for wake in waiting:
                _safely(wake)


class _SelectWake:
    """One sentinel's side of its loop's `_SelectWaker`."""

    def __init__(self, shared: _SelectWaker, wake: Callable[[], None]) -> None:
        self._shared, self._wake = shared, wake

    def arm(self) -> bool:
        self._shared.arm(self._wake)
        return True

    def disarm(self) -> None:
        self._shared.disarm(self._wake)


_MISSING = object()
_SELECTORS: weakref.WeakKeyDictionary[object, _SelectWaker] = weakref.WeakKeyDictionary()


class _ProfileWaker:
    """uvloop: its loop is C, so the first Python event on the loop thread after the sentinel went idle (a
    callback called, a task resumed) is the loop waking; `wake` runs before that code does. Only where
    nothing else profiles the thread (`sys.setprofile` is one per thread); a callback that is itself C code
    (`call_later(5, time.sleep, 1)`) makes no event, and is seen at the next Python one."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def arm(self) -> bool:
        if sys.getprofile() is not None:
            return False  # a profiler is on: the sentinel keeps beating
        sys.setprofile(self._event)
        return True

    def disarm(self) -> None:
        if sys.getprofile() == self._event:
            sys.setprofile(None)

    def _event(self, frame, event: str, arg) -> None:
        if frame.f_globals is _GLOBALS:
            return  # the sentinel's own frames returning, before the loop goes to sleep
        self.disarm()
        _safely(self._wake)


async def _sleep_on_trio(beats: _Beats) -> None:
    """Trio: park the sentinel until the run loop comes back from its next wait for I/O (`after_io_wait`,
    called before any task runs) or, first, steps another task: one of the batch the sentinel ran in (they
    are out of the run queue, so `tasks_runnable` did not count them). Either makes the new baseline and
    wakes the sentinel; the instrument is removed at once, so a busy loop never calls it."""
    import trio

    task = trio.lowlevel.current_task()

    class Wake(trio.abc.Instrument):
        def after_io_wait(self, timeout: float) -> None:
            trio.lowlevel.remove_instrument(self)
            _safely(beats.wake)
            trio.lowlevel.reschedule(task)

        def before_task_step(self, stepping: object) -> None:
            self.after_io_wait(0.0)

    wake = Wake()
    beats.sleep()
    trio.lowlevel.add_instrument(wake)

    def abort(_raise_cancel) -> trio.lowlevel.Abort:
        try:
            trio.lowlevel.remove_instrument(wake)
        except (KeyError, ValueError):
            pass
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


def _safely(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # called from the loop's own machinery: nothing may escape into it
        logging.getLogger("loopwatch").exception("loopwatch sentinel wake-up failed")


_GLOBALS = globals()
