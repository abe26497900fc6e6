"""Prometheus metrics for an instrumented MCP server.

    handle = loopwatch.instrument(server, metrics_port=9464)      # stdio: a /metrics endpoint of its own
    handle = loopwatch.instrument(server, metrics_path="/metrics")  # HTTP: a route in `handle.routes`
    handle = loopwatch.instrument(server, metrics_registry=registry)  # exposition left to you

    loopwatch run server.py --metrics-port 9464
    loopwatch run server.py --transport streamable-http --metrics-path /metrics

Plain metric objects, updated as things happen (no scrape-time collectors), so prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) works; `python -m loopwatch.prometheus --port N`
serves the sum of every process writing to that directory. Tool labels come only from the tools the
server registers (`_OTHER` for any other name) and method labels only from the MCP specification,
so no client can grow the number of series. See docs/metrics.md.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, get_args

from ._extensions import MissingExtra
from ._watchdog import thread_cpu_clock

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
    from prometheus_client.exposition import choose_encoder
except ImportError:  # pragma: no cover - the extra is missing
    raise MissingExtra("prometheus-client", "prometheus") from None

from ._blame import CallRecord
from ._events import BlockEvent, BlockKind, Event, OffloadEvent, any_thread
from ._monitor import LAG_BOUNDS
from ._stats import OTHER

logger = logging.getLogger("loopwatch")

SEMCONV_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, *SEMCONV_BUCKETS)
"""The OpenTelemetry MCP buckets, plus finer ones below 10 ms where most MCP calls finish."""
LAG_BUCKETS = LAG_BOUNDS
LAG_MAX_WINDOW = 60
"""Seconds `loopwatch_event_loop_lag_max_seconds` looks back: longer than any usual scrape interval."""
SAMPLE_INTERVAL = 1.0
"""Seconds between readings of the loop thread's CPU clock and of the offload pool (watchdog thread)."""
BLOCK_KINDS: tuple[str, ...] = get_args(BlockKind)
OFFLOAD_ACTIONS = ("offloaded", "restored", "pinned")

MCP_METHODS = frozenset(
    {
        "initialize", "ping", "server/discover", "subscriptions/listen", "logging/setLevel",
        "completion/complete", "tools/list", "tools/call", "prompts/list", "prompts/get",
        "resources/list", "resources/templates/list", "resources/read", "resources/subscribe",
        "resources/unsubscribe", "tasks/get", "tasks/list", "tasks/cancel", "tasks/result",
    }
)  # fmt: skip
"""Method label values; any other method a client sends is `_OTHER`."""


def _spec_methods() -> frozenset[str]:
    try:
        from mcp_types.methods import SPEC_CLIENT_METHODS
    except ImportError:
        return MCP_METHODS
    return MCP_METHODS | frozenset(m for m in SPEC_CLIENT_METHODS if isinstance(m, str))


# -- the metric objects -------------------------------------------------------------------------------


class Metrics:
    """Every loopwatch metric in one registry. One set per registry, shared by the handles using it."""

    def __init__(self, registry: Any = None) -> None:
        registry = prometheus_client.REGISTRY if registry is None else registry
        tool = ["gen_ai_tool_name"]
        self.operation_duration = Histogram(
            "mcp_server_operation_duration_seconds",
            "Duration of MCP requests the server handled (OpenTelemetry mcp.server.operation.duration).",
            ["mcp_method_name", "gen_ai_tool_name", "error_type", "network_transport"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.lag = Histogram(
            "loopwatch_event_loop_lag_seconds",
            "How late the event loop ran loopwatch's sentinel beat: near 0 on a healthy loop.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.lag_max = Gauge(
            "loopwatch_event_loop_lag_max_seconds",
            f"The largest event loop lag in the last {LAG_MAX_WINDOW} seconds.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.loop_cpu = Counter(
            "loopwatch_event_loop_thread_cpu_seconds",
            "CPU time of the thread running the event loop: its rate is the loop's utilisation of one core.",
            registry=registry,
        )
        self.blocks = Counter(
            "loopwatch_event_loop_blocks",
            "Times the event loop stalled past the threshold, by the tool blamed and the kind of block.",
            [*tool, "kind"],
            registry=registry,
        )
        self.blocked_seconds = Counter(
            "loopwatch_event_loop_blocked_seconds",
            "Seconds the event loop was stalled, by the tool blamed and the kind of block.",
            [*tool, "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "loopwatch_tool_calls_in_flight",
            "tools/call requests being served now.",
            tool,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.offloaded = Gauge(
            "loopwatch_tool_offloaded",
            "1 while loopwatch runs the tool off the event loop, else 0.",
            tool,
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.in_process = Gauge(
            "loopwatch_tool_in_process",
            "1 while the tool's calls run in the offload process pool (policy process), else 0.",
            tool,
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.process_pool_in_use = Gauge(
            "loopwatch_offload_processes_in_use",
            "Tool calls running in the offload process pool's workers (sampled every second while watched).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.process_pool_size = Gauge(
            "loopwatch_offload_processes",
            "Worker processes the offload process pool may use (--offload-processes); 0 until offload runs.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.process_pool_alive = Gauge(
            "loopwatch_offload_processes_alive",
            "Worker processes of the offload process pool running now (they start when a tool first needs them).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.offload_pool_in_use = Gauge(
            "loopwatch_offload_pool_in_use",
            "Tool calls running on the offload pool's worker loops (sampled every second while watched).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.offload_pool_size = Gauge(
            "loopwatch_offload_pool_size",
            "Worker loops the offload pool may use (--offload-workers); 0 until offload runs.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.offload_decisions = Counter(
            "loopwatch_tool_offload_decisions",
            "Decisions about where a tool runs (offloaded, restored, pinned).",
            [*tool, "action"],
            registry=registry,
        )


_shared: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


def metrics_for(registry: Any = None) -> Metrics:
    """The metrics of `registry` (default: prometheus-client's REGISTRY), created once."""
    registry = prometheus_client.REGISTRY if registry is None else registry
    metrics = _shared.get(registry)
    if metrics is None:
        metrics = _shared[registry] = Metrics(registry)
    return metrics


# -- updating them ------------------------------------------------------------------------------------


class ToolSeries:
    """Per-tool series, created at zero as soon as loopwatch knows the tool (listed, or first called).

    A counter series born with its first count hides that count from rate() and increase(): a tool's
    first block would never raise an alert. So the block and offload counters of every known tool (and
    the block counters of "" for blocks outside any call) exist at 0 before anything happens to them.
    """

    def __init__(self, metrics: Metrics, known: set[str]) -> None:
        self._metrics = metrics
        self._known = known
        self.known_seen = -1
        self.in_flight: dict[str, Any] = {}
        self.blocks: dict[tuple[str, str], tuple[Any, Any]] = {}
        for kind in BLOCK_KINDS:
            self.block_children("", kind)
        self.catch_up()

    def add(self, label: str) -> Any:
        """The tool's in-flight child, creating all its series on first sight."""
        child = self.in_flight.get(label)
        if child is None:
            for kind in BLOCK_KINDS:
                self.block_children(label, kind)
            m = self._metrics
            m.offloaded.labels(label)  # creates the child at 0; never resets one
            for action in OFFLOAD_ACTIONS:
                m.offload_decisions.labels(label, action)
            child = self.in_flight[label] = m.in_flight.labels(label)
        return child

    def catch_up(self) -> None:
        """Add the tools the server made known since the last look (a tools/list result, a registry hit)."""
        self.known_seen = len(self._known)
        for label in (OTHER, *list(self._known)):
            self.add(label)

    def block_children(self, label: str, kind: str) -> tuple[Any, Any]:
        key = (label, kind)
        children = self.blocks.get(key)
        if children is None:
            m = self._metrics
            children = self.blocks[key] = (m.blocks.labels(*key), m.blocked_seconds.labels(*key))
        return children


class CallMetrics:
    """The middleware hook. On the loop it only queues what happened: one deque append per event.

    `record()` turns the queue into metric updates on the watchdog thread (within one of its polls),
    where the cost of prometheus-client's locks and buckets does not delay the loop; on the loop only
    when nothing else will (the loop is not watched, or the queue is long).
    """

    MAX_PENDING = 10_000

    def __init__(self, metrics: Metrics, tools: ToolSeries, known: set[str], monitor: Any) -> None:
        self._durations = metrics.operation_duration
        self._tools = tools
        self._known = known
        self._monitor = monitor
        self._duration_children: dict[tuple[str, str, str, str], Any] = {}
        self._methods = _spec_methods()
        self.pending: deque[Any] = deque()
        self._lock = threading.Lock()

    def start(self, call: CallRecord) -> None:
        if call.label:
            self.pending.append(call.label)

    def end(self, call: CallRecord, duration: float, error_type: str | None) -> None:
        pending = self.pending
        pending.append((call.method, call.label, error_type or "", call.transport(), duration))
        if len(pending) > self.MAX_PENDING or not self._monitor.active:
            self.record()

    def record(self) -> None:
        """Apply the queued starts and ends, in order. Any thread; one at a time."""
        with self._lock:
            if len(self._known) != self._tools.known_seen:
                self._tools.catch_up()
            pending, in_flight = self.pending, self._tools.in_flight
            while pending:
                item = pending.popleft()
                if isinstance(item, str):
                    self._tools.add(item).inc()
                    continue
                method, label, error, transport, duration = item
                key = (method, label, error, transport)
                child = self._duration_children.get(key)
                if child is None:
                    child = self._duration_child(key)
                child.observe(duration)
                if label:
                    started = in_flight.get(label)
                    if started is not None:  # None only for a call that began before the hook was added
                        started.dec()

    def _duration_child(self, key: tuple[str, str, str, str]) -> Any:
        method, label, error, transport = key
        if method in self._methods:
            child = self._duration_children[key] = self._durations.labels(method, label, error, transport)
            return child
        # Not cached: a client can send any method name, and the cache must stay bounded too.
        return self._durations.labels(OTHER, label, error, transport)


class LoopMetrics:
    """The sentinel's lags, the loop thread's CPU time and blocks, all on the watchdog thread."""

    def __init__(
        self,
        metrics: Metrics,
        tools: ToolSeries,
        handle: Any,
        calls: CallMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._tools = tools
        self._calls = calls
        self._handle = handle
        self._monitor = handle.monitor
        self._clock = clock
        self._lag = metrics.lag
        self._peak = WindowMax(LAG_MAX_WINDOW)
        self._peak_stale = False
        self._shown_peak = -1.0
        self._cpu_thread: int | None = None
        self._cpu_clock: Callable[[], float | None] = lambda: None
        self._cpu_last: float | None = None
        self._cpu_lock = threading.Lock()  # read at the watch's start and stop (loop thread) and each second (watchdog)
        self._next_sample = 0.0

    @any_thread
    def observe_lag(self, lag: float) -> None:
        if self._calls.pending:
            self._calls.record()
        self._lag.observe(lag)
        if not self._monitor.active:
            return  # the last lags of a watch that just stopped: the peak was reset already
        if self._peak_stale:
            self._peak_stale = False
            self._peak.clear()
        now = self._clock()
        peak = self._peak.add(lag, now)
        if peak != self._shown_peak:
            self._shown_peak = peak
            self._metrics.lag_max.set(peak)
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL
            self.read_cpu()
            self.read_pool()

    def started(self) -> None:
        """Watching started (on the loop thread): the CPU counter's baseline is now, not at the first sample a
        second in (a short-lived server would otherwise count nothing)."""
        with self._cpu_lock:
            self._cpu_thread = None
        self.read_cpu()

    def read_cpu(self) -> None:
        with self._cpu_lock:
            thread_id = self._monitor.loop_thread_id
            if thread_id != self._cpu_thread:
                self._cpu_thread, self._cpu_last = thread_id, None
                self._cpu_clock = thread_cpu_clock(thread_id) if thread_id is not None else (lambda: None)
            value = self._cpu_clock()
            if value is None:
                return
            if self._cpu_last is not None and value > self._cpu_last:
                self._metrics.loop_cpu.inc(value - self._cpu_last)
            self._cpu_last = value

    def read_pool(self) -> None:
        """The offload pool, when offload is on: calls running on its worker loops, and its size."""
        pool = getattr(self._handle.offload, "pool", None)
        if pool is not None:
            self._metrics.offload_pool_in_use.set(pool.in_use)
            self._metrics.offload_pool_size.set(pool.size)
        processes = getattr(getattr(self._handle.offload, "processes", None), "pool", None)
        if processes is not None:
            self._metrics.process_pool_in_use.set(processes.in_use)
            self._metrics.process_pool_size.set(processes.size)
            self._metrics.process_pool_alive.set(processes.alive)

    def stopped(self) -> None:
        """Watching stopped (on the loop thread): no lag is measured now, so the peak is no longer news.
        The window itself belongs to the watchdog thread, which clears it when watching starts again."""
        self.read_cpu()  # the loop's CPU up to the end of the watch
        self._calls.record()
        self._peak_stale = True
        self._shown_peak = 0.0
        self._metrics.lag_max.set(0.0)

    @any_thread
    def on_block(self, event: BlockEvent, call: CallRecord | None) -> None:
        count, seconds = self._tools.block_children(self._tool_label(event, call), event.kind)
        count.inc()
        seconds.inc(event.duration_s)

    def _tool_label(self, event: BlockEvent, call: CallRecord | None) -> str:
        if call is not None:
            return call.label
        if event.method == "tools/call":
            return self._monitor.tools.label(event.tool)
        return ""


class WindowMax:
    """The largest value added in the last `seconds`, kept in one-second slots."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.slots: deque[list[float]] = deque()  # [second, largest value in it]
        self.value = 0.0

    def add(self, value: float, now: float) -> float:
        second = float(int(now))
        slots = self.slots
        if slots and slots[-1][0] == second:
            slot = slots[-1]
            slot[1] = max(slot[1], value)
            self.value = max(self.value, value)
            return self.value
        slots.append([second, value])
        while slots[0][0] <= second - self.seconds:
            slots.popleft()
        self.value = max(slot[1] for slot in slots)
        return self.value

    def clear(self) -> None:
        self.slots.clear()
        self.value = 0.0


class OffloadMetrics:
    """`loopwatch_tool_offloaded` from the offload controller's OffloadEvents (any thread)."""

    def __init__(self, metrics: Metrics, label: Callable[[Any], str]) -> None:
        self._metrics = metrics
        self._label = label

    @any_thread
    def __call__(self, event: Event) -> None:
        if not isinstance(event, OffloadEvent) or event.action == "advised":  # advice moves nothing
            return
        tool = self._label(event.tool)
        off_loop = event.action == "offloaded" or (event.action == "pinned" and event.executes == "thread")
        self._metrics.offloaded.labels(tool).set(1 if off_loop else 0)
        self._metrics.in_process.labels(tool).set(1 if off_loop and event.executes == "process" else 0)
        self._metrics.offload_decisions.labels(tool, event.action).inc()

    def replay(self, events: Iterable[Event]) -> None:
        """Decisions taken before the metrics existed (a saved offload state, `always` policies)."""
        for event in events:
            self(event)


# -- exposition ---------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def exposition_registry(registry: Any = None) -> Any:
    """What an endpoint serves: in multiprocess mode the sum over every process, else `registry` itself."""
    path = multiprocess_dir()
    if path is None:
        return prometheus_client.REGISTRY if registry is None else registry
    combined = CollectorRegistry()
    combined.register(DeadProcessReaper(path))
    multiprocess.MultiProcessCollector(combined, path=path)
    return combined


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


class DeadProcessReaper:
    """Before each multiprocess scrape, drop the live gauges of processes that exited without saying so
    (stdio servers a desktop host killed): their in-flight calls would otherwise count forever."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> list[Any]:
        for pid in dead_pids(self.path):
            multiprocess.mark_process_dead(pid, self.path)
        return []


def dead_pids(path: str) -> set[int]:
    found = (_LIVE_GAUGE_FILE.search(f.name) for f in Path(path).glob("gauge_live*.db"))
    pids = {int(m.group(1)) for m in found if m}
    return {pid for pid in pids if not _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FlushFirst:
    """The registry a scrape reads, after the requests still queued are recorded (they are otherwise recorded
    at the watchdog's next look, up to a second later with a stall timer): a scrape sees every finished call."""

    def __init__(self, registry: Any, flush: Callable[[], None]) -> None:
        self._registry, self._flush = registry, flush

    def collect(self) -> Any:
        self._flushed()
        return self._registry.collect()

    def restricted_registry(self, names: Any) -> Any:
        self._flushed()
        return self._registry.restricted_registry(names)

    def _flushed(self) -> None:
        try:
            self._flush()
        except Exception:  # a scrape still answers with what is recorded
            logger.exception("recording queued requests before a scrape failed")


def metrics_route(path: str, registry: Any) -> Any:
    """A Starlette route serving `registry`; encoding runs on a worker thread, never on the loop."""
    import anyio
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = await anyio.to_thread.run_sync(encoder, registry)
        return Response(body, headers={"Content-Type": content_type})

    return Route(path if path.startswith("/") else f"/{path}", endpoint=metrics, methods=["GET"])


class Endpoint:
    """A standalone /metrics server (prometheus-client's) on a daemon thread."""

    def __init__(self, server: Any, thread: Any) -> None:
        self.server = server
        self.thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever, forever if it is not running
            self.server.shutdown()
        self.server.server_close()


def start_endpoint(host: str, port: int, registry: Any) -> Endpoint | None:
    """Serve /metrics on `host:port`; None (and one clear log line) when it can't bind."""
    try:
        endpoint = Endpoint(*prometheus_client.start_http_server(port, addr=host, registry=registry))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if multiprocess_dir() is not None:
            logger.warning(
                "metrics port %s:%s is taken (%s); in multiprocess mode the process holding it "
                "serves every process's metrics. The MCP server keeps running.",
                host,
                port,
                reason,
            )
        else:
            logger.error(
                "cannot serve metrics on http://%s:%s/metrics: %s. The MCP server keeps running "
                "without a metrics endpoint; choose another --metrics-port (0 picks a free one).",
                host,
                port,
                reason,
            )
        return None
    logger.info("serves Prometheus metrics on http://%s:%s/metrics", _url_host(host), endpoint.port)
    return endpoint


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the integration ----------------------------------------------------------------------------------


class PrometheusExporter:
    """What `install()` returns (one of `handle.extensions`): the metrics, the endpoint, `close()`."""

    def __init__(self, handle: Any) -> None:
        options = handle.options
        self.handle = handle
        registry = options.metrics_registry
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.metrics = metrics_for(self.registry)
        self.exposition = exposition_registry(self.registry)
        monitor = handle.monitor
        self.tools = ToolSeries(self.metrics, monitor.tools.known)
        self.calls = CallMetrics(self.metrics, self.tools, monitor.tools.known, monitor)
        self.loop = LoopMetrics(self.metrics, self.tools, handle, self.calls)
        self.offload = OffloadMetrics(self.metrics, monitor.tools.label)
        self.offload.replay(list(monitor.recent))
        handle.middleware.add_hook(self.calls)
        monitor.lag_observers.append(self.loop.observe_lag)
        monitor.block_hooks.append(self.loop.on_block)
        monitor.start_hooks.append(self.loop.started)
        monitor.stop_hooks.append(self.loop.stopped)
        monitor.add_listener(self.offload)
        served = FlushFirst(self.exposition, self.flush)
        self.endpoint: Endpoint | None = None
        if options.metrics_port is not None:
            self.endpoint = start_endpoint(options.metrics_host, options.metrics_port, served)
        self.route: Any = None
        if options.metrics_path:
            self.route = metrics_route(options.metrics_path, served)
            handle.routes.append(self.route)

    def flush(self) -> None:
        """Record the requests still queued now (they are otherwise recorded within one watchdog poll)."""
        self.calls.record()

    @property
    def port(self) -> int | None:
        """The standalone endpoint's port (useful with `metrics_port=0`), None when there is none."""
        return None if self.endpoint is None else self.endpoint.port

    def close(self) -> None:
        """Stop updating the metrics and stop the standalone endpoint. Safe to call twice."""
        handle, monitor = self.handle, self.handle.monitor
        handle.middleware.remove_hook(self.calls)
        self.calls.record()
        _discard(monitor.lag_observers, self.loop.observe_lag)
        _discard(monitor.block_hooks, self.loop.on_block)
        _discard(monitor.start_hooks, self.loop.started)
        _discard(monitor.stop_hooks, self.loop.stopped)
        monitor.remove_listener(self.offload)
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()


def _discard(items: list[Any], item: Any) -> None:
    if item in items:
        items.remove(item)


def install(handle: Any) -> PrometheusExporter:
    return PrometheusExporter(handle)


# -- python -m loopwatch.prometheus: one endpoint for many processes ----------------------------------


def serve_multiprocess(argv: list[str] | None = None) -> int:
    """Serve the metrics every process wrote to PROMETHEUS_MULTIPROC_DIR (or --dir) until interrupted."""
    import argparse
    import threading

    parser = argparse.ArgumentParser(
        prog="python -m loopwatch.prometheus",
        description="Serve the summed metrics of every process writing to a multiprocess directory.",
    )
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dir", default=multiprocess_dir(), help="default: $PROMETHEUS_MULTIPROC_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="loopwatch: %(message)s")
    if not args.dir or not os.path.isdir(args.dir):
        logger.error("no multiprocess directory: set PROMETHEUS_MULTIPROC_DIR or pass --dir")
        return 2
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = args.dir
    endpoint = start_endpoint(args.host, args.port, exposition_registry())
    if endpoint is None:
        return 1
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_multiprocess())
