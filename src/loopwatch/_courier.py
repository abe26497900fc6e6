"""The courier: runs, on a thread of the process's descriptor table, what a watchdog with a table of its own
(`_fdtable`) must not: listeners, log lines, hooks that may write a file or a socket.

Its thread is there while the loop is not hot, parked on an event (it costs nothing then: the loop makes few
system calls), and leaves while the loop runs flat out, where any second thread of the table would cost the
loop a reference count at each system call. A job submitted while it is away waits, and the first thread of
the table that can starts it again: the loop at its next beat, any other thread at once, or, while the loop
is stuck in Python code, the loop thread itself through a pending call (`Py_AddPendingCall`, run between
two bytecodes of the main thread). A job that waits for a loop stuck in a native call goes out when the
loop comes back.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._fdtable import PRIVATE_THREADS

logger = logging.getLogger("loopwatch")

Job = Callable[[], None]
HOT_SHARE = 0.9
"""The loop thread's share of a core, over its last second, from which the courier leaves."""
PRIVATE: dict[int, Courier] = {}
"""Thread id of each thread with a descriptor table of its own (the watchdog, `LOOPWATCH_PRIVATE_FDS=1`) -> courier."""


def say(level: int, message: str, *args: Any, **kwargs: Any) -> None:
    """A log line from any thread: from a thread with a table of its own, through its courier (a handler
    may open its file there, in the wrong table); dropped on such a thread without one."""
    thread = threading.get_ident()
    courier = PRIVATE.get(thread)
    if courier is None:
        if thread not in PRIVATE_THREADS:
            logger.log(level, message, *args, **kwargs)
    else:
        courier.submit(lambda: logger.log(level, message, *args, **kwargs))


class Courier:
    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._retiring = False
        self._closed = False
        self.pending = False
        """Jobs wait and no courier thread is up: the next thread of the process's table starts one."""
        self.barred: int | None = None
        """The thread (the watchdog with a table of its own) that must never start the courier's."""

    @property
    def alive(self) -> bool:
        return self._thread is not None

    def submit(self, job: Job) -> None:
        self._jobs.append(job)
        with self._lock:
            if self._thread is not None:
                self._wake.set()
                return
            self.pending = True
        if not self._is_barred():
            self.ensure()
        else:
            _ask_main_thread(self)

    def _is_barred(self) -> bool:
        """On a thread that must never start the courier's: one with a table of its own (its threads would
        share that table)."""
        thread = threading.get_ident()
        return thread == self.barred or thread in PRIVATE_THREADS

    def nudge(self) -> None:
        """From the watchdog, at each look: jobs still wait for a courier thread, ask the main thread again."""
        if self.pending:
            _ask_main_thread(self)

    def ensure(self, blocking: bool = True) -> bool:
        """Have the courier's thread up (from any thread of the process's table): the loop is not hot, or
        jobs wait. Not `blocking`: False, and nothing done, if its lock is held (a pending call, which may
        have interrupted the holder)."""
        if not self._lock.acquire(blocking):
            return False
        try:
            self._retiring = False
            if self._thread is not None or (self._closed and not self._jobs):
                return True
            thread = threading.Thread(target=self._run, name="loopwatch-courier", daemon=True)
            self._thread, self.pending = thread, False
        finally:
            self._lock.release()
        thread.start()
        self._wake.set()
        return True

    def retire(self) -> None:
        """The loop is hot: the thread leaves once nothing waits."""
        with self._lock:
            if self._thread is None or self._retiring:
                return
            self._retiring = True
        self._wake.set()

    def finish(self) -> None:
        """From any thread, waiting for nothing: no more jobs come (the watchdog ended); the thread runs what
        waits and leaves."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if self.pending:
            if not self._is_barred():
                self.ensure()
            else:
                _ask_main_thread(self)

    def close(self, timeout: float = 2.0) -> None:
        """At the end of the watch, on a thread of the process's table: the thread leaves, and whatever still
        waits runs here."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._drain()
        self.pending = False
        with _ASKED_LOCK:
            _ASKED.discard(self)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._drain()
            with self._lock:
                if (self._retiring or self._closed) and not self._jobs:
                    self._thread = None
                    return

    def _drain(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                return
            try:
                job()
            except Exception:
                logger.exception("a delivery of the watchdog's raised; it goes on")  # on a thread of the process's


def _ask_main_thread(courier: Courier) -> None:
    """From the watchdog (again at each of its looks while jobs wait): have the main thread start `courier`
    between two bytecodes, while the loop is stuck in Python code (the watchdog, in a table of its own, cannot
    start a thread of the process's). One C callback for the process, never freed: a pending call may run
    after its courier is gone."""
    global _QUEUED
    with _ASKED_LOCK:
        _ASKED.add(courier)
        if _QUEUED:
            return  # one pending call is on its way: it starts every courier asked for
        _QUEUED = True
    if not _add_pending():
        with _ASKED_LOCK:
            _QUEUED = False  # no pending calls here (or their queue is full): the loop's next beat starts it


_ASKED: set[Courier] = set()
_QUEUED = False
"""A pending call is queued and has not run yet (under `_ASKED_LOCK`)."""
_ASKED_LOCK = threading.Lock()
_CALLBACK = None
_PLAIN_LOCK = type(threading.Lock())


def _start_asked(_arg: object) -> int:
    """The pending call, on the main thread between two of its bytecodes. It takes no lock that code it
    interrupted may hold: where one is held it does nothing, and the watchdog asks again at its next look."""
    global _QUEUED
    try:
        limbo = getattr(threading, "_active_limbo_lock", None)
        if sys.is_finalizing() or not _ASKED_LOCK.acquire(False):
            _QUEUED = False  # this one did nothing: the watchdog's next `ask` queues another
            return 0
        try:
            couriers = list(_ASKED)
            _ASKED.clear()
            _QUEUED = False
        finally:
            _ASKED_LOCK.release()
        for courier in couriers:
            if not courier.pending or threading.get_ident() == courier.barred:
                continue
            if isinstance(limbo, _PLAIN_LOCK) and limbo.locked():
                continue  # Thread.start would wait for it (an RLock, as in 3.11 to 3.13, it takes again)
            courier.ensure(blocking=False)
    except Exception:  # never an exception out of a pending call: it would surface in the server's code
        pass
    return 0


def _add_pending() -> bool:
    global _CALLBACK
    try:
        add = ctypes.pythonapi.Py_AddPendingCall
        if _CALLBACK is None:
            add.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            add.restype = ctypes.c_int
            _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(_start_asked)
        return add(ctypes.cast(_CALLBACK, ctypes.c_void_p), None) == 0
    except (AttributeError, OSError, ValueError):
        return False
