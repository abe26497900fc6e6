"""The detector's decisions, driven by a fake clock, a fake CPU clock and fake samples: no threads, no sleeps."""

import pytest

from loopwatch._blame import CallRecord, Sample
from loopwatch._events import BlockEvent
from loopwatch._gc import GcClock
from loopwatch._sentinel import Heartbeat
from loopwatch._timer import StallTimer
from loopwatch._watchdog import HOUSEKEEPING, Detector, classify

from helpers import has_stall_timer

TOOL_STACK = (("/app/server.py", 15, "lookup"), ("/app/legacy.py", 8, "fetch_record"))
IMPORT_STACK = (("/app/server.py", 20, "report"), ("<frozen importlib._bootstrap>", 1176, "_find_and_load"))


class World:
    """A loop that beats every 10 ms until told to block, seen by a watchdog that polls every 10 ms."""

    def __init__(self, threshold=0.1, timer=False):
        self.now = 100.0
        self.cpu = 5.0
        self.runnable = 0.0
        self.count = 0
        self.hb = Heartbeat(0.01, threshold, clock=lambda: self.now)
        self.sample: Sample | None = None
        self.events: list[tuple[BlockEvent, CallRecord | None]] = []
        self.announced: list[CallRecord] = []
        self.gc = GcClock(clock=lambda: self.now)
        self.detector = Detector(
            self.hb,
            poll_interval=0.01,
            clock=lambda: self.now,
            wall=lambda: 1_000_000 + self.now,
            demand_clock=lambda: self.cpu + self.runnable,
            sampler=lambda: self.sample,
            gc_time=self.gc.within,
            emit=lambda e, c: self.events.append((e, c)),
            blocking=lambda c, elapsed, importing, stack: self.announced.append(c),
            tool_home=lambda c: "/app/",  # where the tools are defined (TOOL_STACK's application)
        )
        self.detector.timer = timer  # as a Watchdog with a stall timer sets it

    def beat(self, lag=0.0):
        self.count += 1
        self.hb.record(self.count, self.now, lag, self.cpu)  # the sentinel reads the loop's CPU clock at each beat

    def healthy(self, seconds=0.1, cpu_share=0.1):
        for _ in range(round(seconds / 0.01)):
            self.now += 0.01
            self.cpu += 0.01 * cpu_share
            self.beat()
            self.detector.poll()

    def beating(self, seconds, cpu_share=0.1):
        """The loop beats every 10 ms and nothing wakes the watchdog (a stall timer pushed forward each beat)."""
        for _ in range(round(seconds / 0.01)):
            self.now += 0.01
            self.cpu += 0.01 * cpu_share
            self.beat()

    def run(self, seconds, cpu_share=1.0, runnable_share=0.0):
        """The loop thread runs without beating, the watchdog polling every 10 ms."""
        until = self.now + seconds
        while self.now + 0.01 <= until + 1e-9:
            self.now += 0.01
            self.cpu += 0.01 * cpu_share
            self.runnable += 0.01 * runnable_share
            self.detector.poll()

    def block(self, seconds, cpu_share, sample=None, watchdog_runs=True):
        """The loop stalls; the watchdog polls through it (or, with the GIL held, can't)."""
        self.sample = sample
        start = self.now
        if watchdog_runs:
            self.run(seconds, cpu_share)
        else:
            self.now += seconds
            self.cpu += seconds * cpu_share
        self.now = start + seconds + 0.01
        self.beat(lag=seconds)
        self.sample = None


def call(tool="lookup", request_id=7):
    return CallRecord("tools/call", tool, request_id, ctx=object(), label=tool)


def test_a_sleep_is_a_wait_block_blamed_on_the_call_with_its_frames():
    w = World()
    w.healthy()
    record = call()
    w.block(0.3, cpu_share=0.02, sample=Sample(TOOL_STACK, record))
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert event.kind == "wait"
    assert (event.tool, event.method, event.request_id) == ("lookup", "tools/call", "7")
    assert blamed is record
    assert [f.line for f in event.frames] == [15, 8]
    assert event.samples >= 15
    assert event.duration_s == 0.3


def test_cpu_time_close_to_wall_time_is_a_cpu_block():
    w = World()
    w.healthy()
    w.block(0.25, cpu_share=1.0, sample=Sample(TOOL_STACK, call("crunch")))
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "cpu"
    assert event.tool == "crunch"
    assert 0.2 <= event.cpu_s <= 0.25


def test_a_block_the_watchdog_could_not_watch_while_busy_is_gil_with_no_invented_frames():
    w = World()
    w.healthy()
    w.block(0.5, cpu_share=1.0, sample=Sample(TOOL_STACK, call("native")), watchdog_runs=False)
    w.sample = Sample(TOOL_STACK, call("native"))  # what a sampler would see after the GIL comes back
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "gil"
    assert event.frames == ()
    assert event.tool is None
    assert "GIL" in event.describe()


def test_a_gil_block_keeps_the_call_seen_before_the_gil_was_taken():
    w = World()
    w.healthy()
    record = call("native")
    w.sample = Sample(TOOL_STACK, record)
    # 150 ms of Python the watchdog samples, then 600 ms in a native call that holds the GIL.
    start = w.now
    w.run(0.15)
    w.now += 0.6
    w.cpu += 0.6
    w.detector.poll()  # the watchdog wakes once the GIL is back; the loop has not beaten yet
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "gil"
    assert event.tool == "native"
    # The look right as the GIL came back shows the native call that held it: its frames, marked as such.
    assert [f.line for f in event.frames] == [15, 8]
    assert event.released_at == event.frames[-1]
    assert event.to_dict()["released_at"]["line"] == 8
    assert "a native call at legacy.py:8 in fetch_record held the GIL (6 samples)" in event.describe()


def test_a_block_inside_an_import_is_an_import_block_naming_the_module_and_the_import_line():
    w = World()
    w.healthy()
    w.block(0.3, cpu_share=0.05, sample=Sample(IMPORT_STACK, call("report"), module="pandas"))
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "import"
    assert event.module == "pandas"
    assert event.culprit is not None and (event.culprit.file, event.culprit.line) == ("/app/server.py", 20)
    assert "importing pandas" in event.describe()


def test_a_loop_that_beats_on_time_reports_nothing():
    w = World()
    w.healthy(2.0, cpu_share=0.9)
    assert w.events == []


def test_a_stall_below_the_threshold_is_not_a_block():
    w = World(threshold=0.1)
    w.healthy()
    w.block(0.06, cpu_share=1.0, sample=Sample(TOOL_STACK, call()))
    w.healthy(0.05)
    assert w.events == []


def test_two_blocks_between_two_polls_are_two_events_each_with_its_own_cpu():
    w = World()
    w.healthy()
    w.now += 0.2
    w.cpu += 0.2
    w.beat(lag=0.2)  # a crunch
    w.now += 0.3
    w.beat(lag=0.3)  # then a sleep, before the watchdog looked again
    w.now += 0.01
    w.detector.poll()
    assert [e.duration_s for e, _ in w.events] == [0.2, 0.3]
    assert all(e.frames == () for e, _ in w.events)


def test_a_crunch_preempted_by_a_busy_machine_is_still_a_cpu_block():
    w = World()
    w.healthy()
    w.sample = Sample(TOOL_STACK, call("crunch"))
    w.run(0.3, cpu_share=0.4, runnable_share=0.5)  # on the CPU 40% of the time, waiting for a core the rest
    w.now += 0.01
    w.beat(lag=0.3)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "cpu"
    assert event.cpu_s < 0.15  # cpu_s reports real CPU time, not demand


def test_a_crunch_then_a_sleep_with_no_beat_between_is_the_kind_of_the_stack_reported():
    w = World()
    w.healthy()
    start = w.now
    record = call("lookup")  # one call: its samples share its record
    crunch = Sample((("/app/server.py", 30, "warm_cache"),), record)
    sleep = Sample(TOOL_STACK, record)
    while w.now < start + 0.5 - 1e-9:
        w.now += 0.01
        busy = w.now < start + 0.2
        w.cpu += 0.01 if busy else 0.0002
        w.sample = crunch if busy else sleep
        w.detector.poll()
    w.now += 0.01
    w.beat(lag=0.5)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert [f.line for f in event.frames] == [15, 8]  # the sleep holds most of the block...
    assert event.kind == "wait"  # ...so the kind is the sleep's, though the block as a whole was 40% CPU


def test_without_a_cpu_clock_the_kind_is_unknown():
    assert classify(0.3, None, 0.0, importing=False) == "unknown"


def test_block_times_are_unix_seconds_at_the_start_of_the_block():
    w = World()
    w.healthy()
    start = w.now
    w.block(0.3, cpu_share=0.0, sample=Sample(TOOL_STACK, call()))
    w.healthy(0.03)
    [(event, _)] = w.events
    assert abs(event.time - (1_000_000 + start + 0.01)) < 0.02


def test_calls_disagreeing_across_samples_blame_nobody():
    w = World()
    w.healthy()
    records = [call("a", 1), call("b", 2), call("c", 3)]
    w.sample = None
    start = w.now
    i = 0
    while w.now < start + 0.3 - 1e-9:
        w.now += 0.01
        w.sample = Sample(TOOL_STACK, records[i % 3])
        i += 1
        w.detector.poll()
    w.now += 0.01
    w.beat(lag=0.3)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.tool is None


def collect_garbage(w, seconds, sample=None):
    """A collection on the loop: the GIL is held, so the watchdog can't run until it ends."""
    w.sample = sample
    began = w.now
    w.now += seconds
    w.cpu += seconds
    w.gc.note(began, w.now)


def test_a_block_the_garbage_collector_held_is_gc_with_no_frames_and_no_call_outside_one():
    w = World()
    w.healthy()
    start = w.now
    w.now += 0.01
    collect_garbage(w, 0.18, sample=Sample(TOOL_STACK, None))
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, event.frames, blamed) == ("gc", None, (), None)
    assert event.gc_s == 0.18
    assert "garbage collector ran 180 ms" in event.describe()


def test_a_collection_during_a_call_keeps_the_call_and_is_never_announced_as_the_calls_blocking():
    w = World()
    w.healthy()
    record = call("report")
    w.sample = Sample(TOOL_STACK, record)
    start = w.now
    w.run(0.03)
    collect_garbage(w, 0.25, sample=Sample(TOOL_STACK, record))
    w.run(0.04)  # the watchdog wakes once the collection ends and sees the call go on
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, blamed) == ("gc", "report", record)
    assert event.frames == ()
    assert event.describe().startswith("loop blocked 320 ms [gc] during tools/call report (request 7)")
    assert w.announced == []  # nothing told the offloader that the tool was blocking


def test_a_short_collection_inside_a_sleep_leaves_it_a_wait_block_and_is_counted():
    w = World()
    w.healthy()
    record = call()
    w.block(0.3, cpu_share=0.02, sample=Sample(TOOL_STACK, record))
    w.gc.note(w.now - 0.2, w.now - 0.16)  # 40 ms inside the block
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "wait"
    assert [f.line for f in event.frames] == [15, 8]
    assert abs(event.gc_s - 0.04) < 1e-6
    assert event.describe().endswith("(garbage collection 40 ms)")
    assert w.announced == [record]


def test_a_call_first_seen_through_the_sdks_frame_is_blamed_through_the_middlewares_record():
    # Seen in CI on a loaded machine: a collection began in the SDK's code before loopwatch's middleware ran
    # for the call; the watchdog's first looks found the call only through the SDK's frame (no label, no start),
    # then the middleware's (label and start). Blamed through the first, the offloader never counted the block.
    w = World(threshold=0.05)
    w.healthy()
    ctx = object()
    from_sdk = CallRecord("tools/call", "parse", 2, ctx)
    from_middleware = CallRecord("tools/call", "parse", 2, ctx, label="parse")
    from_middleware.started = w.now
    start = w.now
    collect_garbage(w, 0.08, sample=Sample(TOOL_STACK, from_sdk))
    w.sample = Sample(TOOL_STACK, from_sdk)  # the first looks after the collection: the middleware not yet in
    w.run(0.03, cpu_share=0.5)
    w.sample = Sample(TOOL_STACK, from_middleware)  # then the tool sleeps inside it
    w.run(0.2, cpu_share=0.02)
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool) == ("wait", "parse")
    assert blamed is from_middleware and blamed.label == "parse"
    assert w.announced == [from_middleware]


def test_collections_outside_a_block_are_not_counted_in_it():
    w = World()
    w.gc.note(w.now - 1.0, w.now - 0.5)
    w.healthy()
    w.block(0.3, cpu_share=1.0, sample=Sample(TOOL_STACK, call("crunch")))
    w.healthy(0.03)
    [(event, _)] = w.events
    assert (event.kind, event.gc_s) == ("cpu", 0.0)


class LongSleeper:
    """A detector whose every poll asks for a long sleep: only a wake-up makes the watchdog poll sooner."""

    def __init__(self):
        self.hb = Heartbeat(0.01, 0.1)
        self.poll_interval = 0.01
        self.polls = 0

    def first_wait(self):
        return 0.01

    def poll(self):
        self.polls += 1
        return 30.0


def test_the_sentinel_wakes_a_due_watchdog_at_its_beat_and_a_stop_wakes_it_at_once():
    import threading
    import time

    from loopwatch._watchdog import Watchdog

    detector = LongSleeper()
    dog = Watchdog(detector)
    dog.start()
    try:
        deadline = time.monotonic() + 10
        while detector.polls < 1 and time.monotonic() < deadline:  # the first poll, after first_wait
            time.sleep(0.01)
        assert detector.polls == 1
        dog.handoff(dog.due_at - 5.0)  # a beat long before the watchdog is due: nothing happens
        dog.handoff(dog.due_at - detector.hb.interval)  # the last beat before it is due: the sentinel wakes it
        while detector.polls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert detector.polls == 2  # long before its own 30 s timer
    finally:
        dog.stop(timeout=10)
    assert not dog.is_alive()  # stop woke it too, without waiting for the timer
    assert detector.polls == 3  # the last poll on the way out
    assert not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog" and t is dog._thread]


# -- with a stall timer: the watchdog sleeps while the loop beats ---------------------------------------


def test_with_a_stall_timer_the_watchdog_sleeps_while_the_loop_beats_and_samples_a_block_once_it_fires():
    w = World(timer=True)
    for _ in range(3):  # a second of beats between looks: housekeeping only
        w.beating(1.0)
        assert w.detector.poll() == HOUSEKEEPING
    last_beat = w.now
    w.sample = Sample(TOOL_STACK, call())
    w.now = last_beat + 0.01 + 0.1 + 1e-6  # the timer fires when the sentinel is interval + threshold late
    assert w.detector.poll() == 0.01  # blocked: from now on it looks every poll interval
    w.run(0.19, cpu_share=0.02)
    w.now += 0.01
    w.beat(lag=w.now - last_beat - 0.01)
    w.sample = None
    assert w.detector.poll() == 0.01  # one more look right after the block
    w.beating(0.01)
    assert w.detector.poll() == HOUSEKEEPING
    [(event, blamed)] = w.events
    assert (event.kind, event.tool) == ("wait", "lookup")
    assert blamed is not None and blamed.request_id == 7
    assert [f.line for f in event.frames] == [15, 8]
    assert event.samples >= 15


def test_with_a_stall_timer_a_crunch_between_housekeeping_looks_is_cpu_not_gil():
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.7)  # 0.7 s into a 1 s housekeeping wait: no look is late
    last_beat = w.now
    w.sample = Sample(TOOL_STACK, call("crunch"))
    w.now = last_beat + 0.11
    w.cpu += 0.11
    w.detector.poll()
    w.run(0.2, cpu_share=1.0)
    w.now += 0.01
    w.cpu += 0.01
    w.beat(lag=w.now - last_beat - 0.01)
    w.detector.poll()
    [(event, _)] = w.events
    assert (event.kind, event.tool) == ("cpu", "crunch")
    assert event.cpu_s > 0.2


def test_with_a_stall_timer_a_block_the_watchdog_could_not_run_through_is_gil():
    """The timer fired, but the GIL was held: the watchdog's first look comes after the block, and the loop
    beat meanwhile. Its housekeeping wait was not over, yet it was due when the timer fired."""
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.2)
    w.sample = Sample(TOOL_STACK, call("native"))
    w.block(0.5, cpu_share=1.0, watchdog_runs=False)
    w.sample = Sample(TOOL_STACK, call("native"))  # what a sampler would see once the GIL is back
    w.beating(0.02)  # the loop beats again before the watchdog gets the GIL
    w.detector.poll()
    [(event, _)] = w.events
    assert event.kind == "gil"
    assert event.frames == ()


needs_timer = pytest.mark.skipif(not has_stall_timer(), reason="no timerfd on this platform (or LOOPWATCH_NO_TIMER)")


@needs_timer
def test_a_stall_timer_fires_only_once_nobody_pushes_it_forward():
    import select
    import time

    pushed, left = StallTimer(30.0), StallTimer(0.05)
    watch = select.poll()
    watch.register(pushed.fd, select.POLLIN)
    try:
        for _ in range(10):
            assert pushed.arm() == 0
            time.sleep(0.01)
        assert watch.poll(0) == []  # pushed forward: never fired
        watch.register(left.fd, select.POLLIN)
        assert watch.poll(10_000) == [(left.fd, select.POLLIN)]  # left alone: fired
        left.clear()
        assert watch.poll(0) == []  # cleared until armed again
    finally:
        pushed.close()
        left.close()
    assert pushed.fd is None and pushed.arm() == -1  # closed: arming is refused, never sent to a reused number


@needs_timer
def test_the_watchdog_reads_a_fired_timer_only_after_the_look_it_woke_for():
    """A read lets the GIL go: done right at the wake-up, it let a loop thread just back from a native call run on
    and beat before the look, and the one sample showing that call's line was dropped (bench_blame missed the
    GIL-held call's line about 1 run in 3). The expiry is consumed at the next wait, after the look."""
    import select

    from loopwatch._watchdog import _TimerSleeper

    timer = StallTimer(0.05)
    sleeper = _TimerSleeper(timer)
    probe = select.poll()
    probe.register(timer.fd, select.POLLIN)
    try:
        assert sleeper.wait(10.0) is False  # woken by the timer, not the pipe
        assert probe.poll(0) == [(timer.fd, select.POLLIN)]  # not read yet: the look comes first
        assert sleeper.wait(0.0) is False
        assert probe.poll(0) == []  # read at the next wait
    finally:
        sleeper.close()
        timer.close()


@needs_timer
def test_with_a_stall_timer_the_watchdog_wakes_when_it_fires_and_goes_back_to_a_schedule_if_it_breaks(caplog):
    import logging
    import time

    from loopwatch._watchdog import Watchdog

    detector = LongSleeper()
    timer = StallTimer(0.05)  # armed at creation: fires 50 ms later unless pushed forward
    dog = Watchdog(detector, timer=timer)
    assert detector.timer is True
    dog.start()
    try:
        deadline = time.monotonic() + 10
        while detector.polls < 2 and time.monotonic() < deadline:  # the first look, then the timer's
            time.sleep(0.01)
        assert detector.polls == 2  # long before its own 30 s wait
        timer.close()  # as if the sentinel outlived its timer
        with caplog.at_level(logging.WARNING, logger="loopwatch"):
            dog.handoff(0.0)
        assert detector.timer is False and dog.timer is None
        assert "stall timer failed" in caplog.text
        time.sleep(0.3)
        assert detector.polls <= 5  # back on its (30 s) schedule: the closed descriptor does not wake it again
    finally:
        dog.stop(timeout=10)
    assert not dog.is_alive()
    assert dog._sleeper._read == -1 and dog._sleeper._write == -1  # the wake-up pipe went with the thread
    dog.poke()  # harmless once closed


def test_a_crunch_right_after_the_watch_starts_is_cpu_though_the_first_look_comes_late():
    """The watchdog's first look is at the threshold, not after one poll interval: that wait is not time it
    could not run (it was counted so, and a short crunch at start-up came out as `gil` with no frames)."""
    w = World()
    w.now += w.detector.first_wait()  # the watchdog sleeps until a block could first cross the threshold
    w.cpu += 0.1
    w.sample = Sample(TOOL_STACK, call("crunch"))
    w.detector.poll()  # the loop has been crunching since the start
    w.run(0.04, cpu_share=1.0)
    w.now += 0.01
    w.cpu += 0.01
    w.beat(lag=w.now - 100.0 - 0.01)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert (event.kind, event.tool) == ("cpu", "crunch")
    assert [f.line for f in event.frames] == [15, 8]


def test_start_returns_once_the_watchdog_thread_is_up_and_asleep(monkeypatch):
    """Left to start beside a busy loop, the thread took the GIL back after each step of its start-up and the
    loop's calls ran slower for the whole session after it (bench_overhead.py, announce off: 1.12-1.17 against
    1.02-1.03). `start` waits, GIL released, until the thread sleeps (bounded: START_WAIT)."""
    import time

    from loopwatch import _watchdog
    from loopwatch._watchdog import Watchdog

    monkeypatch.setattr(_watchdog, "START_WAIT", 60.0)  # the bound is not what is tested: the wait is

    class SlowStart(LongSleeper):
        def __init__(self):
            super().__init__()
            self.hb = Heartbeat(0.01, 120.0)
            self.started = False

        def first_wait(self):
            time.sleep(0.05)  # a start-up that gives the GIL up on the way
            self.started = True
            return 30.0

    detector = SlowStart()
    dog = Watchdog(detector)
    dog.start()
    try:
        assert detector.started, "start() returned before the watchdog thread was up"
    finally:
        dog.stop(timeout=10)


def test_a_late_beat_wakes_the_watchdog_at_once():
    """The block just ended: re-arming the stall timer may have cleared an expiry the watchdog had not read
    (it fired during a slow step), so the sentinel wakes it itself."""
    import time

    from loopwatch._watchdog import Watchdog

    detector = LongSleeper()
    dog = Watchdog(detector)
    dog.start()
    try:
        deadline = time.monotonic() + 10
        while detector.polls < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        dog.handoff(dog.due_at - 5.0)  # an on-time beat long before the watchdog is due: nothing happens
        time.sleep(0.05)
        assert detector.polls == 1
        detector.hb.record(1, 100.0, 0.15)  # a late beat
        dog.handoff(dog.due_at - 5.0)
        while detector.polls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert detector.polls == 2  # long before its own 30 s wait
    finally:
        dog.stop(timeout=10)


@needs_timer
def test_without_a_descriptor_for_its_pipe_the_watchdog_looks_on_a_schedule(monkeypatch):
    import os

    from loopwatch._watchdog import Watchdog

    def no_descriptors():
        raise OSError(24, "Too many open files")

    detector = LongSleeper()
    timer = StallTimer(1.0)
    try:
        monkeypatch.setattr(os, "pipe", no_descriptors)
        dog = Watchdog(detector, timer=timer)
        monkeypatch.undo()
        assert dog.timer is None and detector.timer is False
        dog.start()
        dog.stop(timeout=10)
        assert not dog.is_alive() and detector.polls >= 1
    finally:
        timer.close()


# -- issue 16, 21: the line to fix, the evidence for the kind, who held the GIL, back-to-back calls -------------


def test_a_block_with_a_late_first_look_and_several_samples_is_cpu_not_gil():
    """A busy machine made the first look 60 ms late; the watchdog then sampled the crunch eight times: it
    could sample, so the block is not `gil` (the lateness before the first look was counted as GIL time)."""
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.3)
    last_beat = w.now
    w.sample = Sample(TOOL_STACK, call("parse"))
    w.now = last_beat + 0.17  # the timer fired at +0.11; the watchdog ran at +0.17
    w.cpu += 0.17
    w.detector.poll()
    w.run(0.08, cpu_share=1.0)
    w.now += 0.01
    w.cpu += 0.01
    w.beat(lag=w.now - last_beat - 0.01)
    w.detector.poll()
    [(event, _)] = w.events
    assert (event.kind, event.tool) == ("cpu", "parse")


def test_a_gil_block_without_a_sample_says_how_many_samples_there_were():
    w = World()
    w.healthy()
    w.block(0.5, cpu_share=1.0, watchdog_runs=False)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.kind == "gil" and event.released_at is None
    assert event.describe().endswith(": the watchdog could not sample (0 samples), a native call held the GIL")


def test_the_culprit_is_decided_from_where_the_blamed_tool_is_defined():
    site = "/venv/lib/python3.11/site-packages"
    stack = (
        (f"{site}/mcp/server/runner.py", 210, "_on_request"),
        (f"{site}/fetchsrv/server.py", 494, "fetch"),
        (f"{site}/fetchsrv/server.py", 368, "extract_content_from_html"),
        (f"{site}/readabilipy/simple_json.py", 60, "simple_json_from_html_string"),
        (f"{site}/regex/_main.py", 288, "sub"),
    )
    w = World()
    w.detector.tool_home = lambda c: f"{site}/fetchsrv/"
    w.healthy()
    w.block(0.3, cpu_share=1.0, sample=Sample(stack, call("fetch")))
    w.healthy(0.03)
    [(event, _)] = w.events
    assert (event.culprit.file, event.culprit.line) == (f"{site}/fetchsrv/server.py", 368)
    assert event.describe().endswith(
        "at regex/_main.py:288 in sub <- fetchsrv/server.py:368 in extract_content_from_html"
    )


def off_call(tool="convert", request_id=9):
    record = call(tool, request_id)
    record.execution = "thread"
    return record


def test_a_loop_waiting_for_the_gil_an_offloaded_call_holds_is_blamed_on_that_call():
    w = World()
    w.healthy()
    convert = off_call()
    worker = Sample((("/app/convert.py", 12, "convert"),), convert)
    start = w.now
    w.now += 0.5  # neither the loop thread nor the watchdog could run: the worker held the GIL
    w.cpu += 0.001
    w.sample = Sample((("/usr/lib/python3.11/asyncio/selectors.py", 468, "select"),), None, elsewhere=(worker,))
    w.detector.poll()
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, event.offloaded, blamed) == ("gil", "convert", True, convert)
    assert event.describe() == (
        "loop blocked 500 ms [gil]: the loop waited for the GIL held by tools/call convert (request 9) "
        "(offloaded) at convert.py:12 in convert"
    )


def test_a_loop_that_ran_its_own_native_call_is_not_blamed_on_an_offloaded_one():
    w = World()
    w.healthy()
    worker = Sample((("/app/convert.py", 12, "convert"),), off_call())
    native = call("native")
    start = w.now
    w.now += 0.5
    w.cpu += 0.5  # the loop thread was the one running
    w.sample = Sample(TOOL_STACK, native, elsewhere=(worker,))
    w.detector.poll()
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, event.offloaded, blamed) == ("gil", "native", False, native)


def test_without_a_sample_the_one_offloaded_call_running_is_blamed_and_two_are_not():
    for running, expected in (([off_call()], "convert"), ([off_call(), off_call("other", 10)], None)):
        w = World()
        w.detector.offloaded_during = lambda start, end, running=running: running
        w.healthy()
        w.block(0.4, cpu_share=0.001, watchdog_runs=False)
        w.healthy(0.03)
        [(event, _)] = w.events
        assert event.tool == expected


def test_a_collection_an_offloaded_calls_thread_ran_is_blamed_on_that_call():
    w = World()
    w.detector.loop_thread = 1
    churn = off_call("churn")
    w.detector.gc_holders = w.gc.holders
    w.healthy()
    start = w.now
    w.now += 0.01
    began = w.now
    w.now += 0.3
    w.gc.note(began, w.now, thread=2, calls=(churn,))
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, event.offloaded, blamed) == ("gc", "churn", True, churn)
    assert "the garbage collector ran 300 ms of it, in the thread of tools/call churn" in event.describe()


def test_a_collection_the_loop_thread_ran_stays_the_heaps():
    w = World()
    w.detector.loop_thread = 1
    w.detector.gc_holders = w.gc.holders
    w.healthy()
    start = w.now
    w.now += 0.01
    began = w.now
    w.now += 0.3
    w.gc.note(began, w.now)  # no thread noted: not one serving offloaded calls
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.tool, event.offloaded, blamed) == ("gc", None, False, None)


@pytest.mark.parametrize("calls", [2, 3, 20])
def test_calls_blocking_back_to_back_are_each_their_own_block(calls):
    w = World()
    w.healthy()
    records = [call(f"t{i}", i) for i in range(calls)]
    start = w.now
    for record in records:  # each blocks 200 ms; no beat between them
        w.sample = Sample(TOOL_STACK, record)
        w.run(0.2, cpu_share=0.01)
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    assert [blamed for _, blamed in w.events] == records
    assert all(e.kind == "wait" and abs(e.duration_s - 0.2) <= 0.011 for e, _ in w.events)
    assert abs(sum(e.duration_s for e, _ in w.events) - 0.2 * calls) < 1e-6
    assert w.announced == records  # each announced as it held the loop: the offloader counts every one


def test_a_short_sample_of_another_call_inside_a_block_does_not_split_it():
    w = World()
    w.healthy()
    blocker, honest = call("lookup", 1), call("ping", 2)
    start = w.now
    w.sample = Sample(TOOL_STACK, blocker)
    w.run(0.15, cpu_share=0.01)
    w.sample = Sample(TOOL_STACK, honest)  # one look caught an honest call's step
    w.run(0.01, cpu_share=0.01)
    w.sample = Sample(TOOL_STACK, blocker)
    w.run(0.15, cpu_share=0.01)
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert blamed is blocker and event.duration_s == round(w.now - 0.03 - start - 0.01, 6)
    assert w.announced == [blocker]


def test_a_look_as_the_gil_came_back_outside_the_shown_calls_own_code_names_nothing():
    """Another thread took the GIL first and the loop thread ran on, past an honest tool into the framework,
    before the watchdog got it: that look is not where the native call was, so no frame and no call."""
    w = World()
    w.healthy()
    site = "/venv/lib/python3.11/site-packages"
    elsewhere = ((f"{site}/mcp/server/runner.py", 210, "_on_request"),
                 (f"{site}/mcp/server/mcpserver/utilities/func_metadata.py", 653, "_convert_to_content"))
    start = w.now
    w.now += 0.5
    w.cpu += 0.5
    w.sample = Sample(elsewhere, call("ping"))
    w.detector.poll()
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, blamed)] = w.events
    assert (event.kind, event.frames, event.released_at, event.tool, blamed) == ("gil", (), None, None, None)


def test_a_crunch_the_watchdog_kept_looking_at_late_is_cpu_a_loaded_machine_not_the_gil():
    """Every look came 60 ms late (the watchdog waited for a core, not for the GIL): many looks is no GIL."""
    w = World()
    w.healthy()
    start = w.now
    w.sample = Sample(TOOL_STACK, call("crunch"))
    while w.now < start + 1.0:
        w.now += 0.07
        w.cpu += 0.07
        w.detector.poll()
        w.detector._due = w.now  # it meant to look again at once
    w.now += 0.01
    w.beat(lag=w.now - start - 0.01)
    w.healthy(0.03)
    [(event, _)] = w.events
    assert (event.kind, event.tool) == ("cpu", "crunch")


def test_a_look_taken_after_the_loop_beat_again_is_not_a_sample_of_the_block():
    w = World()
    w.healthy()
    start = w.now
    w.now += 0.3
    w.cpu += 0.001

    def late_sampler():  # the loop ran on and beat while the look waited for the GIL
        w.beat(lag=w.now - start)
        return Sample((("/srv/_sentinel.py", 99, "beat"),), None)

    w.detector.sampler = late_sampler
    w.detector.poll()
    w.detector.sampler = lambda: None
    w.healthy(0.03)
    [(event, _)] = w.events
    assert event.frames == () and event.samples == 0


LOOP_ONLY = (("/usr/lib/python3.11/asyncio/runners.py", 118, "run"),)
"""uvloop between callbacks: its dispatch is C, so the leaf is the frame that started the loop (`loop_base`),
and that is all a sample of it keeps."""
CLIENT_STACK = (("/venv/lib/python3.11/site-packages/mcp/client/session.py", 591, "send_request"),)


def test_the_loop_seen_on_its_own_as_a_short_block_ends_leaves_the_block_to_the_call_that_held_it():
    """A crunch just over the threshold on uvloop (bench_blame, 125 ms): the first look, 105 ms in, shows the
    call; the next, right before the sentinel's beat, the loop back in its C dispatch running what was due. One
    sample each: the block is still the call's, not outside any call (with the call's own frames)."""
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.3)
    last_beat = w.now
    record = call("crunch")
    w.sample = Sample(TOOL_STACK, record)
    w.now = last_beat + 0.01 + 0.105  # the timer fired at 100 ms; the crunch let the GIL go 5 ms later
    w.cpu += 0.115
    w.detector.poll()
    w.sample = Sample(LOOP_ONLY, None, loop_only=True)
    w.now += 0.02
    w.cpu += 0.02
    w.detector.poll()
    w.beat(lag=w.now - last_beat - 0.01)
    w.sample = None
    w.beating(0.01)
    w.detector.poll()
    [(event, blamed)] = w.events
    assert blamed is record
    assert (event.kind, event.tool, event.samples) == ("cpu", "crunch", 2)
    assert (event.culprit.file, event.culprit.line) == ("/app/legacy.py", 8)
    assert event.describe().startswith("loop blocked 125 ms [cpu] by tools/call crunch (request 7) at legacy.py:8")


def test_the_loop_seen_on_its_own_through_most_of_a_block_is_the_loops_block_not_a_calls():
    """A C callback held the loop (uvloop shows only the frame that started it); an honest call's step ran
    right before it, at the first look: the loop's own samples vote, and the honest call is not blamed."""
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.3)
    last_beat = w.now
    w.sample = Sample(TOOL_STACK, call("ping"))
    w.now = last_beat + 0.01 + 0.1
    w.cpu += 0.11
    w.detector.poll()
    w.sample = Sample(LOOP_ONLY, None, loop_only=True)
    w.run(0.05, cpu_share=1.0)
    w.now += 0.01
    w.cpu += 0.01
    w.beat(lag=w.now - last_beat - 0.01)
    w.sample = None
    w.beating(0.01)
    w.detector.poll()
    [(event, blamed)] = w.events
    assert (event.tool, blamed) == (None, None)
    assert event.describe().endswith("[cpu] outside any call at runners.py:118 in run")


def test_a_stall_timer_that_fires_early_has_the_first_look_at_the_threshold_not_a_poll_interval_later():
    """Armed at an older beat, the timer fires a few ms before the block crosses the threshold; the watchdog
    looks again right when it does. A crunch that ends 6 ms past the threshold is seen twice, not only its
    aftermath (the client's code, outside any call, running before the beat)."""
    w = World(timer=True)
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.3)
    last_beat = w.now
    record = call("crunch")
    crossed = last_beat + 0.01 + 0.1
    w.detector.sampler = lambda: Sample(TOOL_STACK, record) if w.now <= crossed + 0.006 else Sample(CLIENT_STACK, None)
    w.now = crossed - 0.003  # the timer fires 3 ms early
    w.cpu += 0.107
    wait = w.detector.poll()
    assert not w.detector.blocked
    beat_at = crossed + 0.009
    while w.now + wait <= beat_at + 1e-9:
        w.now += wait
        w.cpu += wait
        wait = w.detector.poll()
    w.now = beat_at
    w.beat(lag=w.now - last_beat - 0.01)
    w.detector.sampler = lambda: None
    w.beating(0.01)
    w.detector.poll()
    [(event, blamed)] = w.events
    assert blamed is record
    assert (event.kind, event.tool) == ("cpu", "crunch")


def _one_late_look(w, record, late, ran, before_look=lambda: None):
    """A block of `record`'s with one look, `late` seconds after the stall timer fired at the threshold, the loop
    thread having run `ran` CPU seconds by then (`before_look` runs then); the loop beats 2 ms later. The events
    reported."""
    w.beating(1.0)
    w.detector.poll()
    w.beating(0.3)
    last_beat = w.now
    w.now = last_beat + 0.01 + 0.1 + late
    w.cpu += ran
    before_look()
    w.sample = Sample(TOOL_STACK, record)
    w.detector.poll()
    w.now += 0.002
    w.cpu += 0.002
    w.beat(lag=w.now - last_beat - 0.01)
    w.sample = None
    w.beating(0.01)
    w.detector.poll()
    return w.events


def test_a_native_call_shorter_than_twice_the_threshold_is_gil_and_named_by_the_look_as_the_gil_came_back():
    """bench_blame's `sum(range(...))` on a quiet machine: 170 ms. The stall timer woke the watchdog at the
    threshold; it got the GIL only as the call returned. Less than half the block, but all of it from when the
    watchdog was due: `gil`, not `cpu`."""
    w = World(timer=True)
    record = call("native")
    # The timer fired 70 ms ago: since then the watchdog waited for the GIL; its look as the GIL came back.
    [(event, blamed)] = _one_late_look(w, record, late=0.07, ran=0.17)
    assert (event.kind, event.tool, blamed) == ("gil", "native", record)
    assert (event.released_at.file, event.released_at.line) == ("/app/legacy.py", 8)


@pytest.mark.parametrize(
    ("queued", "ran", "kind"),
    [(0.001, 0.13, "gil"), (0.03, 0.13, "cpu"), (0.001, 0.09, "cpu")],
    ids=["the-gil", "the-watchdog-waited-for-a-core", "the-loop-thread-was-preempted"],
)
def test_a_look_30_ms_late_is_a_wait_for_the_gil_unless_a_busy_machine_made_it_late(queued, ran, kind):
    """A 130 ms block: the stall timer woke the watchdog at the threshold and its look came 30 ms later. Not
    waiting for a core then (its run-queue time), while the loop thread ran throughout, it waited for the GIL: a
    native call (quiet machine, bench_blame's `sum(range(...))` at 150 ms). The watchdog waiting for a core, or
    the loop thread off its core part of the time (preempted holding the GIL): a busy machine; a crunch, `cpu`."""
    w = World(timer=True)
    own = {"queued": 7.0}
    w.detector.own_queue = lambda: own["queued"]
    w.detector.loop_cpu = lambda: w.cpu
    record = call("native")

    def waited_for_a_core() -> None:
        own["queued"] += queued

    [(event, blamed)] = _one_late_look(w, record, late=0.03, ran=ran, before_look=waited_for_a_core)
    assert (event.kind, event.tool, blamed) == (kind, "native", record)
    assert (event.released_at is not None) == (kind == "gil")
