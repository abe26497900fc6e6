"""Offload loses nothing: a bridge that can't complete answers with an error naming why, a worker loop that
dies is replaced; `--offload off` still honours explicit moves; tools registered through sync wrappers move."""

import functools
import threading
import time

import anyio
import pytest

import loopwatch
from loopwatch.aiomonitor import policy_text

from helpers import client_for, fresh

pytestmark = pytest.mark.anyio


def wrapped(**options):
    server = fresh("offload_server", "mcp")
    options = {"threshold": 0.1, "log_blocks": False, "traces": False, **options}
    return server, loopwatch.instrument(server, **options)


def running(offloader):
    return [job for worker in offloader.pool._workers for job in list(worker.ref._jobs)]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_a_worker_loop_that_dies_mid_call_answers_that_call_with_the_cause_and_is_replaced(anyio_backend):
    server, handle = wrapped(tool_policies={"slow_async": "always"}, offload_workers=1)
    offloader = handle.offload

    def die():
        raise KeyboardInterrupt  # not an Exception: it ends the worker's loop, as a crash would

    async with client_for(server) as client:
        async with anyio.create_task_group() as tg:
            results = []

            async def call():
                results.append(await client.call_tool("slow_async", {"seconds": 30}))

            tg.start_soon(call)
            with anyio.fail_after(10):
                while not (offloader.pool._workers and any(j.future.running() for j in running(offloader))):
                    await anyio.sleep(0.01)
            [worker] = offloader.pool._workers
            worker.ref.schedule(die)
        [result] = results
        assert result.is_error and "loop running this call" in result.content[0].text
        again = await client.call_tool("slow_async", {"seconds": 0.01})
    assert again.content[0].text == "done"
    assert worker not in offloader.pool._workers  # a new worker loop took the call


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_context_request_that_cannot_reach_the_servers_loop_fails_the_call_with_the_cause(anyio_backend):
    server, handle = wrapped(tool_policies={"lookup": "always"})
    async with client_for(server) as client:
        handle.offload.portal.close("the server's loop stopped watching")  # as when the watch ends mid-call
        result = await client.call_tool("lookup", {"sku": "Z"}, progress_callback=lambda *a: None)
    assert result.is_error and "the loop this was sent to is no longer running" in result.content[0].text


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_offload_off_moves_nothing_by_itself_but_honours_always_and_the_console(anyio_backend):
    server, handle = wrapped(offload="off", tool_policies={"strict": "always"})
    async with client_for(server) as client:
        await client.call_tool("lookup", {"sku": "O"})  # blocks: off means it stays
        await handle.monitor.settle()
        assert "lookup" not in handle.offload.offloaded
        assert policy_text([handle], "lookup", "always").startswith("✓ lookup runs off the loop")
        await client.call_tool("lookup", {"sku": "O"})
        await client.call_tool("strict", {"count": 1})
        await handle.monitor.settle()
    tools = handle.snapshot()["tools"]
    assert tools["lookup"]["executes"] == tools["strict"]["executes"] == "thread"
    assert len([e for e in handle.monitor.recent if isinstance(e, loopwatch.BlockEvent) and e.tool == "lookup"]) == 1


def sync_shim(fn):
    """A decorator that builds a plain `def` around an async tool (it returns the coroutine)."""

    @functools.wraps(fn)
    def shim(*args, **kwargs):
        return fn(*args, **kwargs)

    return shim


async def search(query: str, store: str = "main") -> str:
    time.sleep(0.15)  # the vector search blocks
    return f"{query} in {store} on {threading.current_thread().name}"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.parametrize("how", ["always", "auto"])
async def test_a_fastmcp_tool_registered_through_a_sync_wrapper_moves_like_an_async_one(anyio_backend, how):
    """fastmcp runs a plain `def` tool in a thread, then awaits the coroutine it returned on the loop: the
    blocking part is the loop's, and loopwatch moves it."""
    from fastmcp import FastMCP

    app = FastMCP("wrapped-tools")
    app.tool(name="shimmed")(sync_shim(search))
    policies = {"shimmed": "always"} if how == "always" else {}
    handle = loopwatch.instrument(app, threshold=0.1, log_blocks=False, traces=False, tool_policies=policies)
    async with client_for(app) as client:
        first = await client.call_tool("shimmed", {"query": "q"})
        await handle.monitor.settle()
        second = await client.call_tool("shimmed", {"query": "q"})
    assert "shimmed" in handle.offload.offloaded
    assert second.data.startswith("q in main on loopwatch-offload-")
    assert first.data.startswith("q in main on " + ("loopwatch-offload-" if how == "always" else "MainThread"))
