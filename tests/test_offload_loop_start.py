"""Moved calls answer however the loop was started: `asyncio.run`, `trio.run`, pytest-asyncio (and uvicorn, in
tests/e2e/test_offload_loop_start_http.py), not only `anyio.run` (anyio >= 4.14 raised NoEventLoopError in
the worker's scheduling callback, and every call after the move hung)."""

import asyncio

import anyio
import pytest
from mcp import Client

from helpers import fresh

AFTER_THE_MOVE = 50


async def moved_and_answering(target, handle, at_once=10):
    """One call that blocks (the move), then AFTER_THE_MOVE calls, `at_once` at a time: their answers, logs."""
    logs = []

    async def on_log(params):
        logs.append(params.data)

    answers = {}
    limit = anyio.CapacityLimiter(at_once)

    async def call(client, n):
        async with limit:
            answers[n] = (await client.call_tool("parse", {"n": n, "ms": 2})).content[0].text

    with anyio.fail_after(120):
        async with Client(target, mode="legacy", logging_callback=on_log) as client:
            await client.call_tool("parse", {"n": -1, "ms": 200})
            await handle.monitor.settle()
            assert "parse" in handle.offload.offloaded
            async with anyio.create_task_group() as tg:
                for n in range(AFTER_THE_MOVE):
                    tg.start_soon(call, client, n)
    assert answers == {n: f"parsed {n}" for n in range(AFTER_THE_MOVE)}
    assert sorted(logs) == sorted([f"{n}:{w}" for n in range(-1, AFTER_THE_MOVE) for w in ("parsed", "done")])
    return answers


def fresh_app():
    module = fresh("loop_start_app", "mcp")
    import loop_start_app

    return module, loop_start_app.handle


def test_moved_calls_answer_under_asyncio_run():
    server, handle = fresh_app()
    try:
        asyncio.run(moved_and_answering(server, handle))
    finally:
        handle.uninstrument()


def test_moved_calls_answer_under_trio_run():
    import trio

    server, handle = fresh_app()
    try:
        trio.run(moved_and_answering, server, handle)
    finally:
        handle.uninstrument()


@pytest.mark.asyncio
async def test_moved_calls_answer_under_pytest_asyncio():
    server, handle = fresh_app()
    try:
        await moved_and_answering(server, handle)
    finally:
        handle.uninstrument()
