"""Faults: whatever breaks around loopwatch, the server keeps serving or stops cleanly, and no thread stays.

Hooks, listeners and exporters that raise; an events file that can't be written; a metrics port already
taken; an OTLP collector that is down; the loop closing while a block is being sampled. (The watchdog
thread dying is in test_detect.py; SIGTERM in the middle of a call in tests/e2e/test_signals.py.)
"""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import tracemalloc

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._blame import CallRecord, Sample
from loopwatch._sentinel import Heartbeat
from loopwatch._watchdog import Detector

from helpers import client_for, fresh, settle, threads_left

pytestmark = pytest.mark.anyio
ASYNCIO = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])


def block_events(handle_or_monitor, where):
    """The block events that ran `where` (a tool's name, or the function at the leaf of the stack).

    Only those: on a loaded machine, a stall outside any call may be reported too, and rightly so; and a
    garbage collection during the call (kind gc) is the heap's doing.
    """
    monitor = getattr(handle_or_monitor, "monitor", handle_or_monitor)
    return [
        e for e in monitor.recent
        if isinstance(e, loopwatch.BlockEvent) and e.kind != "gc"
        and where in (e.tool, e.frames[-1].function if e.frames else None)
    ]


async def serve_a_blocker_and_honest_calls(server, handle):
    """One blocking call and a few honest ones; every answer checked."""
    async with client_for(server) as client:
        found = await client.call_tool("lookup", {"sku": "F-1"})
        assert not found.is_error and json.loads(found.content[0].text) == {"sku": "F-1", "qty": 3}
        for n in range(5):
            assert (await client.call_tool("ping", {"n": n})).structured_content == {"result": n}
        await settle(handle.monitor)


# -- hooks, listeners, exporters that raise ---------------------------------------------------------


class RaisingHook:
    def __init__(self, where):
        self.where = where

    def start(self, call):
        if self.where == "start":
            raise RuntimeError("call hook start failed")

    def end(self, call, duration, error_type):
        if self.where == "end":
            raise RuntimeError("call hook end failed")


def raising(*args):
    raise RuntimeError("observer failed")


async def test_hooks_listeners_and_observers_that_raise_are_dropped_and_every_call_still_answers(anyio_backend, caplog):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False)
    seen = []
    handle.add_listener(raising)
    handle.add_listener(seen.append)
    handle.monitor.block_hooks.append(raising)
    handle.monitor.lag_observers.append(raising)
    hooks = [RaisingHook("start"), RaisingHook("end")]
    for hook in hooks:
        handle.middleware.add_hook(hook)
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        await serve_a_blocker_and_honest_calls(server, handle)
    assert [e.tool for e in seen if isinstance(e, loopwatch.BlockEvent) and e.kind != "gc"] == ["lookup"]
    assert handle.middleware.hooks == ()
    assert raising not in handle.monitor.block_hooks + handle.monitor.lag_observers
    removed = [r for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 5  # each one logged once, then gone
    assert handle.snapshot()["tools"]["ping"]["errors"] == 0


class RaisingSpanExporter:
    def export(self, spans):
        raise RuntimeError("collector exploded")

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


def refuse(*args, **kwargs):
    raise ValueError("the registry refused the sample")


@ASYNCIO
async def test_exporters_that_raise_never_reach_a_call_and_uninstrument_still_completes(
    anyio_backend, caplog, monkeypatch
):
    import prometheus_client

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RaisingSpanExporter()))
    server = fresh("low_server", "server")  # loopwatch opens the request spans itself: they reach the exporter
    before = set(threading.enumerate())
    handle = loopwatch.instrument(
        server, threshold=0.1, log_blocks=False, tracer_provider=provider, metrics_registry=CollectorRegistry(),
        tool_policies={"ping": "always"},  # and an offload pool, whose threads must go at the end
    )
    for kind in (prometheus_client.Histogram, prometheus_client.Counter, prometheus_client.Gauge):
        for method in ("observe", "inc", "dec", "set"):
            if hasattr(kind, method):
                monkeypatch.setattr(kind, method, refuse)
    with caplog.at_level(logging.ERROR):
        async with client_for(server) as client:
            await client.list_tools()
            for _ in range(3):
                assert (await client.call_tool("ping", {})).content[0].text == "pong"
            assert (await client.call_tool("lookup", {})).content[0].text == "found"
            await settle(handle.monitor)
        assert len(block_events(handle, "lookup")) == 1
        assert "collector exploded" in caplog.text  # the SDK's span processor logged it
        assert "refused the sample" in caplog.text  # and loopwatch its own exporter
        handle.uninstrument()
    assert handle.extensions == [] and handle.middleware not in server.middleware
    assert await threads_left(before) == []


# -- the events file --------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(path):
    """Make `path` unwritable, even for root (the immutable attribute), and writable again after."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: nothing can make a file read-only")
    subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


async def test_an_events_file_that_becomes_read_only_is_reported_once_and_writing_resumes_after(
    anyio_backend, tmp_path, caplog
):
    path = tmp_path / "events.jsonl"
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False, offload="off",
                                  events=str(path))
    with caplog.at_level(logging.INFO, logger="loopwatch"):
        async with client_for(server) as client:
            try:
                with read_only(path):
                    for _ in range(2):
                        await client.call_tool("lookup", {"sku": "R"})
                        await settle(handle.monitor)
                    assert path.read_text() == ""
            except OSError:  # a filesystem without the immutable attribute
                pytest.skip("cannot make the events file read-only here")
            await client.call_tool("lookup", {"sku": "W"})
            assert (await client.call_tool("ping", {"n": 1})).structured_content == {"result": 1}
            await settle(handle.monitor)
    assert len(block_events(handle, "lookup")) == 3  # every block is still in the snapshot
    assert path.read_text().count('"tool":"lookup"') == 1  # and the file has the one written after
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot write events" in m]) == 1
    assert len([m for m in messages if "writes events to" in m and "again" in m]) == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_loses_no_block_from_the_snapshot_or_the_log_and_the_server_keeps_serving(
    anyio_backend, caplog
):
    server = fresh("inventory_server", "mcp")
    handle = loopwatch.instrument(server, threshold=0.1, traces=False, offload="off", events="/dev/full")
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        await serve_a_blocker_and_honest_calls(server, handle)
    assert len(block_events(handle, "lookup")) == 1
    assert "loop blocked" in caplog.text and "by tools/call lookup" in caplog.text
    assert caplog.text.count("cannot write events to /dev/full") == 1


def test_an_events_file_in_a_read_only_folder_is_refused_at_start_and_the_server_is_left_as_it_was(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    server = fresh("inventory_server", "mcp")
    chain = list(server.middleware)
    with read_only(folder), pytest.raises(OSError):
        loopwatch.instrument(server, events=str(folder / "events.jsonl"))
    assert server.middleware == chain
    assert loopwatch.mcp.handle_of(server) is None


# -- ports and collectors ---------------------------------------------------------------------------


@ASYNCIO
async def test_a_taken_metrics_port_and_a_dead_otlp_collector_leave_the_server_serving_and_no_thread_behind(
    anyio_backend, caplog
):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # closed again: nothing listens there
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    before = set(threading.enumerate())
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{dead_port}/v1/traces", timeout=1),
                           schedule_delay_millis=50)
    )
    try:
        server = fresh("inventory_server", "mcp")
        with caplog.at_level(logging.ERROR, logger="loopwatch"):
            handle = loopwatch.instrument(
                server, threshold=0.1, log_blocks=False, metrics_port=taken.getsockname()[1],
                metrics_registry=CollectorRegistry(), tracer_provider=provider,
            )
            await serve_a_blocker_and_honest_calls(server, handle)
        assert "cannot serve metrics" in caplog.text
        assert len(block_events(handle, "lookup")) == 1
        handle.uninstrument()
        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(provider.shutdown)  # the exporter gives up: it does not hang
    finally:
        taken.close()
    assert await threads_left(before) == []


# -- the loop closing while a block is being sampled -------------------------------------------------


@pytest.mark.parametrize("ending", ["returns", "raises", "interrupted"])
async def test_a_block_still_going_on_when_the_loop_closes_is_reported_and_the_watchdog_ends(ending, anyio_backend):
    before = set(threading.enumerate())
    monitor = None
    with contextlib.suppress(LookupError, KeyboardInterrupt):
        async with loopwatch.watch(threshold=0.1, log_blocks=False) as monitor:
            await anyio.sleep(0.05)
            time.sleep(0.3)  # blocking clean-up, the last thing before the loop closes
            if ending == "raises":
                raise LookupError("closing")
            if ending == "interrupted":
                raise KeyboardInterrupt
    [event] = block_events(monitor, "test_a_block_still_going_on_when_the_loop_closes_is_reported_and_the_watchdog_ends")
    assert event.kind == "wait" and event.duration_s >= 0.25
    assert not monitor.active
    assert await threads_left(before) == []


@ASYNCIO
async def test_a_blocking_shutdown_of_a_server_is_reported_with_its_line(anyio_backend, tmp_path):
    from contextlib import asynccontextmanager

    from mcp.server.mcpserver import MCPServer

    @asynccontextmanager
    async def lifespan(server):
        yield {}
        time.sleep(0.3)  # closing a database connection synchronously

    server = MCPServer("closing", lifespan=lifespan)

    @server.tool()
    async def ping() -> str:
        return "pong"

    events = tmp_path / "events.jsonl"
    handle = loopwatch.instrument(server, threshold=0.1, log_blocks=False, traces=False, events=str(events))
    async with client_for(server) as client:
        await client.call_tool("ping", {})
    [event] = block_events(handle, "lifespan")
    assert event.tool is None and event.kind == "wait"
    assert '"loop_blocked"' in events.read_text()


def test_a_loop_closed_without_ending_the_watch_lets_its_watchdog_go(caplog):
    """`run_until_complete` interrupted, then `close()`: the monitor's exit never runs."""
    before = set(threading.enumerate())

    async def main():
        async with loopwatch.watch(threshold=0.1, log_blocks=False):
            await asyncio.sleep(3600)

    def abandon():
        loop = asyncio.new_event_loop()
        loop.create_task(main())
        loop.call_later(0.2, loop.stop)
        loop.run_forever()
        loop.close()

    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        thread = threading.Thread(target=abandon)
        thread.start()
        thread.join(10)
        deadline = time.monotonic() + 10
        while set(threading.enumerate()) - before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert set(threading.enumerate()) - before == set()
    assert "closed without ending the watch" in caplog.text


def test_a_block_that_lasts_for_hours_holds_bounded_memory():
    """120,000 samples (20 minutes at 10 ms) of one block: what the detector keeps stops growing."""
    hb = Heartbeat(0.01, 0.1)
    now = [100.0]
    calls = [CallRecord("tools/call", "stuck", n, object(), "stuck") for n in range(2)]
    samples = [Sample((("/srv/app.py", 10 + n, "stuck"),), calls[n % 2]) for n in range(2)]
    tick = iter(range(10**9))
    detector = Detector(hb, poll_interval=0.01, clock=lambda: now[0], sampler=lambda: samples[next(tick) % 2])
    hb.beat = (0, now[0])

    def poll(times):
        for _ in range(times):
            now[0] += 0.01
            detector.poll()

    poll(2_000)
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        poll(120_000)
        grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(start, "filename"))
    finally:
        tracemalloc.stop()
    assert detector.blocked
    assert grown < 64 * 1024


async def test_a_sentinel_hook_that_raises_is_logged_once_and_the_beats_go_on(anyio_backend, caplog):
    from loopwatch._sentinel import run_sentinel

    heartbeat = Heartbeat(0.01, 0.1)
    calls = []

    def failing(now):
        calls.append(now)
        raise RuntimeError("handoff exploded")

    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        async with anyio.create_task_group() as tg:
            await tg.start(run_sentinel, heartbeat, time.monotonic, None, failing)
            with anyio.fail_after(10):
                while heartbeat.beat[0] < 5:  # noqa: ASYNC110 - the sentinel moves it
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert len(calls) >= 6  # the baseline and every beat: it kept beating and calling
    assert [r.getMessage() for r in caplog.records].count("loopwatch sentinel hook failed; the sentinel goes on") == 1



@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
@pytest.mark.parametrize("no_timer", ["", "1"], ids=["stall-timer", "polling"])
async def test_watching_again_and_again_leaves_no_descriptor_open(anyio_backend, monkeypatch, no_timer):
    monkeypatch.setenv("LOOPWATCH_NO_TIMER", no_timer)
    async with loopwatch.watch(threshold=0.1, log_blocks=False):
        pass  # the first watch opens what stays for the process (the C library, for one)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        async with loopwatch.watch(threshold=0.1, log_blocks=False):
            await anyio.sleep(0.02)
    assert len(os.listdir("/proc/self/fd")) == before
