"""Decide before moving: a tool that reaches loop-bound or thread-affine objects stays on the loop, with the
reason; what the check can't see never runs a call twice, and a client's error text decides nothing."""

import asyncio
import functools
import json
import logging
import sqlite3
import threading

import anyio
import pytest

import loopwatch
from loopwatch._offload_check import obstacle

from helpers import client_for, fresh

LOCK = asyncio.Lock()
CONN = sqlite3.connect(":memory:")
SHARED_CONN = sqlite3.connect(":memory:", check_same_thread=False)
LOCAL = threading.local()


class Store:
    def __init__(self):
        self.lock = anyio.Lock()


STORE = Store()


async def uses_lock():
    async with LOCK:
        pass


async def uses_store_attribute():
    async with STORE.lock:
        pass


async def uses_helper():
    await uses_lock()


async def plain(text: str) -> str:
    return json.dumps({"text": text})


async def uses_shared_connection():
    return SHARED_CONN.execute("select 1").fetchone()


def test_the_check_finds_what_a_tool_reaches_through_globals_attributes_helpers_and_wrappers():
    def closure(event=asyncio.Event()):  # noqa: B008 -- made once, as a module-level default would be
        async def tool():
            await event.wait()

        return tool

    async def with_default(conn=CONN):
        return conn

    async def reads_local():
        return LOCAL.__dict__

    assert "LOCK, an asyncio.Lock" in obstacle(uses_lock)
    assert "asyncio.Lock" in obstacle(uses_helper)  # through a function of the tool's own module
    assert "STORE.lock, a anyio.Lock" in obstacle(uses_store_attribute)
    assert "asyncio.Event" in obstacle(closure())
    assert "check_same_thread" in obstacle(with_default)
    assert "threading.local" in obstacle(reads_local)
    assert "asyncio.Lock" in obstacle(functools.partial(uses_lock))

    @functools.wraps(uses_lock)
    def sync_shim():
        return uses_lock()

    assert "asyncio.Lock" in obstacle(sync_shim)


def test_the_check_lets_plain_tools_and_thread_safe_connections_move():
    assert obstacle(plain) is None
    assert obstacle(uses_shared_connection) is None  # check_same_thread=False: any thread may use it
    assert obstacle(json.dumps) is None


def wrapped(**options):
    server = fresh("shared_server", "mcp")
    options = {"threshold": 0.05, "log_blocks": False, "traces": False, **options}
    return server, loopwatch.instrument(server, **options)


def pins(handle):
    return {e.tool: e.reason for e in handle.monitor.recent if isinstance(e, loopwatch.OffloadEvent)
            and e.action == "pinned"}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_blocking_tool_sharing_a_lock_stays_on_the_loop_and_its_neighbour_keeps_working(anyio_backend):
    server, handle = wrapped()
    async with client_for(server) as client:
        for i in range(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "writer", {"text": str(i)})
                tg.start_soon(client.call_tool, "reader", {})
            await handle.monitor.settle()
        assert (await client.call_tool("writer", {"text": "x"})).content[0].text == "wrote 4"
        assert (await client.call_tool("reader", {})).content[0].text == "4 rows"
    reason = pins(handle)["writer"]
    assert "LOCK, an asyncio.Lock" in reason and "anyio.to_thread.run_sync" in reason and "writer=always" in reason
    assert handle.offload.offloaded == {}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_thread_affine_tools_keep_their_bare_answers_on_the_loop(anyio_backend, tmp_path):
    state = tmp_path / "offload.json"
    for _ in range(2):  # and after a restart with the state file
        server, handle = wrapped(offload_state=str(state))
        async with client_for(server) as client:
            hits = [(await client.call_tool("count_hit", {})).content[0].text for _ in range(3)]
            users = [(await client.call_tool("whoami", {})).content[0].text for _ in range(3)]
            await handle.monitor.settle()
        handle.uninstrument()
        assert hits == ["1 hits", "2 hits", "3 hits"]
        assert users == ["alice"] * 3
        reasons = pins(handle)
        assert "DB, a sqlite3 connection made with check_same_thread" in reasons["count_hit"]
        assert "LOCAL, a threading.local" in reasons["whoami"]
    assert json.loads(state.read_text())["offloaded"] == {}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_always_insists_past_the_check(anyio_backend):
    server, handle = wrapped(tool_policies={"whoami": "always"})
    async with client_for(server) as client:
        assert (await client.call_tool("whoami", {})).content[0].text == "nobody"  # what the user asked for
    assert "whoami" in handle.offload.offloaded


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_client_chosen_error_text_never_pins_a_tool_nor_reaches_a_report(anyio_backend, tmp_path, caplog):
    note = "secret-42 got Future attached to a different loop; is not the running loop; bound to a different event loop"
    state, events = tmp_path / "offload.json", tmp_path / "events.jsonl"
    server, handle = wrapped(offload_state=str(state), events=str(events), log_blocks=True)
    orders = __import__("shared_server").ORDERS
    caplog.set_level(logging.DEBUG, logger="loopwatch")
    async with client_for(server) as client:
        results = [await client.call_tool("place_order", {"note": note}) for _ in range(3)]
        await handle.monitor.settle()
    offloader = handle.offload
    handle.uninstrument()
    assert all(r.is_error for r in results)
    assert orders == [3]  # each call ran its body once: the failed ones were not run again on the loop
    assert "place_order" in offloader.offloaded and "place_order" not in offloader.pinned
    ours = "\n".join(logging.Formatter().format(r) for r in caplog.records if r.name == "loopwatch")
    assert "place_order now runs off the loop" in ours  # the log was read (the SDK's own log has the text, bare too)
    for report in (state.read_text(), events.read_text(), ours, json.dumps(handle.snapshot(), default=str)):
        assert "secret-42" not in report
