"""The sentinel at rest: an idle loop is not woken to beat, and a block right after it wakes is still caught."""

import math
import sys
import threading
import time

import anyio
import anyio.lowlevel
import pytest

import loopwatch
from loopwatch._sentinel import IDLE_CPU, Heartbeat, _Beats
from loopwatch._timer import stall_timer
from loopwatch._watchdog import HOUSEKEEPING, IDLE_HOUSEKEEPING, Detector

pytestmark = pytest.mark.anyio

needs_timer = pytest.mark.skipif(stall_timer(0.1) is None, reason="idle needs the Linux stall timer")


class Clocks:
    """A wall clock and a CPU clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 5.0
        self.paused = 0
        self.armed: list[float] = []

    def beats(self, hb: Heartbeat) -> _Beats:
        return _Beats(hb, lambda: self.now, None, self.armed.append, lambda: self.cpu, self._pause)

    def _pause(self) -> None:
        self.paused += 1

    def advance(self, seconds: float, busy: float = 0.0) -> None:
        self.now += seconds
        self.cpu += busy * seconds


def test_a_beat_after_a_quiet_interval_says_idle_and_a_busy_one_does_not():
    clocks = Clocks()
    beats = clocks.beats(Heartbeat(0.01, 0.1, clock=lambda: clocks.now))
    clocks.advance(0.01, busy=0.5)
    assert beats.beat() is False  # half a core: working
    clocks.advance(0.01, busy=IDLE_CPU / 2)
    assert beats.beat() is True
    clocks.advance(0.05, busy=0.0)  # late by 40 ms: not a quiet beat, whatever the CPU says
    assert beats.beat() is False


def test_without_pause_the_sentinel_never_goes_idle():
    clocks = Clocks()
    hb = Heartbeat(0.01, 0.1, clock=lambda: clocks.now)
    beats = _Beats(hb, lambda: clocks.now, None, None, lambda: clocks.cpu)
    clocks.advance(0.01)
    assert beats.beat() is False


def test_an_idle_loop_is_never_a_block_however_long_it_sleeps():
    clocks = Clocks()
    hb = Heartbeat(0.01, 0.1, clock=lambda: clocks.now)
    beats = clocks.beats(hb)
    detector = Detector(hb, poll_interval=0.01, clock=lambda: clocks.now, sampler=lambda: None)
    detector.timer = True
    clocks.advance(0.01)
    beats.beat()
    beats.sleep()
    assert clocks.paused == 1 and hb.beat[1] == math.inf
    clocks.advance(3600.0)
    assert detector.poll() == IDLE_HOUSEKEEPING  # an idle loop: the watchdog looks rarely
    assert not detector.blocked and not hb.late


@pytest.mark.parametrize("interval", [0.002, 0.01, 0.05])
def test_a_block_right_after_the_loop_wakes_is_timed_from_the_wake_and_caught_at_threshold_plus_a_beat(interval):
    clocks = Clocks()
    hb = Heartbeat(interval, 0.1, clock=lambda: clocks.now)
    beats = clocks.beats(hb)
    events = []
    detector = Detector(
        hb, poll_interval=interval, clock=lambda: clocks.now, sampler=lambda: None, emit=lambda e, c: events.append(e)
    )
    detector.timer = True
    clocks.advance(interval)
    beats.beat()
    beats.sleep()
    for _ in range(6):  # asleep half a minute, the watchdog looking as rarely as it is told to
        clocks.advance(detector.poll())
    clocks.advance(1.0)  # then a background task wakes and blocks for 0.5 s
    armed = len(clocks.armed)
    beats.wake()
    assert len(clocks.armed) == armed + 1  # the stall timer is armed again before anything runs
    woke = clocks.now
    clocks.advance(0.1 + interval - 0.001)
    detector.poll()
    assert not detector.blocked  # not before threshold plus one beat
    clocks.advance(0.002)
    detector.poll()
    assert detector.blocked  # the stall timer fires at threshold plus one beat: a block at once
    while clocks.now < woke + 0.5:  # the watchdog samples the block every interval
        clocks.advance(interval, busy=1.0)
        detector.poll()
    beats.beat()  # the beat the block held up
    detector.poll()
    [event] = events
    assert event.duration_s == pytest.approx(clocks.now - woke - interval)
    assert event.kind == "cpu"


def test_the_watchdog_looks_once_a_second_while_the_loop_beats():
    clocks = Clocks()
    hb = Heartbeat(0.01, 0.1, clock=lambda: clocks.now)
    beats = clocks.beats(hb)
    detector = Detector(hb, poll_interval=0.01, clock=lambda: clocks.now)
    detector.timer = True
    clocks.advance(0.01)
    beats.beat()
    assert detector.poll() == HOUSEKEEPING


@needs_timer
async def test_an_idle_watched_loop_stops_beating_and_a_background_block_after_it_is_caught(anyio_backend):
    async def background() -> None:
        await anyio.sleep(1.0)  # starts while the sentinel sleeps
        time.sleep(0.4)

    async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
        hb = monitor.heartbeat
        before = hb.beat[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(background)
        await monitor.settle()
    # About 1.5 s watched, 1.1 s of it beating if the sentinel never slept: 110 beats; idle, a few around
    # each wake-up.
    assert hb.beat[0] - before < 40
    [event] = [e for e in monitor.recent if e.kind != "gc"]
    assert event.kind == "wait"
    assert event.frames[-1].function == "background"
    assert abs(event.duration_s - 0.4) < 0.1  # right to within the threshold


@needs_timer
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_call_from_another_thread_wakes_an_idle_loop_and_its_block_is_caught(anyio_backend):
    import asyncio

    loop = asyncio.get_running_loop()
    async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
        with anyio.fail_after(10):
            await anyio.sleep(0.1)
            threading.Timer(0.1, loop.call_soon_threadsafe, (time.sleep, 0.3)).start()
            await anyio.sleep(0.6)
            await monitor.settle()
    [event] = [e for e in monitor.recent if e.kind != "gc"]
    assert event.kind == "wait" and abs(event.duration_s - 0.3) < 0.1


@needs_timer
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
@pytest.mark.skipif(sys.platform == "win32", reason="uvloop")
async def test_on_uvloop_a_profiler_in_place_keeps_the_sentinel_beating(anyio_backend):
    def profiler(frame, event, arg):
        return None

    sys.setprofile(profiler)
    try:
        async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
            await anyio.sleep(0.3)
            assert monitor.heartbeat.beat[1] != math.inf
            assert monitor.heartbeat.beat[0] >= 10
    finally:
        assert sys.getprofile() is profiler  # left as it was
        sys.setprofile(None)


@needs_timer
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_two_watches_of_one_idle_loop_both_catch_a_block_and_leave_its_selector_as_it_was(anyio_backend):
    import asyncio

    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    async with loopwatch.watch(threshold=0.1, log_blocks=False) as outer:
        async with loopwatch.watch(threshold=0.1, log_blocks=False) as inner:
            for _ in range(2):
                await anyio.sleep(0.3)  # both sentinels asleep
                time.sleep(0.2)
            await inner.settle()
        await outer.settle()
    assert [e.kind for e in inner.recent if e.kind != "gc"] == ["wait", "wait"]
    assert [e.kind for e in outer.recent if e.kind != "gc"] == ["wait", "wait"]
    assert "select" not in vars(selector)


def _beats_on_heap(loop) -> list:
    return [h for h in loop._scheduled if not h.cancelled() and "_beat_by_timerfd" in h._callback.__qualname__]


async def _hot_until(monitor, beats: int, heap_empty: bool = True) -> None:
    """A hot `sleep(0)` loop until the sentinel has beaten `beats` more times (its deadline is no timer: a
    timer would be on the heap), asserting that nothing of the watch is on the heap, or at most one pending
    beat."""
    import asyncio

    loop = asyncio.get_running_loop()
    target = monitor.heartbeat.beat[0] + beats
    deadline = time.monotonic() + 10
    while monitor.heartbeat.beat[0] < target:
        assert time.monotonic() < deadline, "the sentinel stopped beating"
        assert len(_beats_on_heap(loop)) <= (0 if heap_empty else 1)
        await asyncio.sleep(0)


async def _hot_while(condition) -> None:
    import asyncio

    deadline = time.monotonic() + 10
    while condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0)


@needs_timer
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_hot_asyncio_loop_gets_no_timer_of_the_watch_in_its_scheduled_heap(anyio_backend):
    """A hot loop with an empty scheduled heap skips the heap in each iteration: the watch leaves it empty (a
    sentinel parked in `sleep(inf)` left a timer there for as long as it watched) and beats by its timerfd.
    While the heap holds others' timers (the SDK keeps one per request in flight), the loop already looks at
    its head every iteration, and the beat rides there instead of a kernel timer firing; it goes back to the
    timerfd when the heap empties."""
    import asyncio
    import heapq

    loop = asyncio.get_running_loop()
    async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
        await _hot_while(lambda: [h for h in loop._scheduled if not h.cancelled()])  # the watch's start-up's
        loop._scheduled.clear()  # cancelled handles asyncio has not dropped yet
        loop._timer_cancelled_count = 0
        await _hot_until(monitor, 3)
        foreign = loop.call_later(60, lambda: None)  # a request's timeout, say
        await _hot_while(lambda: not _beats_on_heap(loop))
        await _hot_until(monitor, 3, heap_empty=False)  # beats go on, one pending at a time
        foreign.cancel()
        loop._scheduled.remove(foreign)  # gone, as when it is popped at the head
        loop._timer_cancelled_count -= 1
        heapq.heapify(loop._scheduled)
        await _hot_while(lambda: _beats_on_heap(loop))  # the pending beat runs, finds the heap empty: the timerfd
        await _hot_until(monitor, 3)


def test_the_once_a_second_check_runs_at_the_first_wake_up_after_a_long_idle():
    clocks = Clocks()
    hb = Heartbeat(0.01, 0.1, clock=lambda: clocks.now)
    checks = []
    beats = _Beats(hb, lambda: clocks.now, lambda: checks.append(clocks.now), None, lambda: clocks.cpu, lambda: None)
    clocks.advance(0.01)
    beats.beat()
    beats.sleep()
    assert checks == []
    clocks.advance(3600.0)
    beats.wake()  # the first request in an hour
    assert checks == [clocks.now]
    clocks.advance(0.01)
    beats.beat()
    assert len(checks) == 1  # then once a second again


@needs_timer
@pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["trio"])
async def test_a_busy_watched_trio_loop_has_no_deadline_of_the_watch(anyio_backend):
    """Trio's run loop looks at its deadline heap in every batch (about 2% of a hot `sleep(0)` loop): the
    sentinel beats by a timerfd it waits on, not by sleeping, so the watch adds no deadline."""
    import trio

    def next_deadline() -> float:
        return trio.lowlevel.current_statistics().seconds_to_next_deadline

    assert next_deadline() == math.inf  # nothing timed in the test's own loop
    async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
        target = monitor.heartbeat.beat[0] + 3
        for _ in range(2_000_000):  # a busy loop, beating (no timeout here: that would be a deadline)
            if monitor.heartbeat.beat[0] >= target:
                break
            await anyio.lowlevel.checkpoint()
        assert monitor.heartbeat.beat[0] >= target
        assert next_deadline() == math.inf
