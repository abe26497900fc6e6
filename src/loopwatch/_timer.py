"""The stall timer: a kernel timer the sentinel keeps pushing forward, so the watchdog sleeps until the loop
really stalls instead of waking to look (Linux timerfd; elsewhere, or with `LOOPWATCH_NO_TIMER=1`, the
watchdog looks once per threshold period).

Measured in place on an in-memory round trip (a long session): a watchdog look costs the call it lands in
about 0.24 ms, and without the timer there are about ten looks a second (0.23% of the loop's time); with it,
one a second for housekeeping, plus the re-arms: a ctypes call of about 13 us, at most every quarter
threshold (0.05%). The timer fires when `interval + threshold` has passed since the last re-arm; the
watchdog then waits out the rest of the threshold itself if the last beat is more recent.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import sys
import threading
from collections.abc import Callable

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class StallTimer:
    """A one-shot monotonic timer (`timerfd`) that fires `delay` seconds after its latest `arm()`.

    `arm` is the bound C call itself (no Python frame of its own); it returns 0, or -1 once the timer is
    closed or broken. The descriptor is closed only by `close()`, on the loop thread once the
    sentinel has stopped, so `arm` never reaches a descriptor number that was reused.
    """

    def __init__(self, delay: float) -> None:
        if not delay > 0:
            raise ValueError(f"a stall timer needs a positive delay, not {delay!r}")
        libc = _libc()
        create, settime = libc.timerfd_create, libc.timerfd_settime  # AttributeError where there is none
        fd = create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        self.fd: int | None = fd
        seconds = int(delay)
        self._spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, max(1, round((delay - seconds) * 1e9))))
        self._off = _Itimerspec(_Timespec(0, 0), _Timespec(0, 0))
        self._settime = settime
        self._off_ref = ctypes.byref(self._off)
        self._lock = threading.Lock()
        # No argtypes: ints, a byref and None convert natively, a third faster than declared types (measured).
        self.arm: Callable[[], int] = functools.partial(settime, fd, 0, ctypes.byref(self._spec), None)
        if self.arm() != 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, os.strerror(errno))

    def disarm(self) -> None:
        """Stop the timer, on the thread that arms it: it fires only after the next `arm()`. An expiry not yet
        read is dropped too (setting a timerfd resets its count), so the descriptor stops being readable."""
        fd = self.fd
        if fd is not None:
            self._settime(fd, 0, self._off_ref, None)

    def clear(self) -> None:
        """Consume an expiry, so the descriptor stops being readable (on the watchdog thread)."""
        with self._lock:  # never a read from a number `close` gave back meanwhile
            fd = self.fd
            if fd is None:
                return
            try:
                os.read(fd, 8)
            except OSError:  # nothing to read (a spurious wake, or re-armed meanwhile)
                pass

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, None
            if fd is None:
                return
            self.arm = _closed
            self._settime(fd, 0, self._off_ref, None)
            os.close(fd)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    """The C library, opened once a process from the symbols already loaded (`find_library` would start an
    `ldconfig` subprocess at every watch start)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _closed() -> int:
    return -1


def stall_timer(delay: float) -> StallTimer | None:
    """A stall timer where the platform has one (Linux) and `LOOPWATCH_NO_TIMER` is not set to a true value
    (`1`, `yes`...), else None."""
    off = os.environ.get("LOOPWATCH_NO_TIMER", "").strip().lower() not in ("", "0", "false", "no", "off")
    if off or not sys.platform.startswith("linux") or not hasattr(select, "poll"):
        return None
    try:
        return StallTimer(delay)
    except (OSError, AttributeError, TypeError, ValueError):
        return None
