"""The watchdog's descriptor table of its own (Linux), and the courier that runs what needs the process's.

A thread that shares the process's table makes the kernel count a reference at each of the loop's system
calls (the hot-loop floor, benchmarks/bench_hot_loop.py); the watchdog takes a copy and closes in it all
but what it reads. These tests check what that must not break: a peer still sees its EOF, the process's
POSIX locks stay, a listener that opens a file opens it in the process's table, and the courier that runs
such listeners comes and goes with the loop's load, and is started even while the loop is stuck.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import anyio
import pytest

import loopwatch
from loopwatch import _fdtable
from loopwatch._courier import Courier

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="unshare(CLONE_FILES) is Linux's")
async_test = pytest.mark.anyio


@pytest.fixture
def private(monkeypatch):
    """The watchdog takes a table of its own (opt-in: LOOPWATCH_PRIVATE_FDS=1)."""
    monkeypatch.setenv("LOOPWATCH_PRIVATE_FDS", "1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


async def _private_watchdog(monitor):
    watchdog = monitor._watchdog
    deadline = time.monotonic() + 10
    while not watchdog.private and time.monotonic() < deadline:
        await anyio.sleep(0.01)
    assert watchdog.private
    return watchdog


def _in_private_thread(body):
    """Run `body()` on a thread that went private first; return what it returned (or raise what it raised)."""
    out: dict = {}

    def run():
        try:
            out["private"] = _fdtable.go_private(())
            out["value"] = body()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        finally:
            _fdtable.leave()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    assert out["private"] is True
    return out["value"]


def _open_here(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fds_of(thread: threading.Thread) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/self/task/{thread.native_id}/fd")}


@pytest.fixture(params=["close_range", "listing"])
def closing(request, monkeypatch):
    """Both ways of closing the copy: close_range(2), and the listing of the thread's table without it."""
    if request.param == "listing":
        monkeypatch.setattr(_fdtable, "_close_ranges", lambda kept: False)
    return request.param


def test_a_socket_the_process_closes_after_the_copy_still_reaches_its_peer_as_eof(closing):
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    gone = threading.Event()
    keep = threading.Event()

    def body():
        gone.set()
        keep.wait(10)  # the private thread stays alive while the process closes its end

    thread = threading.Thread(target=lambda: (_fdtable.go_private(()), body()))
    thread.start()
    try:
        assert gone.wait(5)
        assert ours.fileno() not in _fds_of(thread)
        ours.close()
        assert peer.recv(1) == b""  # EOF, though the thread that took a copy of the table is still alive
    finally:
        keep.set()
        thread.join(10)
        peer.close()


def test_the_copy_keeps_only_what_it_was_told_to_keep(closing):
    kept_r, kept_w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        def body():
            listed = {int(fd) for fd in os.listdir("/proc/thread-self/fd")}
            return {fd for fd in listed if _open_here(fd)}  # not the listing's own, closed as it returned

        out: dict = {}

        def run():
            out["private"] = _fdtable.go_private({kept_r})
            out["fds"] = body()

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(10)
        assert out["private"]
        assert out["fds"] == {0, 1, 2, kept_r}
    finally:
        for fd in (kept_r, kept_w, other_r, other_w):
            os.close(fd)


def test_the_copy_closing_its_descriptor_leaves_the_process_posix_lock_held(tmp_path):
    path = tmp_path / "locked"
    path.write_text("x")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        _in_private_thread(lambda: None)  # it closed its copy of `fd` (a close drops the closer's own locks)
        probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    print('held')\n"
                 "else:\n    print('free')\n")
        result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "held"
    finally:
        os.close(fd)


def test_the_private_thread_blocks_every_signal_so_the_process_s_go_to_a_thread_of_its_table():
    """A signal handled there would write asyncio's wake-up byte (`signal.set_wakeup_fd`, a number of the
    process's table) into the thread's own table, and an idle loop would sleep through Ctrl-C."""
    blocked = _in_private_thread(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, []))
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1} <= set(blocked)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread is untouched


def test_the_private_table_keeps_standard_error_and_points_standard_output_at_dev_null():
    def body():
        return os.readlink("/proc/thread-self/fd/1"), os.readlink("/proc/thread-self/fd/2")

    out, err = _in_private_thread(body)
    assert out == os.devnull
    assert err == os.readlink("/proc/self/fd/2")


@pytest.mark.parametrize("value", [None, "", "0", "false", "off"])
@async_test
async def test_by_default_and_with_loopwatch_private_fds_0_the_watchdog_shares_the_process_table(monkeypatch, value):
    """Off unless asked for (`_fdtable`'s docstring says why)."""
    if value is None:
        monkeypatch.delenv("LOOPWATCH_PRIVATE_FDS", raising=False)
    else:
        monkeypatch.setenv("LOOPWATCH_PRIVATE_FDS", value)
    async with loopwatch.watch(threshold=0.05, log_blocks=False) as monitor:
        await anyio.sleep(0.05)
        watchdog = monitor._watchdog
        assert monitor._courier is None and not watchdog.private
        assert watchdog._thread.ident not in _fdtable.PRIVATE_THREADS
        ours, peer = socket.socketpair()  # opened now: the watchdog sees it, one table
        try:
            assert os.readlink(f"/proc/self/task/{watchdog._thread.native_id}/fd/{ours.fileno()}") == os.readlink(
                f"/proc/self/fd/{ours.fileno()}")
        finally:
            ours.close()
            peer.close()


@async_test
async def test_loopwatch_private_fds_1_gives_the_watchdog_a_table_of_its_own_until_it_ends(private):
    async with loopwatch.watch(threshold=0.05, log_blocks=False) as monitor:
        watchdog = await _private_watchdog(monitor)
        assert monitor._courier is not None
        assert watchdog._thread.ident in _fdtable.PRIVATE_THREADS
    assert watchdog._thread.ident not in _fdtable.PRIVATE_THREADS  # it left as it ended


@async_test
async def test_the_watchdog_reads_in_a_table_of_its_own_and_sockets_the_loop_closes_close(private):
    async with loopwatch.watch(threshold=0.05, log_blocks=False) as monitor:
        watchdog = await _private_watchdog(monitor)
        ours, peer = socket.socketpair()  # opened after the watch started: not in the watchdog's table
        assert ours.fileno() not in _fds_of(watchdog._thread) or os.readlink(
            f"/proc/self/task/{watchdog._thread.native_id}/fd/{ours.fileno()}") != os.readlink(
            f"/proc/self/fd/{ours.fileno()}")
        ours.close()
        peer.settimeout(5)
        assert peer.recv(1) == b""
        peer.close()
        time.sleep(0.2)  # a block, still caught and timed by the watchdog in its own table
        await anyio.sleep(0.3)
    blocks = [e for e in monitor.recent if e.kind != "gc"]
    assert len(blocks) == 1 and 0.15 <= blocks[0].duration_s <= 0.5


@async_test
async def test_a_log_handler_that_opens_its_file_at_the_first_block_opens_it_in_the_process_table(tmp_path, private):
    """A handler opening its file lazily on the watchdog's own table would leave the stream's descriptor
    number pointing elsewhere for every other thread: the loop's own log lines would be lost or, worse,
    written into another file of the process."""
    path = tmp_path / "loopwatch.log"
    handler = logging.FileHandler(path, delay=True)
    log = logging.getLogger("loopwatch")
    log.addHandler(handler)
    try:
        async with loopwatch.watch(threshold=0.05) as monitor:
            await _private_watchdog(monitor)
            time.sleep(0.2)
            deadline = time.monotonic() + 10
            while handler.stream is None and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            assert handler.stream is not None, "the block's line never reached the handler"
            fd = handler.stream.fileno()
            assert os.path.samefile(f"/proc/self/fd/{fd}", path)  # the process's table: the loop can write it
            log.warning("a line from the loop thread")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = path.read_text()
    assert "loop blocked" in text and "a line from the loop thread" in text


def test_the_courier_runs_what_the_barred_thread_hands_it_once_another_thread_starts_it():
    courier = Courier()
    ran: list[str] = []
    handed = threading.Event()

    def barred():
        courier.barred = threading.get_ident()
        courier.submit(lambda: ran.append(threading.current_thread().name))
        if not courier.alive and courier.pending:  # it started nothing itself (the main thread is in join())
            handed.set()

    thread = threading.Thread(target=barred)
    thread.start()
    thread.join(10)
    assert handed.is_set()
    courier.ensure()  # the loop's next beat (or the pending call, once the main thread runs Python again)
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == ["loopwatch-courier"] and not courier.pending
    courier.retire()
    deadline = time.monotonic() + 10
    while courier.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not courier.alive
    courier.close()


def test_closing_the_courier_runs_what_still_waits_on_the_caller():
    courier = Courier()
    ran: list[int] = []
    courier.barred = threading.get_ident()  # as the watchdog: submit() starts no thread
    courier.submit(lambda: ran.append(threading.get_ident()))
    assert ran == [] and not courier.alive
    courier.close()
    assert ran == [threading.get_ident()]


def test_a_loop_stuck_in_python_code_starts_the_courier_between_two_bytecodes():
    """The watchdog, barred from starting a thread of the process's table, hands a job while the main thread
    runs Python code without a break: the pending call starts the courier there, and the job runs while the
    main thread is still stuck."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("pending calls run on the main thread")
    courier = Courier()
    ran = threading.Event()

    def watchdog():
        courier.barred = threading.get_ident()
        time.sleep(0.05)
        courier.submit(ran.set)

    thread = threading.Thread(target=watchdog)
    thread.start()
    deadline = time.monotonic() + 10
    spins = 0
    while not ran.is_set() and time.monotonic() < deadline:  # the stuck loop: pure Python, no sleep, no I/O
        spins += 1
    stuck_until = time.monotonic()
    thread.join(10)
    try:
        assert ran.is_set() and stuck_until < deadline
        assert courier.alive or not courier.pending
    finally:
        courier.close()


@async_test
async def test_the_courier_leaves_while_the_loop_runs_flat_out_and_comes_back_when_it_does_not(private):
    async with loopwatch.watch(threshold=0.05, log_blocks=False) as monitor:
        courier = monitor._courier
        wall, cpu = [100.0], [10.0]
        monitor.share_clocks = (lambda: wall[0], lambda: cpu[0])
        monitor._share_from = None
        courier.ensure()
        monitor._check_courier()  # the first check only takes the clocks
        wall[0] += 1.0
        cpu[0] += 0.95  # the loop thread ran 95% of the last second
        thread = courier._thread
        monitor._check_courier()
        thread.join(10)  # the loop stays busy meanwhile: an idle loop (a pause of the sentinel) calls it back
        assert not thread.is_alive() and not courier.alive
        wall[0] += 1.0
        cpu[0] += 0.3
        monitor._check_courier()
        assert courier.alive


@async_test
async def test_a_hook_that_raises_on_the_watchdog_is_logged_through_the_courier(tmp_path, private):
    """The line that says a hook raised and is removed is written by a thread of the process's table too."""
    from loopwatch._events import any_thread

    path = tmp_path / "loopwatch.log"
    handler = logging.FileHandler(path, delay=True)
    log = logging.getLogger("loopwatch")
    log.addHandler(handler)
    ran_on: list[str] = []

    @any_thread
    def raising(_lag):
        ran_on.append(threading.current_thread().name)
        raise RuntimeError("observer failed")

    try:
        async with loopwatch.watch(threshold=0.05, log_blocks=False) as monitor:
            await _private_watchdog(monitor)
            monitor.lag_observers.append(raising)
            deadline = time.monotonic() + 10
            while handler.stream is None and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            assert handler.stream is not None, "the hook's failure never reached the log"
            assert os.path.samefile(f"/proc/self/fd/{handler.stream.fileno()}", path)
            log.warning("a line from the loop thread")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert ran_on == ["loopwatch-watchdog"]
    text = path.read_text()
    assert "raised; it is removed" in text and "observer failed" in text and "a line from the loop thread" in text


def test_a_pending_call_that_could_not_run_is_asked_for_again():
    """The pending call finds its lock held (the watchdog is asking at that moment): it does nothing, and the
    watchdog's next ask queues another, which starts the courier."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("pending calls run on the main thread")
    from loopwatch import _courier as module

    courier = Courier()
    ran = threading.Event()
    holding = threading.Event()
    release = threading.Event()

    def watchdog():
        courier.barred = threading.get_ident()
        courier.submit(ran.set)  # no courier thread: a pending call is queued
        with module._ASKED_LOCK:  # as if inside ask() again when the pending call runs
            holding.set()
            release.wait(10)
        courier.nudge()  # its next look

    thread = threading.Thread(target=watchdog)
    thread.start()
    try:
        assert holding.wait(10)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # the pending call runs between these bytecodes, finds the lock held
            pass
        assert not ran.is_set()
        release.set()
        deadline = time.monotonic() + 10
        while not ran.is_set() and time.monotonic() < deadline:  # stuck in Python again: the next one runs
            pass
        assert ran.is_set()
    finally:
        release.set()
        thread.join(10)
        courier.close()


# -- the server's finalizers never run on a thread of another table -------------------------------------


class _Owner:
    """Stands for a socket or a file of the server's: its finalizer says which thread ran it."""

    def __init__(self, where: list[str], cycle: bool = False) -> None:
        self.where = where
        if cycle:
            self.me = self  # only a collection frees it

    def __del__(self) -> None:
        self.where.append(threading.current_thread().name)


def test_a_collection_a_private_thread_starts_frees_nothing_there_and_a_later_one_frees_the_garbage():
    from loopwatch._gc import GC_CLOCK

    where: list[str] = []
    GC_CLOCK.acquire()
    try:
        gc.collect()
        _Owner(where, cycle=True)  # garbage in a cycle, as a socket caught in an exception's traceback is
        put_off = GC_CLOCK.put_off

        def body():
            gc.collect()  # as a collection an allocation of this thread's would start
            junk = [[] for _ in range(20000)]  # and those: each crossing of the young generation's threshold
            del junk
            return list(where)

        assert _in_private_thread(body) == []
        assert where == []
        assert GC_CLOCK.put_off >= put_off + 2  # the explicit one and at least one an allocation started
        assert gc.get_freeze_count() <= _fdtable._FROZEN_AT_IMPORT  # thawed as each stopped
        gc.collect()
        assert where == [threading.current_thread().name]
    finally:
        GC_CLOCK.release()


def test_a_frame_a_private_thread_read_is_dropped_by_the_loop_at_its_beat_not_there():
    """The watchdog reads the loop's frames; one that ends while the watchdog still holds it would free its
    locals (a socket) where the watchdog drops it. `hold` keeps them for the loop thread's `release`."""
    from loopwatch._watchdog import thread_sampler

    where: list[str] = []
    entered, leave = threading.Event(), threading.Event()

    def serving():
        owner = _Owner(where)  # a local: freed with the frame, when the frame is freed
        entered.set()
        leave.wait(10)
        del owner  # noqa: F821 - the frame object, once read, takes the locals it still has; this one goes now
        local = _Owner(where)  # noqa: F841 - this one goes with the frame
        return None

    worker = threading.Thread(target=serving, name="server-thread")
    worker.start()
    assert entered.wait(5)
    held_before = len(_fdtable._held)

    def body():
        sample = thread_sampler(worker.ident)()
        assert sample is not None
        leave.set()
        worker.join(10)  # the frame ended while this thread had read it
        return len(_fdtable._held)

    held = _in_private_thread(body)
    assert held > held_before
    assert where == ["server-thread"]  # `owner`, deleted by the frame's own code, on its own thread
    _fdtable.release()
    assert where == ["server-thread", threading.current_thread().name]  # `local`: by the release, here
    assert not _fdtable._held


def test_a_sampler_on_a_thread_of_the_process_s_table_holds_nothing():
    from loopwatch._watchdog import thread_sampler

    _fdtable.release()
    leave = threading.Event()
    worker = threading.Thread(target=leave.wait, args=(10,))
    worker.start()
    try:
        assert thread_sampler(worker.ident)() is not None
        assert not _fdtable._held
    finally:
        leave.set()
        worker.join(10)


def test_a_process_that_froze_objects_keeps_the_shared_table(private):
    """A put-off collection thaws what was frozen: a pre-fork server's `gc.freeze()` would be undone."""
    assert _fdtable.wanted()
    gc.freeze()
    try:
        assert not _fdtable.wanted()
    finally:
        gc.unfreeze()
    assert _fdtable.wanted()


def test_the_loop_s_release_leaves_what_a_sampler_holds_while_it_samples_for_the_next_beat():
    """A private sampler still refers to frames between reading them and returning: a `release` then would
    leave it the last reference, dropped on its thread. `release` skips while `SAMPLING` is held."""
    _fdtable.release()
    where: list[str] = []
    kept = _Owner(where)
    _fdtable._held[id(kept)] = kept
    del kept
    with _fdtable.SAMPLING:  # as `thread_sampler` holds it on a private thread
        releaser = threading.Thread(target=_fdtable.release, name="loop-thread")
        releaser.start()
        releaser.join(10)
        assert where == [] and len(_fdtable._held) == 1
    _fdtable.release()  # the next beat
    assert where == [threading.current_thread().name] and not _fdtable._held


@async_test
async def test_a_private_watchdog_leaves_the_offload_check_s_look_at_a_tool_to_a_thread_of_the_process(
    private, monkeypatch
):
    """The check walks the tool's objects (copies of its containers, a sqlite probe thread): on the watchdog a
    reference it held last would be dropped in the wrong table. The decision goes through the courier, and the
    tool still moves."""
    from loopwatch import _offload

    from helpers import client_for, fresh

    looked_from: list[int] = []
    check = _offload.obstacle

    def recording(fn):
        looked_from.append(threading.get_ident())
        return check(fn)

    monkeypatch.setattr(_offload, "obstacle", recording)
    server = fresh("offload_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False)
    async with client_for(server) as client:
        watchdog = await _private_watchdog(handle.monitor)
        await client.call_tool("lookup", {"sku": "A"})
        with anyio.fail_after(10):
            while "lookup" not in handle.offload.offloaded:
                await anyio.sleep(0.01)
        answer = await client.call_tool("lookup", {"sku": "B"})
    assert not answer.is_error
    assert looked_from and watchdog._thread.ident not in looked_from
    assert not set(looked_from) & _fdtable.PRIVATE_THREADS
