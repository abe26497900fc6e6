"""The garbage collector's pauses: seen by loopwatch's callback, told apart from the code that allocated."""

import gc
import time

import anyio
import pytest

import loopwatch
from loopwatch._gc import GcClock
from loopwatch.testing import LoopBlockedError, collect_blocks, no_blocking


def test_a_real_collection_is_recorded_while_acquired_and_the_callback_leaves_with_the_last_user():
    clock = GcClock()
    heap = [[i] for i in range(300_000)]  # containers the collector has to traverse: milliseconds of work
    clock.acquire()
    clock.acquire()
    try:
        start = time.monotonic()
        gc.collect()
        end = time.monotonic()
        clock.release()
        assert clock._callback in gc.callbacks  # one user left
    finally:
        clock.release()
    assert clock._callback not in gc.callbacks
    assert 0 < clock.within(start, end) <= end - start
    assert clock.within(end, end + 1) == 0
    del heap


def test_pauses_are_counted_only_where_they_overlap_the_window():
    clock = GcClock(clock=lambda: 0.0)
    clock.note(1.0, 1.2)
    clock.note(2.0, 2.5)
    assert clock.within(0.0, 1.1) == pytest.approx(0.1)
    assert clock.within(1.1, 2.1) == pytest.approx(0.2)
    assert clock.within(3.0, 4.0) == 0.0


class SlowToFinalize:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cycle = self

    def __del__(self) -> None:
        time.sleep(self.seconds)


def collect_a_cycle_with_a_slow_finalizer(seconds: float) -> None:
    """A real collection on the loop thread that takes `seconds` whatever the size of the heap: the
    collector runs the finalizers of the unreachable cycles it found before it reports that it stopped."""
    SlowToFinalize(seconds)
    gc.collect()


@pytest.mark.anyio
async def test_a_collection_outside_any_call_is_a_gc_block_that_no_blocking_and_collect_blocks_leave_out():
    with anyio.fail_after(30):
        async with no_blocking(threshold=0.05) as blocks:
            collect_a_cycle_with_a_slow_finalizer(0.2)
    assert list(blocks) == []
    [event] = blocks.collections
    assert (event.kind, event.tool, event.frames) == ("gc", None, ())
    assert event.gc_s >= event.duration_s / 2


@pytest.mark.anyio
async def test_with_gc_true_a_collection_fails_no_blocking_and_is_collected():
    with anyio.fail_after(30), pytest.raises(LoopBlockedError) as caught:
        async with no_blocking(threshold=0.05, gc=True):
            collect_a_cycle_with_a_slow_finalizer(0.2)
    assert "[gc] outside any call: the garbage collector ran" in str(caught.value)
    with anyio.fail_after(30):
        async with collect_blocks(threshold=0.05, gc=True) as blocks:
            collect_a_cycle_with_a_slow_finalizer(0.2)
    assert [b.kind for b in blocks] == ["gc"]


@pytest.mark.anyio
async def test_gc_blocks_in_a_watched_server_are_told_during_the_call_and_never_move_the_tool():
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("heap")

    @server.tool()
    async def build_report() -> str:
        collect_a_cycle_with_a_slow_finalizer(0.25)
        return "done"

    handle = loopwatch.instrument(server, threshold=0.05, traces=False, log_blocks=False)
    seen = []
    handle.add_listener(seen.append)
    with anyio.fail_after(30):
        async with Client(server) as client:
            for _ in range(3):
                assert (await client.call_tool("build_report", {})).content[0].text == "done"
                await handle.monitor.settle()  # a beat between calls: one block each
            await handle.monitor.settle()
    blocks = [e for e in seen if isinstance(e, loopwatch.BlockEvent)]
    assert [(b.kind, b.tool, b.frames) for b in blocks] == [("gc", "build_report", ())] * 3
    assert "during tools/call build_report" in blocks[0].describe()
    row = handle.snapshot()["tools"]["build_report"]
    assert (row["executes"], row["blocks"], row["blocked_s"]) == ("loop", 0, 0.0)  # not counted as the tool's
    assert handle.offload.offloaded == {}


def test_a_collection_still_going_on_counts_up_to_now_and_once_it_ends_only_once():
    now = [10.0]
    clock = GcClock(clock=lambda: now[0])
    clock._callback("start", {"generation": 2})
    now[0] = 10.3
    assert clock.within(9.0, 10.3) == pytest.approx(0.3)
    clock._callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert clock.within(9.0, 11.0) == pytest.approx(0.3)
    clock._callback("start", {"generation": 0})
    now[0] = 10.3002
    clock._callback("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    assert clock.within(9.0, 11.0) == pytest.approx(0.3)  # a young pass of 0.2 ms is not kept
