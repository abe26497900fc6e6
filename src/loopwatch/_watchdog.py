"""The watchdog: notices, while the loop is still blocked, that the sentinel is late, and samples it.

`Detector.poll()` is the whole decision, fed by injected sources (clock, CPU clock, frame sampler),
so it is tested without threads or sleeps. `Watchdog` is the thin thread that calls it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ._blame import CallRecord, Sample, call_key, culprit_frame, sample_frame, summarize
from ._events import BlockEvent, BlockKind
from ._sentinel import Clock, Heartbeat

logger = logging.getLogger("loopwatch")

Sampler = Callable[[], Sample | None]
CpuClock = Callable[[], float | None]
MAX_SAMPLES = 512
CPU_SHARE = 0.5


@dataclass
class _Block:
    count: int
    samples: list[Sample] = field(default_factory=list)
    honest_calls: list[CallRecord | None] = field(default_factory=list)
    taken: int = 0

    def add(self, sample: Sample, starved: bool) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(sample)
        else:
            self.samples[self.taken % MAX_SAMPLES] = sample
        self.taken += 1
        if not starved:
            self.honest_calls.append(sample.call)


def classify(duration: float, cpu_s: float | None, starved_s: float, importing: bool) -> BlockKind:
    """The kind of a block, from the loop thread's CPU time and whether the watchdog could run at all."""
    if importing:
        return "import"
    if cpu_s is None:
        return "unknown"
    busy = cpu_s >= CPU_SHARE * duration
    if busy and starved_s >= duration / 2:
        return "gil"
    return "cpu" if busy else "wait"


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class Detector:
    """Decides, one poll at a time, when the loop is blocked and what each finished block was.

    The sentinel's late records are the truth about durations. The detector adds what only a
    second thread can know: samples of the stack during the block, the loop thread's CPU time
    at each beat, and the windows in which the watchdog itself could not run (the GIL was held).
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        *,
        poll_interval: float,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        cpu_clock: CpuClock = lambda: None,
        sampler: Sampler = lambda: None,
        emit: Callable[[BlockEvent, CallRecord | None], None] = lambda e, c: None,
        include_arguments: bool = False,
    ) -> None:
        self.hb = heartbeat
        self.poll_interval = poll_interval
        self.clock, self.wall, self.cpu_clock, self.sampler, self.emit = clock, wall, cpu_clock, sampler, emit
        self.include_arguments = include_arguments
        self._last_poll = clock()
        count = heartbeat.beat[0]
        self._cpu_at: deque[tuple[int, float | None]] = deque([(count, cpu_clock())], maxlen=64)
        self._starved: deque[tuple[float, float]] = deque(maxlen=64)
        self._block: _Block | None = None

    @property
    def blocked(self) -> bool:
        return self._block is not None

    def poll(self) -> None:
        now = self.clock()
        gap, self._last_poll = now - self._last_poll, now
        starved = gap - self.poll_interval >= self.hb.threshold / 2
        if starved:
            self._starved.append((now - gap, now))
        count, beat_time = self.hb.beat
        cpu = self.cpu_clock()
        if count != self._cpu_at[-1][0] and now - beat_time < self.hb.threshold / 2:
            # Only a reading taken soon after its beat is a fair baseline for a block that follows it.
            self._cpu_at.append((count, cpu))
        if self._block is None and now - beat_time - self.hb.interval >= self.hb.threshold:
            self._block = _Block(count)
        block = self._block
        if block is not None and block.count == count:
            sample = self.sampler()
            if sample is not None:
                block.add(sample, starved)
        while self.hb.late:
            self._finish(*self.hb.late.popleft(), now=now, cpu=cpu)

    def _finish(self, end_count: int, end: float, lag: float, *, now: float, cpu: float | None) -> None:
        block = self._block
        if block is not None and end_count > block.count:
            self._block = None
        else:
            block = _Block(end_count - 1)
        cpu0 = self._cpu_before(end_count)
        cpu_s = None if cpu is None or cpu0 is None else min(max(0.0, cpu - cpu0), lag)
        starved_s = sum(overlap(end - lag, end, a, b) for a, b in self._starved)
        profile = summarize(block.samples)
        kind = classify(lag, cpu_s, starved_s, profile.importing)
        if kind == "gil":
            # Samples taken after the GIL came back show whatever runs then: keep only the call,
            # and only when the watchdog saw it on the loop before the GIL was taken.
            calls = {call_key(c): c for c in block.honest_calls if c is not None}
            call = next(iter(calls.values())) if len(calls) == 1 else None
            self.emit(self._event(kind, lag, cpu_s, now, end, (), call, block.taken, None), call)
            return
        call = profile.call
        self.emit(self._event(kind, lag, cpu_s, now, end, profile.stack, call, block.taken, profile.module), call)

    def _cpu_before(self, end_count: int) -> float | None:
        """The loop thread's CPU time at the last beat before the block (the first one seen, if none)."""
        best = self._cpu_at[0][1]
        for count, cpu in self._cpu_at:
            if count >= end_count:
                break
            best = cpu
        return best

    def _event(self, kind, lag, cpu_s, now, end, frames, call: CallRecord | None, taken, module) -> BlockEvent:
        start_wall = self.wall() - (now - end) - lag
        return BlockEvent(
            time=round(start_wall, 6),
            duration_s=round(lag, 6),
            kind=kind,
            tool=call.tool if call else None,
            method=call.method if call else None,
            request_id=None if call is None or call.request_id is None else str(call.request_id),
            session_id=call.session_id() if call else None,
            cpu_s=round(cpu_s or 0.0, 6),
            samples=taken,
            frames=frames,
            culprit=culprit_frame(frames) if frames else None,
            module=module,
            arguments=call.arguments() if call is not None and self.include_arguments else None,
        )


def thread_sampler(thread_id: int) -> Sampler:
    def sample() -> Sample | None:
        return sample_frame(sys._current_frames().get(thread_id))

    return sample


def thread_cpu_clock(thread_id: int) -> CpuClock:
    """The CPU time of one thread, where the platform can read it; None elsewhere."""
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):
        return lambda: None

    def read() -> float | None:
        try:
            return time.clock_gettime(clock_id)
        except OSError:
            return None

    return read


class Watchdog:
    """A daemon thread that polls the detector and runs housekeeping. It never waits on the loop."""

    def __init__(self, detector: Detector, housekeeping: Callable[[], None] = lambda: None) -> None:
        self.detector = detector
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._failures = 0
        self.steps = 0
        """Completed polls: a reader that saw it move twice knows everything before was handled."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        interval = self.detector.poll_interval
        while not self._stop.wait(interval):
            self._step()
        self._step()

    def _step(self) -> None:
        try:
            self.detector.poll()
            self.housekeeping()
            self.steps += 1
        except Exception:
            self._failures += 1
            if self._failures <= 3 or self._failures % 1000 == 0:
                logger.exception("loopwatch watchdog step failed (%d so far); it goes on", self._failures)
