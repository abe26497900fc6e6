"""Process offload: a tool's calls run in worker processes; answers, errors and context are as on the loop."""

import json
import logging
import os
import threading
from pathlib import Path

import anyio
import pytest
from mcp import Client

import loopwatch
from loopwatch import OffloadEvent
from loopwatch._options import OptionError, Options
from loopwatch.aiomonitor import policy_text
from loopwatch.cli import _policies

from helpers import fresh, threads_left

pytestmark = pytest.mark.anyio

ALL = ("crunch", "crunch_sync", "words", "refuse", "crash", "protocol_error", "where", "progress", "uses_lifespan",
       "die", "stuck_in_c", "hog", "unpicklable_result")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def wrapped(policies=ALL, **options):
    server = fresh("cpu_server", "mcp")
    options = {"threshold": 0.1, "log_blocks": False, "traces": False, "offload_processes": 1, **options}
    handle = loopwatch.instrument(server, tool_policies={t: "process" for t in policies}, **options)
    return server, handle


def offload_events(handle, tool):
    return [e for e in handle.monitor.recent if isinstance(e, OffloadEvent) and e.tool == tool]


async def until(check, timeout=30.0):
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - the state is read from the pool's tables
            await anyio.sleep(0.01)


def children() -> set[int]:
    """Live child processes of this process (zombies too: an unreaped worker counts as left behind)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with open(task / "children") as file:
            found.update(int(pid) for pid in file.read().split())
    return found


async def answers(server, calls):
    out = []
    async with Client(server) as client:
        for name, args in calls:
            try:
                out.append((await client.call_tool(name, args)).model_dump(exclude={"meta"}))
            except Exception as exc:  # a JSON-RPC error: its code, message and data
                out.append(("raised", type(exc).__name__, str(exc), getattr(getattr(exc, "error", None), "data", None)))
    return out


async def test_answers_and_error_texts_are_identical_in_a_process_and_on_the_loop():
    calls = [("crunch", {"rounds": 5000}), ("crunch_sync", {"rounds": 300}), ("words", {"text": "a b  c"}),
             ("refuse", {"why": "no stock"}), ("crash", {"secret": "hunter2"}), ("protocol_error", {}),
             ("crunch", {"rounds": "many"}), ("words", {})]
    bare = await answers(fresh("cpu_server", "mcp"), calls)
    server, handle = wrapped()
    in_process = await answers(server, calls)
    assert in_process == bare
    assert handle.offload.processes.pool.started >= 1  # the calls did go to a worker
    assert handle.snapshot()["tools"]["crunch"]["executes"] == "process"
    handle.uninstrument()


async def test_the_call_runs_in_another_process_and_snapshot_shows_it():
    server, handle = wrapped()
    async with Client(server) as client:
        pid = (await client.call_tool("where", {})).structured_content["result"]
        snapshot = handle.offload.snapshot()
        workers = {w.process.pid for w in handle.offload.processes.pool.workers}
    assert pid != os.getpid() and pid in workers
    assert handle.offload.processes.pool.workers == [], "the server's end stops its workers"
    assert snapshot["executes"]["where"] == "process" and snapshot["processes"] == 1
    assert [e.executes for e in offload_events(handle, "where")] == ["process"]
    handle.uninstrument()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_progress_and_log_messages_made_in_the_worker_reach_the_client_in_order(anyio_backend):
    server, handle = wrapped()
    progress, logs = [], []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def on_log(params):
        logs.append(params.data)

    async with Client(server, mode="legacy", logging_callback=on_log) as client:
        result = await client.call_tool("progress", {"steps": 5}, progress_callback=on_progress)
    assert result.is_error is False and result.content[0].text.startswith("done 5 for request ")
    assert progress == [(i, 5, f"step {i}") for i in range(1, 6)]
    assert any("starting 5 steps" in str(data) for data in logs)
    assert handle.offload.executes.get("progress") == "process", "a context that crosses keeps the tool in a process"
    handle.uninstrument()


async def test_the_lifespan_context_does_not_cross_the_call_fails_clearly_and_the_tool_is_pinned_to_threads():
    server, handle = wrapped()
    async with Client(server) as client:
        first = await client.call_tool("uses_lifespan", {})
        second = await client.call_tool("uses_lifespan", {})
    text = first.content[0].text
    assert first.is_error and "uses_lifespan" in text and "lifespan_context" in text and "cannot cross" in text
    assert second.is_error is False and second.content[0].text == "a live pool"
    [pinned] = [e for e in offload_events(handle, "uses_lifespan") if e.action == "pinned"]
    assert pinned.executes == "thread" and "lifespan" in pinned.reason
    assert handle.snapshot()["tools"]["uses_lifespan"]["executes"] == "thread"
    handle.uninstrument()


async def test_a_result_that_does_not_pickle_fails_clearly_and_pins_the_tool_to_threads():
    server, handle = wrapped()
    async with Client(server) as client:
        result = await client.call_tool("unpicklable_result", {})
    assert result.is_error and "does not pickle" in result.content[0].text
    assert handle.monitor.where("unpicklable_result") == "thread"
    handle.uninstrument()


async def test_a_worker_that_is_killed_answers_its_call_with_an_error_and_is_replaced():
    server, handle = wrapped()
    async with Client(server) as client:
        before = (await client.call_tool("where", {})).structured_content["result"]
        died = await client.call_tool("die", {})
        after = (await client.call_tool("where", {})).structured_content["result"]
        alive = handle.offload.processes.pool.alive
    assert died.is_error and "died (killed by SIGKILL)" in died.content[0].text
    assert after != before and alive == 1
    handle.uninstrument()


async def test_a_call_over_the_memory_limit_fails_and_its_worker_is_replaced():
    server, handle = wrapped(offload_process_memory=1024)
    async with Client(server) as client:
        before = (await client.call_tool("where", {})).structured_content["result"]
        over = await client.call_tool("hog", {"megabytes": 4096})
        fine = await client.call_tool("hog", {"megabytes": 8})
        after = (await client.call_tool("where", {})).structured_content["result"]
    assert over.is_error and fine.structured_content == {"result": 8 * 1024 * 1024}
    assert after != before
    handle.uninstrument()


async def test_cancelling_a_call_stuck_in_c_kills_its_worker_after_the_grace_period_and_replaces_it():
    server, handle = wrapped()
    pool = handle.offload.processes.pool
    pool.grace = 0.5
    async with Client(server) as client:
        before = (await client.call_tool("where", {})).structured_content["result"]
        with anyio.move_on_after(1.0):
            await client.call_tool("stuck_in_c", {})
        await until(lambda: pool.in_use == 0 and before not in {w.process.pid for w in pool.workers})
        after = (await client.call_tool("where", {})).structured_content["result"]
    assert after != before
    handle.uninstrument()


async def test_a_storm_of_200_cancelled_process_calls_leaves_no_process_thread_or_slot_behind():
    threads_before = set(threading.enumerate())
    children_before = children()
    server, handle = wrapped(offload_processes=2)
    processes = handle.offload.processes
    async with Client(server) as client:
        assert (await client.call_tool("crunch", {"rounds": 10})).is_error is False
        for _ in range(2):
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(client.call_tool, "crunch", {"rounds": 10**10})  # hours, unless interrupted
                await until(lambda: handle.snapshot()["tools"]["crunch"]["in_flight"] == 100)
                tg.cancel_scope.cancel()
        await until(lambda: processes.pool.in_use == 0 and processes._limiter.borrowed_tokens == 0)
        assert len(children() - children_before) <= 2
        assert processes.pool.started == 2, "the running calls were interrupted in their workers, none killed"
        assert (await client.call_tool("crunch", {"rounds": 10})).structured_content["rounds"] == 10
    assert handle.snapshot()["tools"]["crunch"]["errors"] == 200
    handle.uninstrument()
    assert children() - children_before == set()
    assert await threads_left(threads_before) == []


async def test_a_pool_that_cannot_start_says_so_once_and_its_tools_answer_on_threads(caplog):
    server, handle = wrapped()
    handle.offload.processes.pool.python = "/nonexistent/python"
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        async with Client(server) as client:
            results = [await client.call_tool("crunch", {"rounds": 100}) for _ in range(3)]
    assert [r.structured_content["rounds"] for r in results] == [100] * 3
    assert len([r for r in caplog.records if "cannot start" in r.getMessage()]) == 1
    assert handle.monitor.where("crunch") == "thread"
    assert [e.executes for e in offload_events(handle, "crunch") if e.action == "pinned"] == ["thread"]
    handle.uninstrument()


class FakeContext:
    """A request's context as far as the strike count needs one (weakly referenced, one per call)."""


REQUESTS = iter(range(1, 1000))
KEEP: list = []


def cpu_block(tool, cpu_share=0.9, kind="cpu"):
    """What the watchdog tells the hooks when a call of `tool` held the loop 300 ms (injected: no timing here)."""
    from loopwatch._blame import CallRecord
    from loopwatch._events import BlockEvent

    event = BlockEvent(time=0.0, duration_s=0.3, kind=kind, tool=tool, method="tools/call", request_id="1",
                       session_id=None, cpu_s=0.3 * cpu_share, samples=30)
    return event, CallRecord("tools/call", tool, next(REQUESTS), FakeContext(), tool)


def strike(handle, tool, **block):
    """The first strike, as the watchdog delivers it: the move while the block goes on, then its end."""
    event, call = cpu_block(tool, **block)
    KEEP.append(call)
    handle.offload.processes.load = lambda: (0.5, 0.5, 0.5)  # an idle machine: the share needed is half the block
    handle.offload.on_blocking(call, 0.15, False, ())
    for hook in list(handle.monitor.block_hooks):
        hook(event, call)


async def test_with_offload_cpu_process_a_cpu_blocker_moves_to_a_process_on_its_first_strike():
    server, handle = wrapped(policies=(), offload_cpu="process")
    strike(handle, "crunch")
    async with Client(server) as client:
        result = await client.call_tool("crunch", {"rounds": 1000})
        pid = (await client.call_tool("where", {})).structured_content["result"]
    assert result.structured_content["rounds"] == 1000 and handle.offload.processes.pool.started == 1
    moved = [e for e in offload_events(handle, "crunch") if e.executes == "process"]
    assert "[cpu]" in moved[0].reason and "--offload-cpu process" in moved[0].reason
    assert handle.snapshot()["tools"]["crunch"]["executes"] == "process"
    assert pid == os.getpid(), "a tool that never blocked stays where it was"
    handle.uninstrument()


async def test_by_default_a_cpu_blocker_moves_to_a_thread_and_the_decision_says_a_process_would_cure_it():
    server, handle = wrapped(policies=())
    strike(handle, "crunch")
    strike(handle, "words", cpu_share=0.2)  # `cpu` by demand, but the loop thread hardly ran: a loaded machine
    assert handle.monitor.where("crunch") == "thread" and handle.monitor.where("words") == "thread"
    [first, advice] = offload_events(handle, "crunch")
    assert (first.action, advice.action) == ("offloaded", "advised")
    assert (first.executes, advice.executes) == ("thread", "thread")
    assert "--offload-policy crunch=process would cure it" in advice.reason and "[cpu]" in advice.reason
    assert [e.reason for e in offload_events(handle, "words") if "cure" in e.reason] == []
    handle.uninstrument()


async def test_a_native_call_holding_the_gil_is_advised_a_process_and_moves_to_one_with_offload_cpu_process():
    """A `gil` block (a native call that holds the GIL: a thread does not cure it either) gets the process cure."""
    server, handle = wrapped(policies=())
    strike(handle, "crunch", kind="gil", cpu_share=0.0)  # the watchdog could not sample: the GIL was held
    [first, advice] = offload_events(handle, "crunch")
    assert (first.action, advice.action) == ("offloaded", "advised")
    assert "--offload-policy crunch=process would cure it" in advice.reason and "[gil]" in advice.reason
    handle.uninstrument()
    server, handle = wrapped(policies=(), offload_cpu="process")
    strike(handle, "crunch", kind="gil", cpu_share=0.0)
    moved = [e for e in offload_events(handle, "crunch") if e.executes == "process"]
    assert moved and "[gil]" in moved[0].reason
    handle.uninstrument()


async def test_the_advice_to_use_a_process_is_not_a_second_offload_decision_in_the_metrics():
    """The advice came as a second `offloaded` event: loopwatch_tool_offload_decisions counted one move twice."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    server, handle = wrapped(policies=(), metrics_registry=registry)
    strike(handle, "crunch")
    [moved, advice] = offload_events(handle, "crunch")
    decisions = "loopwatch_tool_offload_decisions_total"
    counted = {a: registry.get_sample_value(decisions, {"gen_ai_tool_name": "crunch", "action": a})
               for a in ("offloaded", "advised")}
    assert counted == {"offloaded": 1, "advised": None}
    assert (moved.action, advice.action) == ("offloaded", "advised") and "would cure it" in advice.reason
    assert registry.get_sample_value("loopwatch_tool_offloaded", {"gen_ai_tool_name": "crunch"}) == 1
    handle.uninstrument()


async def test_a_cpu_blocker_that_cannot_run_in_a_process_stays_on_a_thread_and_says_why():
    server, handle = wrapped(policies=(), offload_cpu="process")
    handle.offload.processes.pool.failed = "no python here"
    strike(handle, "crunch")
    assert handle.monitor.where("crunch") == "thread"
    [_, advice] = offload_events(handle, "crunch")
    assert "stays on a thread: the process pool cannot start (no python here)" in advice.reason
    handle.uninstrument()


async def test_a_real_cpu_block_is_reported_with_the_cure_when_the_machine_classifies_it_cpu():
    """End to end (the watchdog classifies): a loaded machine may call this block `gil`, so only `cpu` is checked."""
    server, handle = wrapped(policies=())

    async with Client(server) as client:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(client.call_tool, "ping", {"n": i})
            tg.start_soon(client.call_tool, "crunch", {"rounds": 3_000_000})
        await handle.monitor.settle()
    blocks = [e for e in handle.monitor.recent if getattr(e, "kind", None) == "cpu" and e.tool == "crunch"]
    if blocks and handle.offload.processes._cpu_bound(blocks[0]):
        await until(lambda: any("would cure it" in e.reason for e in offload_events(handle, "crunch")), 10)
    handle.uninstrument()


async def test_the_console_moves_a_tool_to_a_process_and_says_why_when_it_cannot():
    server, handle = wrapped(policies=())
    assert policy_text([handle], "crunch", "process") == "✓ crunch runs in a worker process from its next call " \
                                                         "(policy process)"
    assert handle.monitor.where("crunch") == "process"
    handle.uninstrument()
    low = fresh("low_server", "server")
    low_handle = loopwatch.instrument(low, log_blocks=False, traces=False)
    tools = [t for t in ("slow", "block", "lookup") if t]
    text = policy_text([low_handle], tools[0], "process")
    assert text.startswith("✗") and "cannot run in a process" in text and "low-level" in text
    low_handle.uninstrument()


async def test_the_state_file_remembers_that_a_tool_runs_in_a_process(tmp_path):
    state = tmp_path / "state.json"
    server, handle = wrapped(policies=("crunch",), offload_state=str(state))
    assert json.loads(state.read_text())["executes"] == {"crunch": "process"}
    handle.uninstrument()
    server, handle = wrapped(policies=(), offload_state=str(state))
    assert handle.monitor.where("crunch") == "process"
    handle.uninstrument()


def test_the_process_options_are_checked():
    assert _policies("convert=process,b=never") == {"convert": "process", "b": "never"}
    assert Options(tool_policies={"a": "process"}, offload_cpu="process").offload_processes == 2
    with pytest.raises(OptionError, match="offload_cpu"):
        Options(offload_cpu="fork")
    with pytest.raises(OptionError, match="offload_process_memory"):
        Options(offload_process_memory=1)


async def test_spans_and_metrics_say_the_call_executes_in_a_process(exporter):
    from prometheus_client import CollectorRegistry

    exporter.clear()
    registry = CollectorRegistry()
    server, handle = wrapped(policies=("crunch",), traces=True, metrics_registry=registry)
    async with Client(server) as client:
        await client.call_tool("crunch", {"rounds": 100})
        await until(lambda: registry.get_sample_value("loopwatch_offload_processes_alive") == 1, 10)
        await until(lambda: registry.get_sample_value("loopwatch_offload_processes_in_use") == 0, 10)
        with anyio.fail_after(10):
            while not [s for s in exporter.get_finished_spans() if s.name == "tools/call crunch"]:
                await anyio.sleep(0.02)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "tools/call crunch"]
    assert span.attributes["loopwatch.execution"] == "process"
    assert registry.get_sample_value("loopwatch_tool_in_process", {"gen_ai_tool_name": "crunch"}) == 1
    assert registry.get_sample_value("loopwatch_offload_processes") == 1
    handle.uninstrument()


async def fastmcp_answers(app, calls):
    import fastmcp

    out, progress = [], []

    async def on_progress(value, total, message):
        progress.append((value, total))

    async with fastmcp.Client(app) as client:
        for name, args in calls:
            result = await client.call_tool(name, args, progress_handler=on_progress, raise_on_error=False)
            data = result.structured_content
            out.append((result.is_error, {k: v for k, v in (data or {}).items() if k != "pid"},
                        [getattr(c, "text", None) for c in result.content if "pid" not in str(getattr(c, "text", ""))]))
    return out, progress


async def test_a_fastmcp_tool_in_a_process_answers_as_on_the_loop_with_its_progress():
    calls = [("crunch", {"rounds": 3000}), ("fail", {"reason": "closed"})]
    bare = await fastmcp_answers(fresh("fm_cpu_server", "app"), calls)
    app = fresh("fm_cpu_server", "app")
    handle = loopwatch.instrument(app, log_blocks=False, traces=False, offload_processes=1,
                                  tool_policies={"crunch": "process", "fail": "process"})
    moved = await fastmcp_answers(app, calls)
    assert moved == bare and bare[1] == [(0.0, 1.0), (1.0, 1.0)]
    assert handle.offload.processes.pool.started == 1 and handle.monitor.where("crunch") == "process"
    handle.uninstrument()


async def test_lw_offload_process_moves_a_tool_to_a_worker_process_and_lw_tools_shows_it():
    from test_aiomonitor import lw, started_console

    from helpers import free_port

    server, handle = wrapped(policies=(), monitor=True, monitor_port=free_port(3))
    async with Client(server) as client:
        aiomonitor = await started_console(handle)
        await client.call_tool("crunch", {"rounds": 10})
        moved = lw(aiomonitor, "lw-offload", "--process", "crunch")
        answer = await client.call_tool("crunch", {"rounds": 10})
        tools = lw(aiomonitor, "lw-tools")
    assert moved.startswith("✓ crunch runs in a worker process")
    assert answer.structured_content["rounds"] == 10 and handle.offload.processes.pool.started == 1
    assert [line.split()[-1] for line in tools.splitlines() if line.split()[:1] == ["crunch"]] == ["process"]
    handle.uninstrument()


def test_decisions_say_where_the_tool_runs_now():
    def event(action, executes):
        return OffloadEvent(time=0.0, tool="t", action=action, reason="r", blocks=1, executes=executes)

    assert "now runs off the loop (in a process)" in event("offloaded", "process").describe()
    assert "is pinned to threads" in event("pinned", "thread").describe()
    assert "is pinned to the loop" in event("pinned", "loop").describe()
    assert event("offloaded", "process").to_dict()["executes"] == "process"


async def test_a_tool_in_a_process_can_still_ask_the_client():
    import mcp_types as types

    async def answer(context, params):
        return types.ElicitResult(action="accept", content={"ok": True})

    server, handle = wrapped(policies=("confirm",))
    async with Client(server, mode="legacy", elicitation_callback=answer) as client:
        result = await client.call_tool("confirm", {"sku": "E"})
    assert result.content[0].text == "accept:True"
    assert handle.monitor.where("confirm") == "process" and handle.offload.processes.pool.started == 1
    handle.uninstrument()
