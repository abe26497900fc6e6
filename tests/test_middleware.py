"""Differential: everything a client sees is the same with and without loopwatch."""

import anyio
import pytest
from mcp import MCPError

import loopwatch

from helpers import client_for, fresh

pytestmark = pytest.mark.anyio

SERVERS = [("inventory_server", "mcp"), ("low_server", "server"), ("fm_server", "app")]
CALLS = [
    ("ping", {"n": 3}),
    ("ping", {"n": "not a number"}),
    ("ping", {"unexpected": 1}),
    ("fail", {"reason": "out of stock"}),
    ("fail", {}),
    ("no_such_tool", {}),
    ("x" * 5000, {"big": "y" * 100_000}),
]


async def outcomes(server, calls):
    seen = []
    async with client_for(server) as client:
        listed = await client.list_tools()
        seen.append(sorted(t.name for t in (listed.tools if hasattr(listed, "tools") else listed)))
        for other in ("list_resources", "list_prompts"):
            try:
                seen.append(("listed", other, _dump(await getattr(client, other)())))
            except Exception as exc:
                seen.append(("raised", other, type(exc).__name__, str(exc)))
        for name, args in calls:
            try:
                result = await client.call_tool(name, args, **_raise_kw(client))
            except (MCPError, Exception) as exc:  # the client may raise for JSON-RPC errors
                seen.append(("raised", type(exc).__name__, str(exc)))
            else:
                seen.append(("result", _dump(result)))
    return seen


def _raise_kw(client):
    return {"raise_on_error": False} if type(client).__module__.startswith("fastmcp") else {}


def _dump(result):
    if isinstance(result, list):
        return [_dump(item) for item in result]
    dump = result.model_dump(mode="json", exclude_none=True) if hasattr(result, "model_dump") else vars(result)
    return {k: v for k, v in dump.items() if k not in ("meta", "_meta")}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.parametrize(("module", "attr"), SERVERS)
async def test_results_errors_and_validation_failures_are_unchanged(module, attr, anyio_backend):
    bare = await outcomes(fresh(module, attr), CALLS)
    wrapped_server = fresh(module, attr)
    handle = loopwatch.instrument(wrapped_server, log_blocks=False)
    wrapped = await outcomes(wrapped_server, CALLS)
    assert wrapped == bare
    assert handle.snapshot()["methods"]["tools/list"]["calls"] == 1


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_a_cancelled_call_is_cancelled_as_without_loopwatch(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False)

    @server.tool()
    async def forever() -> str:
        await anyio.sleep(60)
        return "never"

    async with client_for(server) as client:
        with anyio.move_on_after(0.2) as scope:
            await client.call_tool("forever", {})
        assert scope.cancelled_caught
        assert (await client.call_tool("ping", {"n": 1})).structured_content == {"result": 1}
        with anyio.fail_after(10):
            while handle.snapshot()["tools"]["forever"]["in_flight"]:
                await anyio.sleep(0.01)
    row = handle.snapshot()["tools"]["forever"]
    assert (row["calls"], row["errors"], row["in_flight"]) == (1, 1, 0)


async def test_statistics_count_calls_errors_and_tool_errors_per_tool(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False)
    async with client_for(server) as client:
        for i in range(5):
            await client.call_tool("ping", {"n": i})
        await client.call_tool("fail", {"reason": "r"})
    tools = handle.snapshot()["tools"]
    assert (tools["ping"]["calls"], tools["ping"]["errors"]) == (5, 0)
    assert tools["ping"]["p50_s"] > 0 and tools["ping"]["p99_s"] >= tools["ping"]["p50_s"]
    assert (tools["fail"]["calls"], tools["fail"]["errors"]) == (1, 1)
    assert tools["ping"]["executes"] == "loop"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_unknown_tool_names_share_one_row(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False)
    async with client_for(server) as client:
        for i in range(300):
            await client.call_tool(f"random-{i}", {})
    tools = handle.snapshot()["tools"]
    assert set(tools) == {"_OTHER"}
    assert tools["_OTHER"]["calls"] == 300


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_low_level_server_learns_tool_names_from_its_tool_list(anyio_backend):
    server = fresh("low_server", "server")
    handle = loopwatch.instrument(server, log_blocks=False, traces=False)
    async with client_for(server) as client:
        await client.list_tools()
        await client.call_tool("ping", {})
        await client.call_tool("bogus", {})
    assert set(handle.snapshot()["tools"]) == {"ping", "_OTHER"}


def test_instrument_is_idempotent_and_uninstrument_restores_the_server():
    server = fresh("inventory_server", "mcp")
    chain_before = list(server.middleware)
    lifespan_before = server._lowlevel_server.lifespan
    handle = loopwatch.instrument(server, traces=False)
    assert loopwatch.instrument(server) is handle
    assert len(server.middleware) == len(chain_before) + 1
    handle.uninstrument()
    handle.uninstrument()
    assert server.middleware == chain_before
    assert server._lowlevel_server.lifespan is lifespan_before


def test_bad_options_are_refused_with_a_clear_error():
    server = fresh("inventory_server", "mcp")
    with pytest.raises(loopwatch.OptionError, match="threshold must be a positive"):
        loopwatch.instrument(server, threshold=-1)
    with pytest.raises(loopwatch.OptionError, match="unknown option"):
        loopwatch.instrument(server, treshold=0.1)
    with pytest.raises(TypeError, match="cannot instrument"):
        loopwatch.instrument(object())
    assert len(server.middleware) == len(fresh("inventory_server", "mcp").middleware)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_monitoring_starts_with_the_server_and_stops_with_it(anyio_backend):
    import threading

    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, traces=False)
    before = {t.name for t in threading.enumerate()}
    assert not handle.monitor.active
    async with client_for(server) as client:
        await client.call_tool("ping", {})
        assert handle.monitor.active
        assert "loopwatch-watchdog" in {t.name for t in threading.enumerate()}
    assert not handle.monitor.active
    assert {t.name for t in threading.enumerate()} == before


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_what_the_server_raises_comes_out_unwrapped(anyio_backend):
    from contextlib import asynccontextmanager

    from mcp.server.mcpserver import MCPServer

    class DatabaseDown(Exception):
        pass

    @asynccontextmanager
    async def lifespan(server):
        yield {}
        raise DatabaseDown("lost the connection at shutdown")

    server = MCPServer("raises", lifespan=lifespan)
    loopwatch.instrument(server, log_blocks=False, traces=False)
    with pytest.raises(DatabaseDown, match="lost the connection"):
        async with client_for(server):
            pass
    async with loopwatch.watch(log_blocks=False):
        pass
    with pytest.raises(KeyError):
        async with loopwatch.watch(log_blocks=False):
            raise KeyError("mine")


def test_a_tool_error_is_read_from_each_shape_of_result_the_sdks_answer_with():
    import pydantic
    from mcp.types import CallToolResult, TextContent

    from loopwatch.mcp import _is_tool_error

    class LegacyResult(pydantic.BaseModel):  # mcp 1.x's CallToolResult: the flag is `isError`
        isError: bool = False

    class LegacyServerResult(pydantic.RootModel[LegacyResult]):  # and its ServerResult around it
        pass

    text = [TextContent(type="text", text="x")]
    cases = [
        ({"content": [], "isError": True}, True),
        ({"content": []}, False),
        (CallToolResult(content=text, is_error=True), True),
        (CallToolResult(content=text), False),
        (LegacyServerResult(LegacyResult(isError=True)), True),
        (LegacyServerResult(LegacyResult()), False),
        (LegacyResult(isError=True), True),
        (object(), False),
    ]
    for _ in range(2):  # the second time from each class's shape, found the first
        assert [_is_tool_error(result) for result, _ in cases] == [expected for _, expected in cases]
