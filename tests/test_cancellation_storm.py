"""Cancellation storms: 1,000 calls cancelled by their client, half offloaded, half on the loop.

Every cancelled call is counted once, the offload pool's slots and the capacity limiter's tokens all come
back, no task stays behind on the server's loop or a worker loop, no thread outlives the server, and the
calls after the storm are answered as before it.
"""

import asyncio
import threading

import anyio
import pytest
from mcp import Client

import loopwatch

from helpers import fresh, threads_left

pytestmark = pytest.mark.anyio

BATCHES = 10
PER_BATCH = 100  # half offloaded (`slow_async`), half on the loop (`nap`)


def storm_server():
    server = fresh("offload_server", "mcp")

    @server.tool()
    async def nap(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "rested"

    handle = loopwatch.instrument(
        server, threshold=0.1, log_blocks=False, traces=False, tool_policies={"slow_async": "always"}
    )
    return server, handle


def in_flight(handle):
    return sum(row["in_flight"] for row in handle.snapshot()["tools"].values())


async def until(check, timeout=30.0):
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - the state is read from the server's tables
            await anyio.sleep(0.005)


async def storm(client, handle):
    """Batches of calls, each cancelled once the server has them all in flight."""
    for _ in range(BATCHES):
        async with anyio.create_task_group() as tg:
            for i in range(PER_BATCH):
                name = "slow_async" if i % 2 else "nap"
                tg.start_soon(client.call_tool, name, {"seconds": 60})
            await until(lambda: in_flight(handle) == PER_BATCH)
            tg.cancel_scope.cancel()
        await until(lambda: in_flight(handle) == 0)


def server_tasks():
    return len(asyncio.all_tasks()) if _on_asyncio() else None


def _on_asyncio():
    import sniffio

    return sniffio.current_async_library() == "asyncio"


async def worker_loop_tasks(handle):
    """Tasks alive on each offload worker loop, besides its own main task, the task taking work from other
    threads (`LoopRef.serve`) and the one counting."""

    async def count():
        return len(asyncio.all_tasks()) - 3

    jobs = [worker.ref.spawn(count) for worker in list(handle.offload.pool._workers)]
    with anyio.fail_after(10):
        return [await anyio.to_thread.run_sync(job.future.result, 10) for job in jobs]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_a_thousand_cancelled_calls_leak_no_slot_task_or_thread_and_later_calls_work(anyio_backend):
    before = set(threading.enumerate())
    server, handle = storm_server()
    offloader = handle.offload
    async with Client(server, mode="legacy") as client:
        assert (await client.call_tool("ping", {"n": 0})).structured_content == {"result": 0}
        tasks_before = server_tasks()
        await storm(client, handle)
        await until(lambda: offloader.pool.in_use == 0)
        await until(lambda: offloader.limiter.borrowed_tokens == 0)
        if tasks_before is not None:
            await until(lambda: server_tasks() == tasks_before)
            assert await worker_loop_tasks(handle) == [0] * len(offloader.pool._workers)
        workers = [t for t in threading.enumerate() if t.name.startswith("loopwatch-offload")]
        assert len(workers) <= handle.options.offload_workers

        assert (await client.call_tool("ping", {"n": 7})).structured_content == {"result": 7}
        assert (await client.call_tool("slow_async", {"seconds": 0.01})).content[0].text == "done"
        assert (await client.call_tool("nap", {"seconds": 0.01})).content[0].text == "rested"
    tools = handle.snapshot()["tools"]
    half = BATCHES * PER_BATCH // 2
    assert (tools["slow_async"]["calls"], tools["slow_async"]["errors"]) == (half + 1, half)
    assert (tools["nap"]["calls"], tools["nap"]["errors"]) == (half + 1, half)
    assert tools["slow_async"]["executes"] == "thread" and tools["nap"]["executes"] == "loop"
    handle.uninstrument()
    assert await threads_left(before) == []


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_cancelled_calls_stuck_in_blocking_code_hold_their_slots_only_until_they_return(anyio_backend):
    before = set(threading.enumerate())
    server, handle = storm_server()
    handle.set_tool_policy("stuck", "always")
    offloader = handle.offload
    async with Client(server, mode="legacy") as client:
        for _ in range(5):
            with anyio.move_on_after(0.05):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):  # twice the pool: half wait on the limiter when cancelled
                        tg.start_soon(client.call_tool, "stuck", {"seconds": 0.2})
        await until(lambda: offloader.pool.in_use == 0)
        await until(lambda: offloader.limiter.borrowed_tokens == 0)
        assert (await client.call_tool("stuck", {"seconds": 0.01})).content[0].text == "unstuck"
    handle.uninstrument()
    assert await threads_left(before) == []
