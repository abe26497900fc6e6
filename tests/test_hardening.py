"""Hardening (issue 21): what clients choose stays bounded and inert in every table and report; the events
file stays whole JSON lines and bounded; state files and paths fail clearly; watching stops when asked.

Each test here failed on the code before the fix it checks.
"""

import json
import logging

import anyio
import pytest
from mcp import Client

import loopwatch
from loopwatch._blame import CallRecord

from helpers import fresh

pytestmark = pytest.mark.anyio

EVIL_ID = "7\n2026-12-01 00:00:00,000 loopwatch WARNING forged line\x1b[2J\x1b]0;owned\x07" + "x" * 1_000_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def raw(client, method, params):
    try:
        return ("result", await client.session._dispatcher.send_raw_request(method, params))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


# -- 1. client-chosen strings in tables ------------------------------------------------------------------


async def test_distinct_huge_method_names_are_kept_cut_so_the_table_stays_small(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False, offload="off")
    async with Client(server) as client:
        for i in range(40):
            await raw(client, f"no/such/{i}/" + "m" * 250_000, {})
    methods = handle.snapshot()["methods"]
    assert len(methods) >= 40  # each had a row of its own (under max_tools)
    assert max(map(len, methods)) <= 200
    assert len(json.dumps(handle.snapshot())) < 64 * 1024
    handle.uninstrument()


def test_every_client_chosen_string_of_a_call_record_is_cut_and_escaped():
    class Headers(dict):
        pass

    class Ctx:
        request = type("Request", (), {"headers": Headers({"mcp-session-id": "s\x1b[31m" + "s" * 100_000})})()

    call = CallRecord("no/such\n" + "m" * 100_000, None, EVIL_ID, Ctx())
    for text in (call.method, call.request_id, call.session_id()):
        assert len(text) <= 4 * 200 and text.isprintable(), text[:80]
    assert call.request_id.startswith("7\\x0a2026-12-01")
    assert CallRecord("ping", None, 12, None).request_id == 12  # ints as they were (no cost on the common path)


# -- 2. request ids in every report ----------------------------------------------------------------------


def test_the_console_line_and_the_span_attributes_carry_a_cut_escaped_id():
    from loopwatch.aiomonitor import describe_call
    from loopwatch.otel import request_attributes

    class Ctx:
        method = "tools/call"
        request_id = EVIL_ID
        params = {"name": "lookup\x1b[31m" + "n" * 100_000, "arguments": {}}

    line = describe_call(CallRecord("tools/call", "lookup", EVIL_ID, Ctx()))
    assert line.isprintable() and len(line) < 1024
    attributes = request_attributes(Ctx())
    for key in ("jsonrpc.request.id", "gen_ai.tool.name"):
        assert attributes[key].isprintable() and len(attributes[key]) < 1024, key


async def test_a_block_under_a_hostile_request_id_is_reported_on_one_bounded_printable_line(
    anyio_backend, caplog, tmp_path
):
    """In memory the client picks the ids, so the id goes in as the SDK hands it over: through the request
    context the middleware reads (the same object a stdio or HTTP request reaches it with)."""
    server = fresh("inventory_server", "mcp")
    events = tmp_path / "events.jsonl"
    handle = loopwatch.instrument(server, threshold=0.05, traces=False, offload="off", events=str(events))

    async def evil_ids(ctx, call_next):
        ctx.request_id = EVIL_ID
        return await call_next(ctx)

    chain = handle._lowlevel.middleware
    chain.insert(chain.index(handle.middleware), evil_ids)
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        async with Client(server) as client:
            await client.call_tool("lookup", {"sku": "A"})
            await handle.monitor.settle()
    [event] = [e for e in handle.monitor.recent if isinstance(e, loopwatch.BlockEvent) and e.tool == "lookup"]
    assert event.request_id.startswith("7\\x0a") and len(event.request_id) < 1024
    ours = [r.getMessage() for r in caplog.records if r.name == "loopwatch" and "loop blocked" in r.getMessage()]
    assert ours and all("\n" not in m and "\x1b" not in m and len(m) < 2048 for m in ours)
    lines = events.read_text().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 8 * 1024
    assert json.loads(lines[0])["request_id"] == event.request_id
    assert len(json.dumps(handle.snapshot())) < 64 * 1024
    handle.uninstrument()
