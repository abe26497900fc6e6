"""Servers on mcp 1.x -- the 1.x low-level Server, FastMCP 1, fastmcp 2.x and 3.x -- in environments of their own
(tests/venvs.py), run under `loopwatch run` and driven by this run's mcp 2.x client, as a user's client drives them.

Each fixture server (tests/fixtures/mcp1/) has a synchronous tool (`report`), an `async def` tool that calls a
blocking library (`lookup`) and an honest one (`ping`).
"""

import json
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from venvs import venv_fixture

from helpers import FIXTURES, free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HERE = FIXTURES / "mcp1"
MCP1_FASTMCP2 = ["mcp>=1.24,<2", "fastmcp>=2.14,<3", "pytest>=8"]  # pytest: the plugin, in that environment
MCP1_FASTMCP3 = ["fastmcp>=3,<4", "pytest>=8"]
mcp1_fastmcp2 = venv_fixture("mcp1-fastmcp2", MCP1_FASTMCP2, loopwatch="[all]")
mcp1_fastmcp3 = venv_fixture("mcp1-fastmcp3", MCP1_FASTMCP3, loopwatch="[all]")

# family: (environment fixture, server file, the line the synchronous tool blocks on)
FAMILIES = {
    "fastmcp1": ("mcp1_fastmcp2", "fastmcp1_server.py", "time.sleep(0.3)  # the synchronous tool"),
    "mcp1-lowlevel": ("mcp1_fastmcp2", "low_server.py", "time.sleep(0.3)  # the synchronous helper"),
    "fastmcp2": ("mcp1_fastmcp2", "fastmcp_server.py", "time.sleep(0.3)  # the synchronous tool"),
    "fastmcp3": ("mcp1_fastmcp3", "fastmcp_server.py", "time.sleep(0.3)  # the synchronous tool"),
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=list(FAMILIES))
def family(request):
    env_name, server, sync_line = FAMILIES[request.param]
    env = request.getfixturevalue(env_name)
    assert env.version("mcp").startswith("1."), "installing loopwatch moved the server's SDK"
    return request.param, env, HERE / server, sync_line


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def watched(env, server, *args):
    return StdioServerParameters(
        command=env.python, args=["-m", "loopwatch", "run", str(server), "--threshold", "0.1", *args], env=env.env()
    )


def bare(env, server):
    return StdioServerParameters(command=env.python, args=[str(server)], env=env.env(), cwd=str(HERE))


async def beside(client, blocker, args, honest=8):
    async with anyio.create_task_group() as tg:
        for i in range(honest):
            tg.start_soon(client.call_tool, "ping", {"n": i})
        await anyio.sleep(0.01)
        tg.start_soon(client.call_tool, blocker, args)


def blocks(path, wanted, timeout=15.0, skip=0):
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read_events(path)[skip:] if e["event"] == "loop_blocked" and e["kind"] != "gc"]
        if {e["tool"] for e in found} >= wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


async def test_both_blockers_are_blamed_with_tool_kind_and_line_then_moved_and_no_honest_call_is_blamed(
    family, tmp_path
):
    name, env, server, sync_line = family
    events = tmp_path / "events.jsonl"
    with anyio.fail_after(90):
        async with Client(watched(env, server, "--events", str(events)), mode="legacy") as client:
            await client.call_tool("ping", {})  # a first call may import on the loop (fastmcp 3 does): not counted
            await anyio.sleep(0.5)
            warm_up = len(read_events(events))
            await beside(client, "report", {"n": 1})
            await beside(client, "lookup", {"sku": "A-7"})
            await anyio.sleep(0.3)  # the watchdog reports a block once the loop is free again
            await beside(client, "report", {"n": 2})  # moved by now: off the loop
            await beside(client, "lookup", {"sku": "A-8"})
            answer = await client.call_tool("report", {"n": 3})
    assert [c.text for c in answer.content] == ["report 3"]
    found = blocks(events, {"report", "lookup"}, skip=warm_up)
    by_tool = {}
    for event in found:
        if event["method"]:  # (a stall of the whole process on a loaded machine blames no call: not counted)
            by_tool.setdefault(event["tool"], []).append(event)
    assert set(by_tool) == {"report", "lookup"}, found  # no honest call blamed, nothing else either

    [report] = by_tool["report"]  # once: its later calls ran on a worker thread
    assert report["kind"] == "wait" and report["method"] == "tools/call" and report["request_id"]
    assert report["frames"][-1]["file"] == str(server)
    assert report["frames"][-1]["line"] == line_of(server, sync_line)

    [lookup] = by_tool["lookup"]
    assert lookup["kind"] == "wait" and lookup["request_id"] and lookup["request_id"] != report["request_id"]
    assert lookup["frames"][-1]["file"].endswith("legacy_lib.py")
    assert lookup["frames"][-1]["line"] == line_of(HERE / "legacy_lib.py", "time.sleep(delay)")
    assert lookup["culprit"] == lookup["frames"][-1]  # the line to fix: the sleep in the server's own helper module
    call_site = {"file": str(server), "line": line_of(server, "legacy_lib.fetch_record(")}
    assert any(f["file"] == call_site["file"] and f["line"] == call_site["line"] for f in lookup["frames"])

    moved = {e["tool"] for e in read_events(events) if e["event"] == "offloaded"}
    assert moved == {"report", "lookup"}


CALLS = [
    ("ping", {"n": 1}),
    ("report", {"n": 2}),
    ("lookup", {"sku": "B-1"}),
    ("whoami", {}),
    ("chatty", {}),
    ("chatty", {}),  # the second call runs where the first one's block moved it
    ("fail", {"reason": "no stock"}),
    ("broken", {}),
    ("nope", {}),
    ("ping", {"n": "not a number"}),
]


async def transcript(params, mode):
    """Every answer, error and log message a client sees, in order."""
    logs, seen = [], []

    async def on_log(params):
        logs.append(repr(params.data))

    with anyio.fail_after(60):
        async with Client(params, mode=mode, logging_callback=on_log) as client:
            seen.append(sorted(t.name for t in (await client.list_tools()).tools))
            for tool, args in CALLS:
                try:
                    result = await client.call_tool(tool, args)
                except MCPError as exc:
                    seen.append(("error", exc.error.code, exc.error.message))
                else:
                    content = [c.model_dump(mode="json", exclude_none=True) for c in result.content]
                    seen.append(("result", result.is_error, content, result.structured_content))
    return seen, logs


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_answers_errors_and_log_messages_are_the_bare_servers(family, mode):
    """`auto` against a 1.x server: `server/discover` is refused and the client falls back to the handshake.
    That is the SDK's behaviour, the same for every framework on it: tried on the SDK's own two."""
    name, env, server, _ = family
    if mode == "auto" and name.startswith("fastmcp") and name != "fastmcp1":
        pytest.skip("the auto era against mcp 1.x is the SDK's: covered by fastmcp1 and mcp1-lowlevel")
    results = {}

    async def run(key, params):
        results[key] = await transcript(params, mode)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "bare", bare(env, server))
        tg.start_soon(run, "wrapped", watched(env, server))
    assert results["wrapped"] == results["bare"]
    seen, logs = results["bare"]
    assert "pong 1" in json.dumps(seen) and "report 2" in json.dumps(seen)
    assert len([s for s in seen if s[0] == "error" or s[1] is True]) == 4  # fail, broken, nope, a bad argument
    assert len(logs) == (2 if name == "mcp1-lowlevel" else 4), logs  # the moved chatty call's messages arrive


async def test_auto_mode_against_a_1x_server_falls_back_to_the_handshake(mcp1_fastmcp2):
    with anyio.fail_after(60):
        async with Client(watched(mcp1_fastmcp2, HERE / "low_server.py"), mode="auto") as client:
            assert client.protocol_version < "2026"  # a handshake-era version: the fallback happened
            assert [c.text for c in (await client.call_tool("ping", {"n": 5})).content] == ["pong 5"]


# -- streamable HTTP: the session id, and metrics on the server's own app ---------------------------------


def wait_for_port(port, proc, timeout=30.0):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not listen in time")


async def two_sessions(url):
    """A first session opens, a second one joins, the first one leaves; then the second one's calls block.
    (An mcp 1.x server enters its lifespan once per HTTP session: the watch must outlive the first.)"""
    first_open, first_closed = anyio.Event(), anyio.Event()

    async def first():
        async with Client(url, mode="legacy") as client:
            await client.list_tools()  # as clients do: a low-level server's tool names are learned from it
            await client.call_tool("ping", {})
            first_open.set()
            await anyio.sleep(0.3)
        first_closed.set()

    async def second():
        await first_open.wait()
        async with Client(url, mode="legacy") as client:
            await client.list_tools()
            await first_closed.wait()
            await anyio.sleep(0.2)
            await beside(client, "lookup", {"sku": "H"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(second)


def scrape(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.parametrize("server", ["fastmcp1_server.py", "low_server.py", "fastmcp_server.py"])
async def test_over_streamable_http_blocks_carry_the_session_and_metrics_count_the_calls(
    mcp1_fastmcp2, server, tmp_path
):
    port, events = free_port(), tmp_path / "events.jsonl"
    args = ["--transport", "streamable-http", "--port", str(port), "--metrics-path", "/metrics", "--events", str(events)]
    proc = subprocess.Popen(
        [mcp1_fastmcp2.python, "-m", "loopwatch", "run", str(HERE / server), "--threshold", "0.1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=mcp1_fastmcp2.env(),
    )
    try:
        wait_for_port(port, proc)
        with anyio.fail_after(60):
            await two_sessions(f"http://127.0.0.1:{port}/mcp")
            metrics = await anyio.to_thread.run_sync(scrape, f"http://127.0.0.1:{port}/metrics")
        [event] = [e for e in blocks(events, {"lookup"}) if e["tool"] == "lookup"]
        assert event["session_id"], "handshake-era streamable HTTP carries a session id"
        assert event["request_id"] and event["culprit"]["file"].startswith(str(HERE))  # the server's own code
        calls = [line for line in metrics.splitlines() if line.startswith("mcp_server_operation_duration_seconds_count")]
        assert any('gen_ai_tool_name="ping"' in line and 'network_transport="tcp"' in line and line.endswith(" 9.0")
                   for line in calls), calls
        assert 'loopwatch_event_loop_blocks_total{gen_ai_tool_name="lookup",kind="wait"} 1.0' in metrics
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.stdout.read() == b""


@pytest.mark.parametrize("server", ["fastmcp1_server.py", "low_server.py", "fastmcp_server.py"])
async def test_over_sse_blocks_are_blamed_on_the_call(mcp1_fastmcp2, server, tmp_path):
    from mcp import ClientSession
    from mcp.client.sse import sse_client

    port, events = free_port(), tmp_path / "events.jsonl"
    args = ["--transport", "sse", "--port", str(port), "--events", str(events)]
    proc = subprocess.Popen(
        [mcp1_fastmcp2.python, "-m", "loopwatch", "run", str(HERE / server), "--threshold", "0.1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=mcp1_fastmcp2.env(),
    )
    try:
        wait_for_port(port, proc)
        with anyio.fail_after(60):
            async with sse_client(f"http://127.0.0.1:{port}/sse") as (read, write), ClientSession(read, write) as s:
                await s.initialize()
                await s.call_tool("ping", {})
                answer = await s.call_tool("lookup", {"sku": "S"})
        assert "S" in answer.content[0].text
        [event] = [e for e in blocks(events, {"lookup"}) if e["tool"] == "lookup"]
        assert event["request_id"] and event["kind"] == "wait" and event["culprit"]["file"].startswith(str(HERE))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.stdout.read() == b""


# -- in the server's own process, on mcp 1.x: instrument(), traces, metrics, watch(), testing ------------


@pytest.mark.parametrize(
    "env_name, families",
    [("mcp1_fastmcp2", ["fastmcp1", "mcp1-lowlevel", "fastmcp"]), ("mcp1_fastmcp3", ["fastmcp"])],
    ids=["fastmcp1+lowlevel+fastmcp2", "fastmcp3"],
)
def test_in_process_features_work_on_mcp_1x(env_name, families, request):
    """instrument() (timing, blame, offload and context), metrics, traces, watch(), the testing API, the console
    and the pytest plugin, on each family in its own environment."""
    env = request.getfixturevalue(env_name)
    script = FIXTURES / "mcp1" / "inprocess_checks.py"
    done = subprocess.run([env.python, str(script), *families], capture_output=True, text=True, timeout=300,
                          env=env.env(), cwd=str(HERE))
    assert done.returncode == 0, done.stderr[-4000:]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {name: detail for name, (ok, detail) in checks.items() if not ok}
    assert not failed, failed
    for family in families:  # every family ran every check (a step that raised is a failed check above)
        label = {"fastmcp": "fastmcp" + env_name[-1]}.get(family, family)
        mine = [name for name in checks if name.split(":")[0] == label]
        assert len(mine) >= (9 if family == "mcp1-lowlevel" else 19), (label, sorted(checks))


# -- a published server that pins mcp<2, installed from PyPI together with loopwatch -----------------------

CALCULATOR = ["mcp-server-calculator==0.2.1"]  # `mcp<2,>=1.4.1`; FastMCP 1; an `async def calculate` tool
calculator = venv_fixture("published-calculator", CALCULATOR)
HEAVY = " + ".join(["(3**300000 % 7)"] * 40)  # big-integer powers (about 0.5 s of CPU), in the server's evaluator
# (forty of them, not one: a single native call that holds the GIL for the whole block can't be sampled)
SUMS = ["1+2", "sqrt(16)", "2^10", "1/0", "nosuch(1)", "pi*2"]


@pytest.mark.parametrize("form", ["target", "command"])
async def test_a_published_server_pinning_mcp_below_2_keeps_its_sdk_and_is_watched(calculator, form, tmp_path):
    """`loopwatch run module:object`, and `loopwatch run -- mcp-server-calculator` (its own console script)."""
    assert calculator.version("mcp").startswith("1."), "installing loopwatch moved the server's SDK"
    events = tmp_path / "events.jsonl"
    own = StdioServerParameters(command=calculator.exe("mcp-server-calculator"), env=calculator.env())
    how = ["mcp_server_calculator.calculator:mcp"] if form == "target" else []
    then = ["--", "mcp-server-calculator"] if form == "command" else []
    wrapped = StdioServerParameters(
        command=calculator.exe("loopwatch"),
        args=["run", *how, "--threshold", "0.1", "--include-arguments", "--offload", "off", "--events", str(events),
              *then],
        env=calculator.env(),
    )
    answers = {}
    with anyio.fail_after(90):
        for key, params in (("own", own), ("wrapped", wrapped)):
            async with Client(params, mode="legacy") as client:
                seen = []
                for expression in SUMS:
                    result = await client.call_tool("calculate", {"expression": expression})
                    seen.append((result.is_error, [c.text for c in result.content]))
                answers[key] = seen
                if key == "wrapped":
                    async with anyio.create_task_group() as tg:
                        for i in range(8):
                            tg.start_soon(client.call_tool, "calculate", {"expression": f"{i}+1"})
                        await anyio.sleep(0.01)
                        tg.start_soon(client.call_tool, "calculate", {"expression": HEAVY})
                    await anyio.sleep(0.3)
    assert answers["wrapped"] == answers["own"]
    assert answers["own"][0] == (False, ["3"])
    [block] = [e for e in blocks(events, {"calculate"}) if e["kind"] != "gc"]  # the heavy call, and only it
    assert block["tool"] == "calculate" and block["request_id"] and block["kind"] == "cpu"
    assert block["arguments"] == {"expression": HEAVY}
    assert block["culprit"]["file"].endswith("mcp_server_calculator/calculator.py")
    assert block["frames"][-1]["function"] == "eval_expr"


# -- an SDK loopwatch can't watch: one line, and the server runs as it would bare -------------------------

too_old = venv_fixture("mcp-1.23", ["mcp==1.23.3"], no_deps_loopwatch=True)  # loopwatch forced in (--no-deps)


async def test_on_an_sdk_it_cannot_watch_loopwatch_run_says_so_in_one_line_and_the_server_runs(too_old, tmp_path):
    assert too_old.version("mcp") == "1.23.3"
    errlog = tmp_path / "stderr.txt"
    params = StdioServerParameters(
        command=too_old.python, args=["-m", "loopwatch", "run", str(HERE / "fastmcp1_server.py"), "--threshold",
                                      "0.1", "--events", str(tmp_path / "events.jsonl")], env=too_old.env())
    from mcp.client.stdio import stdio_client

    with anyio.fail_after(60), open(errlog, "w") as log:
        async with Client(stdio_client(params, errlog=log), mode="legacy") as client:
            answers = [await client.call_tool(name, args) for name, args in CALLS[:3]]
    assert [[c.text for c in a.content] for a in answers[:2]] == [["pong 1"], ["report 2"]]
    assert [a.is_error for a in answers] == [False, False, False]
    lines = [line for line in errlog.read_text().splitlines() if "loopwatch" in line and "supported" in line]
    assert len(lines) == 1 and "mcp 1.23.3 found; supported: mcp 1.24" in lines[0], lines
    assert "watching" not in errlog.read_text()
    assert read_events(tmp_path / "events.jsonl") == []  # unwatched: a 300 ms block, and nothing reported


# -- traces on fastmcp 3.x through the real OTLP exporter: fastmcp's own span, enriched -------------------


def scoped_spans(receiver):
    """(scope name, span) for every span the receiver got."""
    return [(scope.scope.name, span) for payload in list(receiver.payloads) for rs in payload.resource_spans
            for scope in rs.scope_spans for span in scope.spans]


async def test_on_fastmcp3_its_own_request_span_carries_the_block_and_no_second_span_is_opened(
    mcp1_fastmcp3, tmp_path
):
    """fastmcp 3 opens a SERVER span per tools/call inside loopwatch's seam: that span is enriched (loopwatch's
    attributes, the block's event and child span); loopwatch opens its own only for requests fastmcp spans not."""
    from e2e.test_otlp import Receiver, attributes

    events = tmp_path / "events.jsonl"
    with Receiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        server = HERE / "fastmcp_server.py"
        params = StdioServerParameters(
            command=mcp1_fastmcp3.python, env=mcp1_fastmcp3.env(**otel),
            args=["-m", "loopwatch", "run", str(server), "--threshold", "0.1", "--offload", "off",
                  "--events", str(events)],
        )
        with anyio.fail_after(90):
            async with Client(params, mode="legacy") as client:
                await client.call_tool("ping", {"n": 1})
                await beside(client, "lookup", {"sku": "O-1"})
                await client.send_ping()
                while not [s for n, s in scoped_spans(receiver) if s.name == "tools/call lookup" and s.events] or not [
                    s for n, s in scoped_spans(receiver) if s.name == "ping"
                ]:
                    await anyio.sleep(0.05)
        spans = scoped_spans(receiver)
    [block] = [e for e in blocks(events, {"lookup"}) if e["tool"] == "lookup"]
    [(scope, call)] = [(n, s) for n, s in spans if s.name == "tools/call lookup"]  # one span for the request
    assert scope == "fastmcp" and call.kind == Span.SpanKind.SPAN_KIND_SERVER
    found = attributes(call.attributes)
    assert found["fastmcp.server.name"] == "fastmcp-inventory"  # fastmcp's own attributes, kept
    assert found["loopwatch.loop_blocked_s"] == block["duration_s"]
    assert found["jsonrpc.request.id"] == block["request_id"]
    assert found["loopwatch.execution"] == "loop" and found["network.transport"] == "pipe"
    [event] = [e for e in call.events if e.name == "loopwatch.loop_blocked"]
    assert attributes(event.attributes)["code.line.number"] == block["culprit"]["line"]
    [blocked] = [s for n, s in spans if s.name == "event_loop.blocked"]
    assert blocked.parent_span_id == call.span_id and blocked.trace_id == call.trace_id
    pings = [(n, s) for n, s in spans if s.name == "tools/call ping"]
    assert len(pings) == 9 and {n for n, _ in pings} == {"fastmcp"}
    assert [n for n, s in spans if s.name == "ping"] == ["loopwatch"]  # fastmcp spans no ping: loopwatch's own


# -- process offload on mcp 1.x: FastMCP 1 over stdio, under loopwatch run --------------------------------

CPU1 = HERE / "cpu1_server.py"
CPU1_POLICY = "crunch=process,crunch_text=process,progress=process,crash=process,where=process"
CPU1_CALLS = [("crunch", {"rounds": 20000}), ("crunch_text", {"rounds": 300}), ("crunch", {"rounds": -2}),
              ("crash", {"secret": "s3"}), ("crunch", {"rounds": "many"}), ("progress", {"steps": 3}),
              ("ping", {"n": 4})]


async def cpu1_answers(params, calls=CPU1_CALLS, first=None):
    """What a client sees of `calls` (answers, progress, log messages) and the pid `where` answers from.
    `first(client)` runs before them (on the wrapped server: until a tool has moved)."""
    out, progress, logs = [], [], []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def on_log(params):
        logs.append(params.data)

    with anyio.fail_after(120):
        async with Client(params, mode="legacy", logging_callback=on_log) as client:
            if first is not None:
                await first(client)
            for name, args in calls:
                result = await client.call_tool(name, args, progress_callback=on_progress)
                out.append(result.model_dump(exclude={"meta"}))
            worker = (await client.call_tool("where", {})).structured_content["result"]
    return out, progress, logs, worker


def cpu1_watched(env, events, *args):
    return StdioServerParameters(command=env.python, env=env.env(), cwd=str(HERE), args=[
        "-m", "loopwatch", "run", str(CPU1), "--offload-processes", "1", "--events", str(events), *args])


async def test_fastmcp1_tools_run_in_worker_processes_with_answers_errors_and_progress_as_bare(mcp1_fastmcp2, tmp_path):
    """`--offload-policy T=process` on FastMCP 1: a plain `def` tool and an `async def` one reporting progress."""
    events = tmp_path / "events.jsonl"
    bare = await cpu1_answers(StdioServerParameters(command=mcp1_fastmcp2.python, args=[str(CPU1)],
                                                    env=mcp1_fastmcp2.env(), cwd=str(HERE)))
    moved = await cpu1_answers(cpu1_watched(mcp1_fastmcp2, events, "--offload-policy", CPU1_POLICY))
    assert moved[:3] == bare[:3]  # answers, errors, progress and log messages
    assert bare[1] == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]
    assert "starting 3 steps" in bare[2]
    assert sum(1 for r in bare[0] if r["is_error"]) == 3  # a ToolError, a crash, a bad argument
    assert moved[3] != bare[3]  # `where` answered from a worker process, not the server's
    decisions = {e["tool"]: e["executes"] for e in read_events(events) if e["event"] == "offloaded"}
    assert decisions == dict.fromkeys(CPU1_POLICY.replace("=process", "").split(","), "process")
    assert not [e for e in read_events(events) if e["event"] == "pinned"]


async def test_fastmcp1_def_tool_caught_computing_moves_to_a_process_with_offload_cpu_process(mcp1_fastmcp2, tmp_path):
    """`--offload-cpu process`: the plain `def` tool caught blocking the loop moves to a thread at once (the
    block is not classified yet), then to a process once a block of it is classified `cpu`; its answers after
    that are the bare server's."""
    events = tmp_path / "events.jsonl"

    def moved_to_process():
        return [e for e in read_events(events) if e["event"] == "offloaded" and e["tool"] == "crunch"
                and e["executes"] == "process"]

    heavy = []

    async def until_moved(client):
        for _ in range(8):  # a block on a loaded machine may be too little CPU to count: a few more tries
            heavy.append(await client.call_tool("crunch", {"rounds": 4_000_000}))
            await anyio.sleep(0.3)  # its block is reported once the loop runs again
            if moved_to_process():
                return

    async def as_many(client):  # the bare server gets the same calls (request ids are in the answers)
        for _ in heavy:
            await client.call_tool("crunch", {"rounds": 4_000_000})

    moved = await cpu1_answers(cpu1_watched(mcp1_fastmcp2, events, "--threshold", "0.1", "--offload-cpu", "process"),
                               first=until_moved)
    bare = await cpu1_answers(StdioServerParameters(command=mcp1_fastmcp2.python, args=[str(CPU1)],
                                                    env=mcp1_fastmcp2.env(), cwd=str(HERE)), first=as_many)
    assert moved[:3] == bare[:3]
    [decision] = moved_to_process()
    assert "[cpu]" in decision["reason"] and "--offload-cpu process" in decision["reason"]
    found = [e for e in read_events(events) if e["event"] == "loop_blocked" and e["tool"] == "crunch"]
    assert found[0]["kind"] in ("cpu", "gil") and found[0]["frames"][-1]["file"] == str(CPU1), found[0]
