"""Auto-offload: blockers move off the loop after they are caught; answers and context still work."""

import json
import threading

import anyio
import anyio.lowlevel
import pytest
from mcp import Client

import loopwatch

from helpers import client_for, fresh

pytestmark = pytest.mark.anyio


def wrapped(**options):
    server = fresh("offload_server", "mcp")
    options = {"threshold": 0.1, "log_blocks": False, "traces": False, **options}
    return server, loopwatch.instrument(server, **options)


def events_of(handle, kind):
    cls = loopwatch.OffloadEvent if kind == "offloaded" else loopwatch.BlockEvent
    return [e for e in handle.monitor.recent if isinstance(e, cls) and getattr(e, "kind", None) != "gc"]


async def beside(client, name, args, honest=8, **kwargs):
    async with anyio.create_task_group() as tg:
        for i in range(honest):
            tg.start_soon(client.call_tool, "ping", {"n": i})
        await anyio.sleep(0.005)
        tg.start_soon(lambda: client.call_tool(name, args, **kwargs))


async def test_a_tool_caught_blocking_moves_off_the_loop_and_blocks_no_more(anyio_backend):
    server, handle = wrapped()
    async with client_for(server) as client:
        await beside(client, "lookup", {"sku": "A"})
        await handle.monitor.settle()
        [moved] = [e for e in events_of(handle, "offloaded") if e.tool == "lookup"]
        assert moved.blocks == 1 and "blocking the loop" in moved.reason
        for _ in range(3):
            await beside(client, "lookup", {"sku": "B"})
        await handle.monitor.settle()
    blocks = [e for e in events_of(handle, "loop_blocked") if e.tool == "lookup"]
    assert len(blocks) == 1
    row = handle.snapshot()["tools"]["lookup"]
    assert (row["calls"], row["errors"], row["executes"]) == (4, 0, "thread")


async def test_every_progress_notification_arrives_after_the_move(anyio_backend):
    server, handle = wrapped(tool_policies={"lookup": "always"})
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with client_for(server) as client:
        result = await client.call_tool("lookup", {"sku": "P"}, progress_callback=on_progress)
        await handle.monitor.settle()
    assert json.loads(result.content[0].text) == {"sku": "P", "qty": 3}
    assert [s[2] for s in seen] == ["starting", "fetched", "parsed", "done"]
    assert not [e for e in events_of(handle, "loop_blocked") if e.tool == "lookup"]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_an_offloaded_tool_can_still_ask_the_client(anyio_backend):
    import mcp_types as types

    server, handle = wrapped(tool_policies={"confirm_order": "always"})

    async def answer(context, params):
        return types.ElicitResult(action="accept", content={"ok": True})

    async with Client(server, mode="legacy", elicitation_callback=answer) as client:
        result = await client.call_tool("confirm_order", {"sku": "E"})
    assert result.content[0].text == "accept:True"
    assert handle.snapshot()["tools"]["confirm_order"]["executes"] == "thread"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_answers_and_error_texts_are_identical_off_the_loop(anyio_backend):
    calls = [("strict", {"count": 3}), ("strict", {"count": -1}), ("strict", {"count": "many"}), ("strict", {})]

    async def outcomes(server):
        async with client_for(server) as client:
            return [(await client.call_tool(n, a)).model_dump(exclude={"meta"}) for n, a in calls]

    on_loop = await outcomes(fresh("offload_server", "mcp"))
    server, handle = wrapped(tool_policies={"strict": "always"})
    off_loop = await outcomes(server)
    assert off_loop == on_loop
    assert handle.snapshot()["tools"]["strict"]["executes"] == "thread"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
async def test_cancelling_an_offloaded_call_cancels_its_coroutine_on_its_own_loop(anyio_backend):
    server, handle = wrapped(tool_policies={"slow_async": "always"})
    cancelled = __import__("offload_server").CANCELLED
    async with client_for(server) as client:
        with anyio.move_on_after(0.3):
            await client.call_tool("slow_async", {"seconds": 30})
        with anyio.fail_after(10):
            while not cancelled:
                await anyio.sleep(0.01)
        assert (await client.call_tool("ping", {"n": 2})).structured_content == {"result": 2}
        offloader = handle.offload
        with anyio.fail_after(10):
            while offloader.pool.in_use:
                await anyio.sleep(0.01)
    assert cancelled == [30]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_call_stuck_in_a_blocking_call_frees_its_slot_when_it_returns_and_no_thread_leaks(anyio_backend):
    before = set(threading.enumerate())
    server, handle = wrapped(tool_policies={"stuck": "always"}, offload_workers=1)
    async with client_for(server) as client:
        with anyio.move_on_after(0.2):
            await client.call_tool("stuck", {"seconds": 0.8})  # the client gives up; the thread can't
        offloader = handle.offload
        assert offloader.pool.in_use == 1  # counted busy while the call is still running
        result = await client.call_tool("stuck", {"seconds": 0.01})  # waits for the one slot, then runs
        assert result.content[0].text == "unstuck"
        assert offloader.pool.in_use == 0
    handle.uninstrument()
    with anyio.fail_after(10):
        while set(threading.enumerate()) - before:
            await anyio.sleep(0.01)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_tool_bound_to_the_servers_loop_gets_its_error_once_is_pinned_and_never_runs_twice(anyio_backend):
    """The lifespan's client is out of the check's sight: the moved call fails as it happened (it is not run
    again: its side effects would repeat), the tool is pinned by the object's type, and later calls answer."""
    server, handle = wrapped(tool_policies={"locked": "always"})
    runs = __import__("offload_server").LOCKED_RUNS
    async with client_for(server) as client:
        first = await client.call_tool("locked", {})
        second = await client.call_tool("locked", {})
        await handle.monitor.settle()
    assert first.is_error and not second.is_error
    assert second.content[0].text == "row 1"
    assert len(runs) == 2  # one run per call: the failed one was not repeated on the loop
    [pinned] = [e for e in events_of(handle, "offloaded") if e.action == "pinned"]
    assert pinned.tool == "locked" and "Future bound to the server's loop" in pinned.reason
    assert "attached to a different loop" not in pinned.reason  # the type and the object, never the text
    assert handle.snapshot()["tools"]["locked"]["executes"] == "loop"


async def test_a_never_tool_stays_on_the_loop_however_often_it_blocks(anyio_backend):
    server, handle = wrapped(tool_policies={"lookup": "never"})
    async with client_for(server) as client:
        for _ in range(2):
            await client.call_tool("lookup", {"sku": "N"})
            await handle.monitor.settle()
    assert len([e for e in events_of(handle, "loop_blocked") if e.tool == "lookup"]) == 2
    assert events_of(handle, "offloaded") == []


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_strikes_within_the_window_decide_the_move(anyio_backend):
    server, handle = wrapped(strikes=2)
    async with client_for(server) as client:
        await client.call_tool("lookup", {"sku": "S"})
        await handle.monitor.settle()
        assert events_of(handle, "offloaded") == []
        await client.call_tool("lookup", {"sku": "S"})
        await handle.monitor.settle()
    [moved] = events_of(handle, "offloaded")
    assert moved.blocks == 2


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_restarted_server_starts_with_what_it_learned(anyio_backend, tmp_path):
    state = tmp_path / "offload.json"
    server, handle = wrapped(offload_state=str(state))
    async with client_for(server) as client:
        await client.call_tool("lookup", {"sku": "R"})
        await handle.monitor.settle()
    assert "lookup" in state.read_text()
    server2, handle2 = wrapped(offload_state=str(state))
    assert handle2.snapshot()["tools"] == {} and "lookup" in handle2.offload.offloaded
    async with client_for(server2) as client:
        await client.call_tool("lookup", {"sku": "R"})
        await handle2.monitor.settle()
    assert not [e for e in events_of(handle2, "loop_blocked") if e.tool == "lookup"]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_manual_policy_changes_are_events(anyio_backend):
    server, handle = wrapped()
    handle.set_tool_policy("lookup", "always")
    handle.set_tool_policy("lookup", "auto")
    await anyio.lowlevel.checkpoint()
    handle.monitor.pump()
    assert [(e.tool, e.action) for e in events_of(handle, "offloaded")] == [("lookup", "offloaded"), ("lookup", "restored")]
    off, off_handle = wrapped(offload="off")
    off_handle.set_tool_policy("lookup", "always")  # off stops automatic moves; an explicit one still applies
    assert "lookup" in off_handle.offload.offloaded


async def test_a_low_level_server_runs_an_offloaded_tools_calls_of_the_handler_off_the_loop(anyio_backend):
    server = fresh("low_server", "server")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False)
    async with client_for(server) as client:
        await client.list_tools()
        for _ in range(3):
            result = await client.call_tool("lookup", {})
            assert result.content[0].text == "found"
        await handle.monitor.settle()
        assert (await client.call_tool("ping", {})).content[0].text == "pong"
    assert len([e for e in events_of(handle, "loop_blocked") if e.tool == "lookup"]) == 1
    assert "lookup" in handle.offload.offloaded and "ping" not in handle.offload.offloaded


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_fastmcp_tool_moves_and_its_context_still_reports_progress(anyio_backend):
    import time

    from fastmcp import Context, FastMCP

    app = FastMCP("fm-offload")

    @app.tool
    async def lookup(sku: str, ctx: Context) -> str:
        await ctx.report_progress(0, 2)
        time.sleep(0.2)
        await ctx.report_progress(2, 2)
        return f"found {sku}"

    handle = loopwatch.instrument(app, threshold=0.1, log_blocks=False, traces=False)
    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with client_for(app) as client:
        await client.call_tool("lookup", {"sku": "F"})
        await handle.monitor.settle()
        result = await client.call_tool("lookup", {"sku": "G"}, progress_handler=on_progress)
        await handle.monitor.settle()
    assert result.data == "found G"
    assert seen == [0, 2]
    assert len([e for e in events_of(handle, "loop_blocked") if e.tool == "lookup"]) == 1
    assert handle.snapshot()["tools"]["lookup"]["executes"] == "thread"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_an_import_on_the_loop_is_reported_but_moves_nothing(anyio_backend):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False)
    async with client_for(server) as client:
        await client.call_tool("report", {})
        await handle.monitor.settle()
    assert [e.kind for e in events_of(handle, "loop_blocked") if e.tool == "report"] == ["import"]
    assert events_of(handle, "offloaded") == []


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_block_outside_the_tools_own_code_is_reported_but_moves_nothing(anyio_backend):
    import time

    server, handle = wrapped()

    async def slow_error_logging(ctx, call_next):  # like a framework rendering a traceback on the loop
        result = await call_next(ctx)
        if ctx.method == "tools/call":
            time.sleep(0.25)
        return result

    server.middleware.append(slow_error_logging)
    async with client_for(server) as client:
        await client.call_tool("ping", {"n": 1})
        await handle.monitor.settle()
    [block] = [e for e in events_of(handle, "loop_blocked") if e.tool == "ping"]
    assert block.culprit.function == "slow_error_logging"
    assert events_of(handle, "offloaded") == []


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_state_file_and_an_always_policy_move_a_tool_once(anyio_backend, tmp_path):
    state = tmp_path / "offload.json"
    server, handle = wrapped(offload_state=str(state), tool_policies={"lookup": "always"})
    handle.monitor.pump()
    server2, handle2 = wrapped(offload_state=str(state), tool_policies={"lookup": "always"})
    handle2.monitor.pump()
    assert [e.reason for e in events_of(handle2, "offloaded")] == ["learned earlier: policy always"]
    assert json.loads(state.read_text())["offloaded"] == {"lookup": "learned earlier: policy always"}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_offloaded_async_calls_run_side_by_side_up_to_the_call_limit(anyio_backend):
    server, handle = wrapped(tool_policies={"slow_async": "always"}, offload_workers=2, offload_max_calls=20)
    async with client_for(server) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(client.call_tool, "slow_async", {"seconds": 1.0})
            with anyio.fail_after(30):
                while handle.offload.pool.in_use < 20:  # all 20 running at once on 2 worker loops
                    await anyio.sleep(0.01)
            seen = handle.offload.pool.in_use
    assert seen == 20
    assert handle.offload.pool.in_use == 0


def test_the_core_runs_without_sniffio(tmp_path):
    """anyio no longer depends on sniffio: a core install has mcp and anyio only."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "no_sniffio.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.modules["sniffio"] = None  # importing it now fails, as where it is not installed
        sys.path.insert(0, {str(__import__("helpers").FIXTURES)!r})
        import anyio, loopwatch
        from mcp import Client
        import offload_server

        async def main():
            handle = loopwatch.instrument(offload_server.mcp, threshold=0.1, log_blocks=False, traces=False,
                                          tool_policies={{"lookup": "always"}})
            async with Client(offload_server.mcp) as client:
                result = await client.call_tool("lookup", {{"sku": "S"}})
            assert not result.is_error, result
            assert handle.monitor.backend == "asyncio"
            handle.uninstrument()

        anyio.run(main)  # trio itself depends on sniffio: without it, the loop is asyncio
        print("ok")
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_call_whose_context_takes_a_freed_calls_address_still_counts_as_a_strike(anyio_backend):
    """Counting each block once went by `id(ctx)`: the second call's context could take the first one's freed
    address, and its strike was dropped (a CI run failed on it in test_strikes_within_the_window_...)."""
    import gc

    from loopwatch._blame import CallRecord

    class Ctx:  # a request context: weak references allowed, as the SDK's dataclass
        pass

    server, handle = wrapped(strikes=2)
    offloader = handle.offload
    first = Ctx()
    address = id(first)
    offloader.on_blocking(CallRecord("tools/call", "lookup", 1, first, "lookup"), 0.15, False, ())
    offloader.on_blocking(CallRecord("tools/call", "lookup", 1, first, "lookup"), 0.30, False, ())  # the same call
    assert "lookup" not in offloader.offloaded  # one call, one strike
    del first
    gc.collect()
    kept, second = [], Ctx()
    while id(second) != address and len(kept) < 100_000:  # freed memory is handed out again: find that address
        kept.append(second)
        second = Ctx()
    assert id(second) == address
    offloader.on_blocking(CallRecord("tools/call", "lookup", 2, second, "lookup"), 0.15, False, ())
    assert "lookup" in offloader.offloaded  # two calls, two strikes: moved
    [moved] = [e for e in handle.monitor.recent if isinstance(e, loopwatch.OffloadEvent)]
    assert (moved.tool, moved.action, moved.blocks) == ("lookup", "offloaded", 2)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_deprecated_context_method_warns_at_the_tools_line_after_the_move_as_before(anyio_backend):
    """`ctx.info` is a `@deprecated` wrapper: called through the offload bridge, its warning named loopwatch's
    _offload.py as the place of the call instead of the tool's own line."""
    import warnings

    from mcp.server.mcpserver import Context, MCPServer

    def where(policies):
        server = MCPServer("deprecations")

        @server.tool()
        async def note(ctx: Context) -> str:
            await ctx.info("noted")
            return "ok"

        handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False, tool_policies=policies)
        return server, handle

    async def warnings_of(server):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            async with client_for(server) as client:
                result = await client.call_tool("note", {})
        assert result.content[0].text == "ok"
        return [(w.category, str(w.message), w.filename, w.lineno) for w in seen if "logging" in str(w.message)]

    bare_server, _ = where({})
    bare = await warnings_of(bare_server)
    moved_server, handle = where({"note": "always"})
    moved = await warnings_of(moved_server)
    assert handle.snapshot()["tools"]["note"]["executes"] == "thread"
    assert bare and bare[0][2] == __file__  # the tool's own line, then the SDK's own (info calls log)
    assert moved == bare
