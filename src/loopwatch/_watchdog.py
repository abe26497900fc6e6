"""The watchdog: notices, while the loop is still blocked, that the sentinel is late, and samples it.

`Detector.poll()` is the whole decision, fed by injected sources (clock, CPU clock, frame sampler),
so it is tested without threads or sleeps. `Watchdog` is the thin thread that calls it.
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import _fdtable
from ._blame import (
    OFFLOADED_CALLS,
    CallRecord,
    RawFrame,
    Sample,
    call_key,
    culprit_frame,
    is_import,
    is_own,
    richer,
    sample_frame,
    summarize,
)
from ._courier import PRIVATE, Courier, say
from ._events import BlockEvent, BlockKind, Frame
from ._gc import GC_CLOCK
from ._sentinel import Clock, Heartbeat
from ._timer import StallTimer

logger = logging.getLogger("loopwatch")

Sampler = Callable[[], Sample | None]
CpuClock = Callable[[], float | None]
"""Seconds: a thread's CPU time, or its demand for CPU (CPU time plus time runnable but waiting for a core)."""
MAX_SAMPLES = 512
GIL_WAIT = 0.01
"""A look this late, or later, that was not for want of a core is a wait for the GIL (pure Python lets it go
within the 5 ms switch interval of a request; a native call does not)."""
LOOP_RAN = 0.9
"""The share of the time since its last beat the loop thread must have run for such a look to be the GIL's."""
GIL_HANDOFF = 0.001
"""At most this many seconds the loop waits, GIL released, for a due watchdog to take the GIL (about 10 times
a second); it goes on as soon as the watchdog runs (a median 0.18 ms, measured, against 0.33 ms for the fixed
0.2 ms sleep this replaced)."""
START_WAIT = 0.05
"""Seconds `Watchdog.start` waits at most for its thread to be up and asleep (see `start`)."""

CPU_SHARE = 0.5
MIN_WAIT = 0.001
"""Seconds the watchdog waits at least between two looks."""
HOUSEKEEPING = 1.0
"""Seconds between the watchdog's looks while the loop beats, when a stall timer wakes it for blocks."""
IDLE_HOUSEKEEPING = 5.0
"""Seconds between its looks while the sentinel sleeps (the loop is idle): the stall timer, armed again when
the loop wakes, wakes it for a block, and a posted event wakes it at once."""


RUN_SAMPLES = 64
"""Samples kept per run of one call inside a block (the rest are counted)."""
MAX_RUNS = 128
"""Runs kept per block; later ones join the last (a block of more calls back to back than that)."""


@dataclass
class _Run:
    """Consecutive samples of one block that show the same call (or none)."""

    key: int
    call: CallRecord | None
    first: float
    last: float
    count: int = 0
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    used: float = 0.0
    announced: bool = False
    late_looks: int = 0

    def add(self, sample: Sample, now: float) -> None:
        if len(self.samples) < RUN_SAMPLES:
            self.samples.append(sample)
        else:
            self.samples[self.count % RUN_SAMPLES] = sample
        self.count += 1
        self.last = now

    def absorb(self, other: _Run) -> None:
        for sample in other.samples[: max(0, RUN_SAMPLES - len(self.samples))]:
            self.samples.append(sample)
        self.count += other.count
        self.late_looks += other.late_looks
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)
        self.wall += other.wall
        self.used += other.used


@dataclass
class _Block:
    count: int
    samples: list[Sample] = field(default_factory=list)
    honest_calls: dict[int, CallRecord | None] = field(default_factory=dict)
    """The calls seen in samples the watchdog took on time, by call key: bounded however long the block."""
    taken: int = 0
    late_looks: int = 0
    """Samples taken late (the watchdog could not run when due): one per native call that held the GIL."""
    last: tuple[float, float] | None = None
    """(time, demand) at the previous sample."""
    spent: dict[tuple[Any, ...], list[float]] = field(default_factory=dict)
    """Per stack: [seconds of wall time, seconds of CPU demand] between the previous sample and this one."""
    runs: list[_Run] = field(default_factory=list)
    """The samples in order, cut where the call they show changes (calls blocking back to back)."""
    told: set[int] = field(default_factory=set)
    """The calls announced as holding the loop in this block."""
    released: Sample | None = None
    """The first sample taken once the watchdog got the GIL back after waiting for it: CPython drops the GIL
    right after a C call returns, so it shows the call that held it (see `classify`)."""

    def account(self, stack: tuple[Any, ...], now: float, demand: float | None) -> None:
        if demand is not None and self.last is not None:
            wall, used = now - self.last[0], demand - self.last[1]
            if len(self.spent) < MAX_SAMPLES:
                entry = self.spent.setdefault(stack, [0.0, 0.0])
                entry[0] += wall
                entry[1] += used
            if self.runs:
                self.runs[-1].wall += wall
                self.runs[-1].used += used
        self.last = (now, demand) if demand is not None else None

    def add(self, sample: Sample, starved: bool, now: float = 0.0) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(sample)
        else:
            self.samples[self.taken % MAX_SAMPLES] = sample
        self.taken += 1
        self.late_looks += starved
        if starved and self.released is None:
            self.released = sample
        key = call_key(sample.call) if sample.call is not None else 0
        if not starved:
            self.honest_calls[key] = richer(self.honest_calls.get(key), sample.call)
        if not self.runs or (self.runs[-1].key != key and len(self.runs) < MAX_RUNS):
            self.runs.append(_Run(key, sample.call, now, now))
        elif self.runs[-1].key == key:
            self.runs[-1].call = richer(self.runs[-1].call, sample.call)
        self.runs[-1].add(sample, now)
        self.runs[-1].late_looks += starved

    def voters(self) -> list[Sample]:
        """The samples that say who held the loop: all, in order, but those of the loop's own machinery at the
        block's end when they are no more than the rest. That is the loop back from the blocker, running the
        callbacks due before the sentinel's beat ends the block (uvloop's are C: a stack of only the frame
        that started the loop); in a block just over the threshold it can be half the samples. Many of them
        are the loop's own block (a C callback), and they vote."""
        samples = self.samples
        if self.taken > len(samples):  # a ring: the oldest is where the next one goes
            at = self.taken % len(samples)
            samples = samples[at:] + samples[:at]
        tail = 0
        while tail < len(samples) and samples[-1 - tail].loop_only:
            tail += 1
        return samples[:-tail] if 0 < tail and tail * 2 <= len(samples) else samples

    def holder(self, min_span: float) -> CallRecord | None:
        """The call on the loop now, once two samples in a row agree (and, after another call held the loop
        in this block, once it held it `min_span` seconds): with calls blocking back to back, each is told."""
        run = self.runs[-1] if self.runs else None
        if run is None or run.call is None or run.count < 2 or run.announced:
            return None
        if run.key in self.told:
            run.announced = True
            return None
        if len(self.runs) == 1 or run.last - run.first >= min_span:
            run.announced = True
            self.told.add(run.key)
            return run.call
        return None


IDLE_SHARE = 0.05
"""Below this share of the block on (or waiting for) a core, the loop thread was idle: it slept, or waited for
the GIL another thread held (it wakes only to ask for it, every switch interval)."""


GIL_LOOKS = 3
"""At most this many late looks in a `gil` block: a native call holding the GIL lets the watchdog look once,
as it lets go; many late looks are a loaded machine making the watchdog wait for a core."""


def classify(
    duration: float, demand_s: float | None, starved_s: float, importing: bool, gc_s: float = 0.0,
    late_looks: int = 0, watched: float | None = None,
) -> BlockKind:
    """The kind of a block, from the loop thread's demand for CPU and whether the watchdog could run at all.

    Demand is CPU time plus time spent runnable but waiting for a core: on a loaded machine a crunch
    gets less CPU than wall time, but it never sleeps. A block the garbage collector held for half its
    time or more is `gc`, whatever code happened to allocate when the collection began. A block the
    watchdog could not sample through for half its time, while the loop thread was not idle, is `gil`:
    a native call held the GIL (where the watchdog saw too little of the block to measure the demand, a
    loaded machine gives the loop thread only a part of its CPU time, so not idle is all it can say).
    `watched`: the part of the block from when the watchdog was first due to look (the threshold) on, the part
    its looks can tell about; by default the whole block.
    """
    if gc_s * 2 >= duration > 0:
        return "gc"
    if importing:
        return "import"
    if demand_s is None:
        return "unknown"
    busy = demand_s >= CPU_SHARE * duration
    watched = duration if watched is None else watched
    if 0 < starved_s and starved_s * 2 >= watched and demand_s >= IDLE_SHARE * duration and late_looks <= GIL_LOOKS:
        return "gil"
    return "cpu" if busy else "wait"


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class Detector:
    """Decides, one poll at a time, when the loop is blocked and what each finished block was.

    The sentinel's late records are the truth about durations and about the loop thread's CPU time
    through each block. The detector adds what only a second thread can know: samples of the stack
    during the block, and the windows in which the watchdog itself could not run (the GIL was held).
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        *,
        poll_interval: float,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        demand_clock: CpuClock = lambda: None,
        sampler: Sampler = lambda: None,
        gc_time: Callable[[float, float], float] = lambda start, end: 0.0,
        emit: Callable[[BlockEvent, CallRecord | None], None] = lambda e, c: None,
        blocking: Callable[[CallRecord, float, bool, tuple[Any, ...]], None] = lambda c, s, i, st: None,
        include_arguments: bool = False,
        gc_holders: Callable[[float, float], list[tuple[float, int, tuple[Any, ...]]]] = lambda start, end: [],
        tool_home: Callable[[CallRecord], str | None] = lambda call: None,
        loop_thread: int | None = None,
        offloaded_during: Callable[[float, float], list[CallRecord]] = lambda start, end: [],
        loop_cpu: CpuClock = lambda: None,
    ) -> None:
        self.offloaded_during = offloaded_during
        """The offloaded calls that ran between two times of `clock` (`_blame.offloaded_during`)."""
        self.gc_holders = gc_holders
        """Per collection between two times of `clock`: (seconds, the thread that ran it, the offloaded calls
        that thread was running)."""
        self.tool_home = tool_home
        """Where the blamed call's tool function is defined (`_blame.home_of`): the server's own code."""
        self.loop_thread = loop_thread
        self.blocking = blocking
        """Told once per block, while it goes on: the call holding the loop, seconds so far, whether the
        samples so far are inside an import, and the latest sampled stack (raw frames, outermost first)."""
        self.hb = heartbeat
        self.poll_interval = poll_interval
        self.clock, self.wall, self.sampler, self.emit = clock, wall, sampler, emit
        self.demand_clock = demand_clock
        """Read only while a block is sampled: it may cost a syscall that lets the GIL go."""
        self.gc_time = gc_time
        """Seconds the garbage collector ran between two times of `clock`."""
        self.include_arguments = include_arguments
        self.timer = False
        """True while a stall timer wakes the watchdog when the sentinel is `interval + threshold` late: then
        the looks between blocks are only housekeeping, once every `HOUSEKEEPING` seconds."""
        self._last_poll = clock()
        self._due = self._last_poll + poll_interval
        """When the watchdog should next look, at the latest: a look later than that by half the threshold or
        more means it could not run (the GIL was held)."""
        self._starved: deque[tuple[float, float]] = deque(maxlen=64)
        self._block: _Block | None = None
        self.loop_cpu = loop_cpu
        """The loop thread's CPU seconds, read from the watchdog without letting the GIL go."""
        self.own_queue: CpuClock = lambda: None
        """The watchdog thread's seconds runnable but waiting for a core (set on that thread, by `Watchdog`)."""
        self._queued_at: float | None = None

    @property
    def blocked(self) -> bool:
        return self._block is not None

    def poll(self) -> float:
        """Look once; return how long to wait before the next look.

        While the loop beats, the next look is when a block could first cross the threshold (each wake costs
        the loop a GIL handoff), or with a stall timer only for housekeeping. During a block, and once right
        after one, every `poll_interval`.
        """
        count, beat_time = self.hb.beat
        now = self.clock()
        last, self._last_poll = self._last_poll, now
        due = self._due
        if self.timer:
            stalled = self._stall_deadline(beat_time, now)
            if stalled is not None and stalled > last:
                due = min(due, stalled)  # the timer fired then (or will): the watchdog was due to run
        if self._block is None and now - beat_time - self.hb.interval >= self.hb.threshold:
            self._block = _Block(count)
        block = self._block
        sample = None
        if block is not None and block.count == count:
            sample = self.sampler()
            if sample is not None and self.hb.beat[0] != count:
                sample = None  # the loop beat while this look waited for the GIL: it shows what ran after the block
        late = now - due
        queued = self._queued()  # after the look: a read lets the GIL go
        # Late by half the threshold: it could not run (the GIL was held, or a busy machine kept it from a core).
        # Less late, yet not for want of a core (its run-queue time): it waited for the GIL.
        starved = late >= self.hb.threshold / 2 or (
            late >= GIL_WAIT and queued is not None and queued * 2 < late and self._loop_ran(beat_time, now)
        )
        if starved:
            self._starved.append((due, now))  # from when it should have run: before that it slept by choice
        if block is not None and sample is not None:
            block.add(sample, starved, now)
            block.account(sample.stack, now, self.demand_clock())
            self._announce(block, now - beat_time - self.hb.interval, now)
        finished = False
        while self.hb.late:
            self._finish(*self.hb.late.popleft(), now=now)
            finished = True
        wait = self._next_wait(now, beat_time, settle=finished)
        self._due = now + wait
        return wait

    def _loop_ran(self, beat_time: float, now: float) -> bool:
        """Whether the loop thread ran on a core nearly all the time since its last beat: a native call holding
        the GIL does; a GIL holder preempted on a busy machine (the watchdog waited for it, not for a core) not."""
        try:
            cpu = self.loop_cpu()
        except Exception:
            cpu = None
        before = self.hb.cpu_at_beat
        return cpu is not None and before is not None and cpu - before >= LOOP_RAN * (now - beat_time)

    def _queued(self) -> float | None:
        """Seconds the watchdog thread waited for a core since the previous look (None: unknown)."""
        try:
            total = self.own_queue()
        except Exception:
            total = None
        before, self._queued_at = self._queued_at, total
        return None if total is None or before is None else max(0.0, total - before)

    def _stall_deadline(self, beat_time: float, now: float) -> float | None:
        """When the stall timer fired (or fires) for the earliest block not yet reported: its start plus the
        threshold. The oldest late record if there is one, else the stall going on now, if any."""
        hb = self.hb
        try:
            _, end, lag, _ = hb.late[0]
            return end - lag + hb.threshold
        except IndexError:
            pass
        if now - beat_time - hb.interval >= hb.threshold:
            return beat_time + hb.interval + hb.threshold
        return None

    def _announce(self, block: _Block, elapsed: float, now: float) -> None:
        """Tell who holds the loop, once per call holding it in this block (calls can take turns)."""
        run = block.runs[-1] if block.runs else None
        if run is None or run.announced or run.call is None or run.count < 2:
            return
        if self.gc_time(now - elapsed, now) * 2 >= elapsed:
            return  # the collector's so far: no call to tell about yet
        holder = block.holder(self.hb.threshold / 2)
        if holder is not None:
            if len(block.runs) > 1:
                elapsed = now - run.first
            importing = sum(1 for s in run.samples if is_import(s.stack)) * 2 > len(run.samples)
            self.blocking(holder, elapsed, importing, block.samples[-1].stack)

    def first_wait(self) -> float:
        """Seconds before the first look: when a block that starts now could first cross the threshold.

        Not sooner: a look the sentinel has not handed off for costs the loop a GIL convoy of up to the
        switch interval (5 ms), which is what a first look after `poll_interval` did on every start.
        """
        now = self.clock()
        wait = self._next_wait(now, self.hb.beat[1])
        self._due = now + wait
        return wait

    def _next_wait(self, now: float, beat_time: float, settle: bool = False) -> float:
        if self._block is not None or settle:
            return self.poll_interval  # one more look right after a block: what waits on its report goes on
        due = beat_time + self.hb.interval + self.hb.threshold - now
        if self.timer and due > self.hb.threshold / 2:
            # The loop beats (or idles: no beat is due): the stall timer wakes the watchdog if it stops.
            return HOUSEKEEPING if due != math.inf else IDLE_HOUSEKEEPING
        # Right when a block would cross the threshold, not a poll interval later: a stall timer armed at an
        # older beat fires up to a quarter threshold early, and a first look up to 10 ms late missed what held
        # the loop in a block just over the threshold (it saw only what ran after it, before the beat).
        return min(max(due, MIN_WAIT), self.hb.threshold + self.hb.interval)

    def _finish(self, end_count: int, end: float, lag: float, cpu: float | None, *, now: float) -> None:
        block = self._block
        if block is not None and end_count > block.count:
            self._block = None
        else:
            block = _Block(end_count - 1)
        cpu_s = None if cpu is None else min(max(0.0, cpu), lag)
        parts = self._split(block, end - lag, end)
        if parts is None:
            self._report_block(block, end - lag, end, cpu_s, now)
            return
        for run, start, stop in parts:  # calls that blocked back to back, no beat between: each its own block
            share = (stop - start) / lag if lag > 0 else 0.0
            self._report_part(run, start, stop, None if cpu_s is None else cpu_s * share, now)

    def _starved_in(self, start: float, end: float) -> float:
        return sum(overlap(start, end, a, b) for a, b in self._starved)

    def _report_block(self, block: _Block, start: float, end: float, cpu_s: float | None, now: float) -> None:
        lag = end - start
        demand_s = _demand(block, cpu_s, lag)
        starved_s = self._starved_in(start, end)
        gc_s = min(lag, self.gc_time(start, end))
        profile = summarize(block.voters())
        # A native call shorter than twice the threshold held the GIL for less than half the block, but for all
        # of it the watchdog was due to look at: it was `cpu` (bench_blame's sum(range()) of 160-190 ms).
        watched = lag - self.hb.threshold
        # A collection holds the GIL too: the watchdog's wait for it is not a native call's.
        gil_s = max(0.0, starved_s - gc_s)
        kind = classify(lag, demand_s, gil_s, profile.importing, gc_s, block.late_looks, watched)
        kind = self._kind_of_hottest(block, kind)
        common = dict(lag=lag, cpu_s=cpu_s, now=now, end=end, taken=block.taken, gc_s=gc_s)
        elsewhere = self._held_elsewhere(block, kind, lag, demand_s, starved_s, start, end)
        if elsewhere is not None:
            kind, frames, call = elsewhere
            self.emit(self._event(kind, frames=frames, call=call, module=None, offloaded=True, **common), call)
            return
        if kind in ("gil", "gc"):
            # Samples taken after the GIL came back show whatever runs then: the call seen on the loop before
            # the GIL was taken, and, for a native call, the sample taken right as it let the GIL go.
            calls = {key: c for key, c in block.honest_calls.items() if c is not None}
            call = next(iter(calls.values())) if len(calls) == 1 else None
            frames: tuple[Frame, ...] = ()
            released = block.released if kind == "gil" else None
            if released is not None and released.stack and self._in_own_code(released):
                frames = _frames(released.stack)
                call = released.call
            released_at = frames[-1] if frames else None
            self.emit(self._event(kind, frames=frames, call=call, module=None, released_at=released_at, **common), call)
            return
        event = self._event(kind, frames=profile.stack, call=profile.call, module=profile.module, **common)
        self.emit(event, profile.call)

    def _report_part(self, run: _Run, start: float, end: float, cpu_s: float | None, now: float) -> None:
        lag = end - start
        demand_s = lag * min(1.0, max(0.0, run.used / run.wall)) if run.wall > 0 else cpu_s
        gc_s = min(lag, self.gc_time(start, end))
        profile = summarize(run.samples)
        kind = classify(lag, demand_s, self._starved_in(start, end), profile.importing, gc_s, run.late_looks)
        frames = () if kind in ("gil", "gc") else profile.stack
        event = self._event(
            kind, lag=lag, cpu_s=cpu_s, now=now, end=end, frames=frames, call=run.call, taken=run.count,
            module=profile.module if kind == "import" else None, gc_s=gc_s,
        )
        self.emit(event, run.call)

    def _split(self, block: _Block, start: float, end: float) -> list[tuple[_Run, float, float]] | None:
        """Where calls took turns holding the loop in one block: each run of one call with its share of the
        block (cut halfway between the last sample of one and the first of the next). None for one call."""
        runs = self._merged_runs(block)
        if runs is None or len(runs) < 2:
            return None
        cuts = [start, *((a.last + b.first) / 2 for a, b in zip(runs, runs[1:], strict=False)), end]
        return [(run, max(start, cuts[i]), min(end, cuts[i + 1])) for i, run in enumerate(runs)]

    def _merged_runs(self, block: _Block) -> list[_Run] | None:
        """The runs of calls that held the loop long enough to count (half the threshold, two samples); the
        short ones, and samples outside any call, join their neighbour."""
        merged: list[_Run] = []
        pending: _Run | None = None
        for run in block.runs:
            short = run.call is None or run.count < 2 or run.last - run.first < self.hb.threshold / 2
            if short:
                if merged:
                    merged[-1].absorb(run)
                elif pending is None:
                    pending = run
                else:
                    pending.absorb(run)
                continue
            if merged and merged[-1].key == run.key:
                merged[-1].absorb(run)
                continue
            if pending is not None:
                run.absorb(pending)
                pending = None
            merged.append(run)
        return merged or None

    def _held_elsewhere(
        self, block: _Block, kind: BlockKind, lag: float, demand_s: float | None, starved_s: float,
        start: float, end: float,
    ) -> tuple[BlockKind, tuple[Frame, ...], CallRecord] | None:
        """A stall the loop thread did not cause: it waited for the GIL an offloaded call's thread held (the
        watchdog could not run either, and the loop thread did not want a core), or for a collection that
        thread ran. The kind stays `gil` or `gc`; the blame goes to that call."""
        if kind == "gc":
            return self._gc_elsewhere(block, start, end)
        loop_idle = demand_s is not None and demand_s < IDLE_SHARE * lag
        if not 0 < starved_s or starved_s * 2 < lag - self.hb.threshold or not loop_idle:  # as in `classify`
            return None
        sample = block.released or (block.samples[0] if block.samples else None)
        others = [s for s in (sample.elsewhere if sample is not None else ()) if s.call is not None]
        seen = {call_key(s.call): s for s in others if s.call is not None}
        if len(seen) == 1:
            (held,) = seen.values()
            assert held.call is not None
            return "gil", _frames(held.stack), held.call
        ran = {call_key(c): c for c in self.offloaded_during(start, end)}
        if not seen and len(ran) == 1:  # no sample of it in the block (the loop took the GIL back first)
            return "gil", (), next(iter(ran.values()))
        return None  # none, or several offloaded calls at once: the watchdog can't tell which one it was

    def _gc_elsewhere(
        self, block: _Block, start: float, end: float
    ) -> tuple[BlockKind, tuple[Frame, ...], CallRecord] | None:
        by_thread: dict[int, float] = {}
        calls: dict[int, tuple[Any, ...]] = {}
        for seconds, thread, running in self.gc_holders(start, end):
            by_thread[thread] = by_thread.get(thread, 0.0) + seconds
            if running:
                calls[thread] = running
        if not by_thread:
            return None
        thread = max(by_thread, key=by_thread.__getitem__)
        running = calls.get(thread, ())
        if thread == self.loop_thread or len({call_key(c) for c in running}) != 1:
            return None
        call = running[0]
        key = call_key(call)
        seen = [s for sample in block.samples for s in sample.elsewhere if s.call and call_key(s.call) == key]
        return "gc", (_frames(seen[0].stack) if seen else ()), call

    @staticmethod
    def _kind_of_hottest(block: _Block, kind: BlockKind) -> BlockKind:
        """A block can be two in a row (an import, then a sleep): the kind follows the stack reported."""
        if kind not in ("cpu", "wait") or not block.spent:
            return kind
        wall, used = max(block.spent.values(), key=lambda spent: spent[0])
        if wall <= 0 or wall * 2 < sum(w for w, _ in block.spent.values()):
            return kind  # no stack holds most of the block: the whole block's share decides
        return "cpu" if used >= CPU_SHARE * wall else "wait"

    def _event(
        self, kind: BlockKind, *, lag: float, cpu_s: float | None, now: float, end: float,
        frames: tuple[Frame, ...], call: CallRecord | None, taken: int, module: str | None, gc_s: float,
        released_at: Frame | None = None, offloaded: bool = False,
    ) -> BlockEvent:
        start_wall = self.wall() - (now - end) - lag
        home = self._home(call)
        return BlockEvent(
            time=round(start_wall, 6),
            duration_s=round(lag, 6),
            kind=kind,
            tool=call.tool if call else None,
            method=call.method if call else None,
            request_id=None if call is None or call.request_id is None else str(call.request_id),
            session_id=call.session_id() if call else None,
            cpu_s=round(cpu_s or 0.0, 6),
            gc_s=round(gc_s, 6),
            samples=taken,
            frames=frames,
            culprit=culprit_frame(frames, home) if frames else None,
            module=module,
            arguments=call.arguments() if call is not None and self.include_arguments else None,
            released_at=released_at,
            offloaded=offloaded,
        )

    def _in_own_code(self, sample: Sample) -> bool:
        """Whether the look as the GIL came back is in the code of the call it shows (its tool's own frames).
        When another thread took the GIL first, the loop thread may have run on before the watchdog got it:
        into another call, or past the tool into the framework; then it names nothing rather than a wrong line."""
        if sample.call is None:
            return False
        home = self._home(sample.call)  # from where the tool is defined: a stack can't tell (a client in-process)
        return home is not None and any(is_own(file, home) for file, _, _ in sample.stack)

    def _home(self, call: CallRecord | None) -> str | None:
        if call is None:
            return None
        try:
            return self.tool_home(call)
        except Exception:
            return None


def _frames(stack: tuple[RawFrame, ...]) -> tuple[Frame, ...]:
    return tuple(Frame(f, ln, fn) for f, ln, fn in stack)


def _demand(block: _Block, cpu_s: float | None, lag: float) -> float | None:
    """Seconds the loop thread wanted a core during the block: measured over the part the watchdog sampled
    (CPU plus run-queue time: a crunch preempted on a busy machine is still a crunch) when that part is most
    of the block, else its CPU time (a few samples right after the GIL came back say little of the rest)."""
    wall = sum(w for w, _ in block.spent.values())
    if wall > 0 and (wall * 2 >= lag or cpu_s is None):
        return lag * min(1.0, max(0.0, sum(u for _, u in block.spent.values()) / wall))
    if wall > 0 and cpu_s is not None:  # at least what the sampled part wanted
        return max(cpu_s, min(wall, sum(u for _, u in block.spent.values())))
    return cpu_s


def thread_sampler(thread_id: int, base: RawFrame | None = None) -> Sampler:
    """Samples of the loop thread, each with samples of the threads running offloaded calls at that moment
    (one `sys._current_frames()` for all: when the loop waits for the GIL, one of them may hold it). `base`:
    the loop's (`_blame.loop_base`), read on the loop thread."""

    def sample() -> Sample | None:
        if threading.get_ident() not in _fdtable.PRIVATE_THREADS:
            return sampled(None)
        # On a watchdog with a table of its own, no frame it reads is dropped here (`_fdtable.hold`): the
        # loop's `release` waits (for its next beat) until `sampled` has returned and dropped its references.
        with _fdtable.SAMPLING:
            return sampled([])

    def sampled(seen: list[Any] | None) -> Sample | None:
        frames = sys._current_frames()
        frames.pop(threading.get_ident(), None)  # this very frame: in the dict, a cycle of the two
        try:
            loop = sample_frame(frames.get(thread_id), base, seen)
            if loop is None or not OFFLOADED_CALLS:
                return loop
            others = tuple(
                s
                for t in list(OFFLOADED_CALLS)
                if t != thread_id and (s := sample_frame(frames.get(t), None, seen)) is not None
            )
            return replace(loop, elsewhere=others) if others else loop
        finally:
            if seen is not None:
                seen.extend(frames.values())
                _fdtable.hold(seen)

    return sample


def loop_cpu_clock() -> Callable[[], float] | None:
    """For the sentinel, on the loop thread: that thread's CPU seconds (one system call a beat: 0.6 us alone,
    about 4 us in place), or None where the platform has no per-thread CPU clock (then kinds are `unknown`)."""
    try:
        time.pthread_getcpuclockid(threading.get_ident())
        time.thread_time()
    except (AttributeError, OSError):
        return None
    return time.thread_time


def thread_cpu_clock(thread_id: int) -> CpuClock:
    """A thread's CPU seconds from its POSIX CPU clock: one call that keeps the GIL. None where unavailable."""
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):
        return lambda: None

    def read() -> float | None:
        try:
            return time.clock_gettime(clock_id)
        except OSError:  # the thread ended
            return None

    return read


class Schedstat:
    """A thread's CPU plus run-queue seconds from Linux schedstat, through one descriptor kept open: one
    pread a read (opening the file each time costs several GIL handoffs). Close it when done."""

    def __init__(self, native_id: int) -> None:
        self._fd: int | None = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)

    def fileno(self) -> int | None:
        return self._fd

    def __call__(self) -> float | None:
        read = self._read()
        return None if read is None else read[0] + read[1]

    def queued(self) -> float | None:
        """The run-queue seconds alone."""
        read = self._read()
        return None if read is None else read[1]

    def _read(self) -> tuple[float, float] | None:
        """(seconds on a core, seconds runnable but waiting for one), or None."""
        fd = self._fd
        if fd is None:
            return None
        try:
            running, waiting = os.pread(fd, 128, 0).split()[:2]
            return int(running) / 1e9, int(waiting) / 1e9
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def thread_demand_clock(native_id: int) -> Schedstat | None:
    """The loop thread's demand clock, or None where schedstat can't be read (then CPU time stands in)."""
    try:
        clock = Schedstat(native_id)
    except OSError:
        return None
    if clock() is None:
        clock.close()
        return None
    return clock


class _LockSleeper:
    """The watchdog's sleep where there is no stall timer: a held lock, released to wake it."""

    def __init__(self) -> None:
        self._wake = threading.Lock()
        self._wake.acquire()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True if woken by `wake`."""
        return self._wake.acquire(timeout=max(0.0, timeout))

    def wake(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # already released: the watchdog has not gone back to sleep yet
            pass

    def close(self) -> None:
        pass


class _TimerSleeper:
    """The watchdog's sleep with a stall timer: `poll` on the timer's descriptor and a wake-up pipe.

    Any thread may `wake`; only the watchdog waits and closes (the pipe's write end is used under a lock,
    so a write never reaches a descriptor number reused after the close). A watchdog with a descriptor table
    of its own (`private`) holds copies of the pipe's two ends, under the same numbers: it closes its copies,
    and the thread that stops it the process's (`close_shared`).
    """

    private = False
    owner: int | None = None
    _closed: frozenset[str] = frozenset()
    """The tables ("own", "shared") whose copies of the pipe are closed, with a table of its own."""

    def __init__(self, timer: StallTimer) -> None:
        self.timer = timer
        self._read, self._write = os.pipe()  # OSError (no descriptor left): the caller sleeps on a lock instead
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)
        self._timer_fd = timer.fd
        self._ready: list[int] = []
        if self._timer_fd is not None:
            self._poll.register(self._timer_fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        self._drain()
        if self._timer_fd is not None and self.timer.fd is None:
            self._drop_timer()  # closed: a closed descriptor would make every poll return at once
        self._ready = [fd for fd, _ in self._poll.poll(max(0.0, timeout) * 1000.0)]
        return self._read in self._ready

    def _drain(self) -> None:
        """Consume the wake-ups of the last `wait`, only now, after the look they woke the watchdog for: a read
        lets the GIL go, and the loop thread, just back from a native call that held it, would run on and beat
        before the look (the one sample that shows the call's line was then taken too late, and dropped)."""
        ready, self._ready = self._ready, []
        for fd in ready:
            if fd == self._read:
                try:
                    os.read(self._read, 512)
                except OSError:
                    pass
            else:
                self.timer.clear()

    def _drop_timer(self) -> None:
        fd, self._timer_fd = self._timer_fd, None
        try:
            self._poll.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def descriptors(self) -> set[int]:
        return {fd for fd in (self._read, self._write, self._timer_fd) if fd is not None and fd >= 0}

    def _side(self) -> str:
        return "own" if self.private and threading.get_ident() == self.owner else "shared"

    def wake(self) -> None:
        with self._lock:
            if self._write < 0 or self._side() in self._closed:
                return
            try:
                os.write(self._write, b"w")
            except OSError:  # the pipe is full: a wake-up is already waiting
                pass

    def close(self) -> None:
        """On the watchdog thread, as it ends: its copies (the only ones, without a table of its own)."""
        with self._lock:
            if self.private:
                if "own" in self._closed:
                    return
                self._closed = self._closed | {"own"}
                fds = (self._read, self._write)
            else:
                fds = (self._read, self._write)
                self._read, self._write = -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def close_shared(self) -> None:
        """From the thread that stopped the watchdog, once it ended: the process's copies of a watchdog that
        had a table of its own (nothing otherwise: the watchdog closed the only ones)."""
        with self._lock:
            if not self.private or "shared" in self._closed:
                return
            self._closed = self._closed | {"shared"}
            fds = (self._read, self._write)
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class Watchdog:
    """A daemon thread that polls the detector and runs housekeeping. It never waits on the loop.

    With a stall timer (Linux), it sleeps until the timer says the sentinel is late, or until housekeeping
    is due; without one, it looks once per threshold period.
    """

    def __init__(
        self,
        detector: Detector,
        housekeeping: Callable[[], None] = lambda: None,
        watched: Callable[[], bool] = lambda: True,
        timer: StallTimer | None = None,
        courier: Courier | None = None,
    ) -> None:
        self.detector = detector
        self.courier = courier
        """With one, the thread takes a descriptor table of its own (`_fdtable`) and hands the courier what must
        run in the process's table (its own log lines here; the monitor's listeners and hooks)."""
        self.private = False
        """True once the thread has its own descriptor table."""
        self.housekeeping = housekeeping
        self.watched = watched
        """False once the watched loop is gone (closed, or its thread ended) though nobody stopped the watch."""
        self._stop = threading.Event()
        self._sleeper: _LockSleeper | _TimerSleeper = _LockSleeper()
        if timer is not None:
            try:
                self._sleeper = _TimerSleeper(timer)
            except OSError:  # no descriptor for the wake-up pipe: look on a schedule, without the timer
                timer = None
        self.timer = timer
        """Re-armed by the sentinel every quarter threshold (`handoff`); owned, and closed, by whoever made it."""
        detector.timer = timer is not None
        self._late = detector.hb.late
        self._running = threading.Lock()
        """Held, except from the moment a watchdog woken by the sentinel runs until the sentinel sees it."""
        self._running.acquire()
        self._thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._asleep = threading.Event()
        """Set by the thread right before its first sleep (`start` waits for it)."""
        self._failures = 0
        self.steps = 0
        """Completed polls: a reader that saw it move twice knows everything before was handled."""
        self.due_at = float("inf")
        """Monotonic time of the next poll: from then on the watchdog waits for the GIL (see `handoff`)."""
        self._handed_off_for = 0.0
        self._beat_interval = detector.hb.interval
        self._rearm_every = detector.hb.threshold / 4
        self._rearm_at = 0.0

    def start(self) -> None:
        self._thread.start()
        # Wait (with the GIL released) until the thread is up and asleep, at most START_WAIT: left to start
        # beside a loop that is already busy, it took the GIL back after each step of its start-up, and the
        # loop's calls ran 12-16% slower for the whole session after it (bench_overhead.py's announce-off
        # line; the announcement's own wait at start hid it where the announcement runs).
        self._asleep.wait(min(START_WAIT, self.detector.hb.threshold / 2))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._sleeper.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive() and isinstance(self._sleeper, _TimerSleeper):
            self._sleeper.close_shared()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def poke(self) -> None:
        """Have the watchdog look now (from any thread): an event is waiting to go out, or a test settles."""
        self._sleeper.wake()

    def handoff(self, now: float) -> None:
        """Called by the sentinel on the loop at each beat. It pushes the stall timer forward, if there is one.

        A busy loop thread drops the GIL at every iteration and takes it back before a waiting thread is
        scheduled, which resets that thread's switch timeout: a watchdog woken by its own timer waited for the
        GIL for milliseconds (6 ms median, measured) while every loop iteration paid to wake it. So at the last
        beat before the watchdog is due, the sentinel wakes it and waits with the GIL released until the
        watchdog runs (it says so first thing), so the watchdog runs in step with the beats. While the loop is
        blocked there are no beats, and the watchdog's own timer (or the stall timer) wakes it."""
        if self._late:
            # A late beat: a block just ended. Re-arming clears an expiry the watchdog may not have read yet
            # (it fired during a step), so say it directly: the block is reported now, not at the next look.
            self._sleeper.wake()
        timer = self.timer
        if timer is not None and now >= self._rearm_at:
            # Not at every beat: a re-arm costs the loop about 13 us (a ctypes call, cold; measured in place).
            # Armed from an older beat, the timer fires up to a quarter threshold early on a stall; the
            # watchdog then waits out the rest itself (`Detector._next_wait`), so a block is caught on time.
            self._rearm_at = now + self._rearm_every
            if timer.arm() != 0:
                self._lose_timer()
        due = self.due_at
        if now >= due - self._beat_interval and self._handed_off_for != due:
            self._handed_off_for = due
            self._sleeper.wake()
            self._running.acquire(timeout=GIL_HANDOFF)

    def pause(self) -> None:
        """The sentinel stops beating (the loop is idle): the stall timer is disarmed, so it wakes nobody; the
        next `handoff` (the loop woke) arms it again at once."""
        self._rearm_at = 0.0
        timer = self.timer
        if timer is not None:
            timer.disarm()

    def _lose_timer(self) -> None:
        """The timer stopped working (it was closed under a running sentinel): look on a schedule again."""
        if self.timer is not None:
            self.timer = None
            self.detector.timer = False
            logger.warning("the stall timer failed; the watchdog looks every threshold period instead")
            self._sleeper.wake()

    def _go_private(self) -> None:
        """A descriptor table of the thread's own, keeping what it reads: its pipe, the stall timer, the
        loop thread's schedstat. Descriptors it opens later (its own schedstat) are its table's alone."""
        courier = self.courier
        if courier is None or not _fdtable.wanted():
            return
        keep = set(self._sleeper.descriptors()) if isinstance(self._sleeper, _TimerSleeper) else set()
        fileno = getattr(self.detector.demand_clock, "fileno", None)
        if fileno is not None and (fd := fileno()) is not None:
            keep.add(fd)
        GC_CLOCK.acquire()  # its callback puts off the collections this thread would run (`_fdtable`)
        if not _fdtable.go_private(keep):
            GC_CLOCK.release()
        else:
            if isinstance(self._sleeper, _TimerSleeper):
                self._sleeper.owner = threading.get_ident()
                self._sleeper.private = True
            courier.barred = threading.get_ident()
            PRIVATE[courier.barred] = courier
            self.private = True

    def _run(self) -> None:
        self._go_private()
        own = thread_demand_clock(threading.get_native_id())
        if own is not None:
            self.detector.own_queue, self.detector._queued_at = own.queued, None
        try:
            wait = self.detector.first_wait()
            self.due_at = time.monotonic() + wait
            self._asleep.set()
            while True:
                if self._sleeper.wait(wait):
                    try:
                        self._running.release()  # the sentinel waits for this (or gave up: its next wait is free)
                    except RuntimeError:
                        pass
                if self._stop.is_set():
                    break
                if not self.watched():
                    say(logging.WARNING, "the watched loop closed without ending the watch; the watchdog stops")
                    break
                wait = self._step()
                self.due_at = time.monotonic() + wait
            self.due_at = float("inf")
            self._step()
        finally:
            self._sleeper.close()
            if self.private and self.courier is not None:
                PRIVATE.pop(threading.get_ident(), None)
                if isinstance(self._sleeper, _TimerSleeper):  # the process's copies: closed in its table,
                    self.courier.submit(self._sleeper.close_shared)  # if `stop` gave up waiting for this thread
                self.courier.finish()
            if own is not None:
                self.detector.own_queue = lambda: None
                own.close()
            if self.private:  # last: collections until here are put off
                _fdtable.leave()
                GC_CLOCK.release()

    def _step(self) -> float:
        try:
            wait = self.detector.poll()
            self.housekeeping()
            self.steps += 1
            return wait
        except Exception as exc:
            self._failures += 1
            if self._failures <= 3 or self._failures % 1000 == 0:
                say(logging.ERROR, "watchdog step failed (%d so far); it goes on", self._failures, exc_info=exc)
            return self.detector.poll_interval
