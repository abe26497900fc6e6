"""Bad input in memory: raw malformed requests, thousands of names, huge values, calls racing with shutdown.

Everything the client sees is compared with the bare server; everything loopwatch keeps is bounded by its
options (`max_tools`), never by what clients send. (Bad lines over a real stdio pipe are in
tests/e2e/test_bad_input_stdio.py; bad tool arguments through `call_tool` in test_middleware.py.)
"""

import json
import logging
import threading
import time
from collections import Counter

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.server.lowlevel import Server
from prometheus_client import CollectorRegistry

import loopwatch

from helpers import client_for, fresh, threads_left

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def series(registry):
    return sum(len(metric.samples) for metric in registry.collect())


def catch_all_server():
    """A low-level server that answers any tool name with success, so loopwatch learns names from successes."""

    async def list_tools(ctx, params):
        return types.ListToolsResult(tools=[])

    async def call_tool(ctx, params):
        if params.name.startswith("slow"):
            time.sleep(0.15)
        return types.CallToolResult(content=[types.TextContent(type="text", text="ok")])

    return Server("catch-all", on_list_tools=list_tools, on_call_tool=call_tool)


def wrapped(server, **options):
    registry = CollectorRegistry()
    handle = loopwatch.instrument(server, log_blocks=False, metrics_registry=registry, **options)
    return handle, registry


async def raw(client, method, params):
    try:
        return ("result", await client.session._dispatcher.send_raw_request(method, params))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


# -- thousands of names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "attr"), [("inventory_server", "mcp"), ("fm_server", "app")])
async def test_two_thousand_unknown_tool_names_add_no_row_and_no_metric_series(module, attr, anyio_backend):
    server = fresh(module, attr)
    handle, registry = wrapped(server)
    kw = {"raise_on_error": False} if module == "fm_server" else {}
    async with client_for(server) as client:
        for i in range(10):
            await client.call_tool(f"warm-{i}", {}, **kw)
        await handle.monitor.settle()  # metrics are recorded on the watchdog thread
        rows, before = len(handle.snapshot()["tools"]), series(registry)
        for i in range(2000):
            await client.call_tool(f"random-{i}-" + "n" * (i % 300), {}, **kw)
        await handle.monitor.settle()
        snapshot = handle.snapshot()
    assert set(snapshot["tools"]) == {"_OTHER"} and len(snapshot["tools"]) == rows
    assert snapshot["tools"]["_OTHER"]["calls"] == 2010
    assert series(registry) == before
    assert len(json.dumps(snapshot)) < 64 * 1024


async def test_a_server_that_answers_any_name_is_tracked_up_to_max_tools_and_no_further(anyio_backend):
    server = catch_all_server()
    handle, registry = wrapped(server, max_tools=50)
    async with Client(server) as client:
        for i in range(2000):  # a name is learnt from its first success: its second call has a row
            await client.call_tool(f"tool-{i // 2}", {})
        await handle.monitor.settle()
        rows, after_1000 = len(handle.snapshot()["tools"]), series(registry)
        for i in range(2000, 4000):
            await client.call_tool(f"tool-{i // 2}", {})
        await handle.monitor.settle()
    tools = handle.snapshot()["tools"]
    assert len(handle.monitor.tools.known) == 50
    assert len(tools) == rows == 51 and tools["_OTHER"]["calls"] == 4000 - 50
    assert series(registry) == after_1000


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_unknown_methods_get_the_bare_servers_error_and_share_one_row_past_the_bound(mode, anyio_backend):
    async def errors(server):
        async with Client(server, mode=mode) as client:
            return [await raw(client, f"no/such/method/{i}", {}) for i in range(300)]

    bare = await errors(fresh("inventory_server", "mcp"))
    server = fresh("inventory_server", "mcp")
    handle, registry = wrapped(server, max_tools=20)
    assert await errors(server) == bare
    handle.uninstrument()  # every metric recorded
    methods = handle.snapshot()["methods"]
    assert len(methods) <= 21 and methods["_OTHER"]["calls"] > 250
    labels = {s.labels.get("mcp_method_name") for m in registry.collect() for s in m.samples}
    assert "_OTHER" in labels and not [label for label in labels if label and "no/such" in label]


# -- malformed and huge ---------------------------------------------------------------------------------

MALFORMED = [
    ("tools/call", None),
    ("tools/call", {}),
    ("tools/call", {"arguments": {}}),
    ("tools/call", {"name": 5, "arguments": {}}),
    ("tools/call", {"name": None}),
    ("tools/call", {"name": ["ping"]}),
    ("tools/call", {"name": "ping", "arguments": [1, 2]}),
    ("tools/call", {"name": "ping", "arguments": "n=1"}),
    ("tools/call", {"name": "ping", "arguments": {"n": {"deep": [[[[]]]]}}}),
    ("tools/call", {"name": "ping", "arguments": {"n": 1}, "_meta": "not an object"}),
    ("tools/call", {"name": "ping", "arguments": {"n": 1, "pad": "x" * 5_000_000}}),
    ("tools/call", {"name": "z" * 1_000_000, "arguments": {}}),
    ("tools/list", {"cursor": 17}),
    ("tools/list", {"cursor": "not a cursor"}),
    ("prompts/get", {"name": "nope"}),
    ("resources/read", {"uri": "not a uri"}),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "x"}}),
    ("logging/setLevel", {"level": "loudest"}),
    ("ping", {"unexpected": True}),
]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize(("module", "attr"), [("inventory_server", "mcp"), ("low_server", "server")])
async def test_malformed_and_huge_requests_get_exactly_the_bare_servers_answers(module, attr, mode, anyio_backend):
    async def answers(server):
        async with Client(server, mode=mode) as client:
            return [await raw(client, method, params) for method, params in MALFORMED]

    bare = await answers(fresh(module, attr))
    server = fresh(module, attr)
    handle, _ = wrapped(server)
    assert await answers(server) == bare
    snapshot = handle.snapshot()
    assert len(json.dumps(snapshot)) < 64 * 1024  # nothing of the 5 MB argument or the 1 MB name is kept
    assert all(row["in_flight"] == 0 for row in [*snapshot["tools"].values(), *snapshot["methods"].values()])


async def test_a_block_under_a_huge_tool_name_reports_a_bounded_name(anyio_backend, caplog, tmp_path):
    server = catch_all_server()
    events = tmp_path / "events.jsonl"
    handle = loopwatch.instrument(server, threshold=0.05, traces=False, events=str(events), offload="off")
    name = "slow" + "q" * 1_000_000
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        async with Client(server) as client:
            assert (await client.call_tool(name, {})).content[0].text == "ok"
            await handle.monitor.settle()
    [event] = [e for e in handle.monitor.recent if isinstance(e, loopwatch.BlockEvent) and e.tool and e.kind != "gc"]
    assert event.tool == name[:200]
    assert max(len(line) for line in events.read_text().splitlines()) < 8 * 1024
    ours = [record.getMessage() for record in caplog.records if record.name == "loopwatch"]
    assert ours and max(map(len, ours)) < 1024
    assert len(json.dumps(handle.snapshot())) < 16 * 1024


# -- calls racing with shutdown ------------------------------------------------------------------------


def nap_server():
    """The offload fixture plus an on-loop tool that awaits half a second."""
    server = fresh("offload_server", "mcp")

    @server.tool()
    async def nap() -> str:
        await anyio.sleep(0.5)
        return "rested"

    return server


async def racing(server, mode):
    """100 on-loop calls and 4 offloaded ones in flight when the client closes: what each of them gets."""
    seen = Counter()

    async def call(client, name, args):
        try:
            result = await client.call_tool(name, args)
            seen[(name, "result", result.content[0].text)] += 1
        except Exception as exc:
            seen[(name, "raised", type(exc).__name__, str(exc))] += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with Client(server, mode=mode) as client:
                for _ in range(100):
                    tg.start_soon(call, client, "nap", {})
                for _ in range(4):  # as many as the offload pool runs at once (offload_workers)
                    tg.start_soon(call, client, "slow_async", {"seconds": 0.5})
                await anyio.sleep(0.1)
    return seen


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_calls_racing_with_shutdown_end_as_they_do_on_the_bare_server_and_nothing_is_left(mode, anyio_backend):
    before = set(threading.enumerate())
    bare = await racing(nap_server(), mode)
    server = nap_server()
    handle, _ = wrapped(server, tool_policies={"slow_async": "always"})
    assert await racing(server, mode) == bare
    assert not handle.monitor.active
    with anyio.fail_after(10):
        while handle.offload.pool.in_use:
            await anyio.sleep(0.01)
    assert all(row["in_flight"] == 0 for row in handle.snapshot()["tools"].values())
    async with Client(server, mode=mode) as client:  # the same server serves again
        assert (await client.call_tool("ping", {"n": 5})).structured_content == {"result": 5}
    handle.uninstrument()
    assert await threads_left(before) == []
