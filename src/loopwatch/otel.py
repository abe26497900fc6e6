"""OpenTelemetry traces: the blocked-loop evidence on the spans a server already has.

    import loopwatch
    loopwatch.instrument(server)            # traces=True by default; a no-op until an SDK is configured

    # or, with no code change, the SDK set up from the standard OTEL_* variables:
    #   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 loopwatch run server.py

Each request's SERVER span (the SDK's, fastmcp's, or one loopwatch opens where nothing else does) gets
`loopwatch.loop_blocked_s`, `loopwatch.execution`, `network.transport` and `mcp.session.id`. Each block
adds a `loopwatch.loop_blocked` event (kind, duration, file, line, stack) to the blamed call's span and a
back-dated `event_loop.blocked` child span covering the stall; offload decisions become span events.
See docs/traces.md.

Blocks are reported by the watchdog thread a few milliseconds after the loop is free again, which is
usually after the blocking call has returned. When a call ends while a block may still be unreported,
its span's end is held back (with its original end time) until the watchdog has caught up.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from ._blame import CallRecord
from ._events import BlockEvent, Event, OffloadEvent, any_thread, report_text
from ._extensions import MissingExtra
from ._options import OptionError

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError:  # pragma: no cover - without the `otel` extra only configure_from_env() is usable
    trace = None  # type: ignore[assignment]

logger = logging.getLogger("loopwatch")

TRACER_NAME = "loopwatch"
LOOP_BLOCKED_S = "loopwatch.loop_blocked_s"
EXECUTION = "loopwatch.execution"
BLOCK_EVENT = "loopwatch.loop_blocked"
BLOCK_SPAN = "event_loop.blocked"
OFFLOAD_EVENT = "loopwatch.offload"
OFFLOAD_SPAN = "loopwatch.offload"
_RECENT_TOOLS = 256
RECHECK_S = 1.0


def install(handle: Any) -> Tracing:
    """Enrich request spans, add block evidence, and report offload decisions for one instrumented server."""
    if trace is None:
        raise MissingExtra("opentelemetry", "otel")
    return Tracing(handle)


# -- the integration ----------------------------------------------------------------------------------


class Tracing:
    """What `install` returns: the hooks it added, removed again by `close()` (safe to call twice)."""

    def __init__(self, handle: Any) -> None:
        from . import __version__

        self.monitor = handle.monitor
        self.provider = handle.options.tracer_provider
        self._configured = False
        self._recheck_at = 0.0
        tracer = (self.provider or trace).get_tracer(TRACER_NAME, __version__)
        self.closer = SpanCloser(self.monitor)
        self.evidence = BlockEvidence(tracer, self.configured)
        self.handle = handle
        self._chain = handle.adapter.chain()
        outer = self._chain.index(handle.middleware)
        self.inner: RequestSpanMiddleware | None = None
        if _sdk_span_outside(self._chain, outer):
            self.hook: Any = CurrentSpanHook(self.closer)
        else:
            self.inner = RequestSpanMiddleware(tracer, self.closer, self.configured)
            self.hook = SlotHook(self.closer)
        self._unwrap_spans: Callable[[], None] | None = None
        self.attached = False
        self._attach()
        if not self.attached:
            self.monitor.start_hooks.append(self._attach)
            self.monitor.loop_checks.append(self._attach)
        self.monitor.block_hooks.append(self.evidence.on_block)
        self.monitor.blocking_hooks.append(self.evidence.on_blocking)
        self.monitor.add_listener(self.evidence.on_event)
        self.monitor.lag_observers.append(self.closer.tick)
        atexit.register(self.closer.flush)

    def configured(self) -> bool:
        """Whether spans could be recorded at all: a real provider, given or global. Once true, stays true.

        Looking the global provider up costs about a microsecond, so until one is set it is looked up at
        most once a second.
        """
        if self._configured:
            return True
        now = time.monotonic()
        if now < self._recheck_at:
            return False
        self._recheck_at = now + RECHECK_S
        provider = self.provider or trace.get_tracer_provider()
        self._configured = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        return self._configured

    def _attach(self) -> None:
        """Join the requests once spans can be recorded: the call hook on loopwatch's middleware, and the inner
        middleware in the chain. Until then they would cost every request for nothing (a hook makes the
        middleware build a CallRecord per call), so without an SDK they stay out: checked at install, when
        watching starts, and about once a second on the loop. A provider set while the server runs is used
        from the next check on."""
        if self.attached or not self.configured():
            return
        self.attached = True
        if self.inner is not None and self.inner not in self._chain:
            outer = self._chain.index(self.handle.middleware)
            self._chain.insert(_inner_position(self._chain, outer), self.inner)
        self._join_framework_spans()
        self.handle.middleware.add_hook(self.hook)
        self._unschedule()

    def _join_framework_spans(self) -> None:
        """A framework that opens its request span inside loopwatch's seam (fastmcp 3.x on mcp 1.x): enrich
        that span where it opens, and open none of loopwatch's own for the methods it covers."""
        opener = getattr(self.handle.adapter, "framework_spans", None)
        if self.inner is None or opener is None or self._unwrap_spans is not None:
            return
        self._unwrap_spans = opener(enter_framework_span)
        if self._unwrap_spans is not None:
            self.inner.framework_methods = self.handle.adapter.span_methods

    def _unschedule(self) -> None:
        for hooks in (self.monitor.start_hooks, self.monitor.loop_checks):
            if self._attach in hooks:
                hooks.remove(self._attach)

    def close(self) -> None:
        self._unschedule()
        self.attached = False
        self.handle.middleware.remove_hook(self.hook)
        if self.inner is not None and self.inner in self._chain:
            self._chain.remove(self.inner)
        if self._unwrap_spans is not None:
            self._unwrap_spans()
            self._unwrap_spans = None
            if self.inner is not None:
                self.inner.framework_methods = frozenset()
        for hooks, item in (
            (self.monitor.block_hooks, self.evidence.on_block),
            (self.monitor.blocking_hooks, self.evidence.on_blocking),
            (self.monitor.lag_observers, self.closer.tick),
        ):
            if item in hooks:
                hooks.remove(item)
        self.monitor.remove_listener(self.evidence.on_event)
        self.closer.flush()
        atexit.unregister(self.closer.flush)


def _sdk_span_outside(chain: list[Any], outer: int) -> bool:
    """The SDK's OpenTelemetryMiddleware runs outside loopwatch's: its span is current in our hooks."""
    return any(type(m).__name__ == "OpenTelemetryMiddleware" for m in chain[:outer])


def _inner_position(chain: list[Any], outer: int) -> int:
    """Just inside fastmcp's dispatch middleware (it opens its span there), else just inside ours."""
    for index in range(outer + 1, len(chain)):
        if type(chain[index]).__name__ == "FastMCPServerMiddleware":
            return index + 1
    return outer + 1


# -- per request, on the loop -------------------------------------------------------------------------


class CurrentSpanHook:
    """For servers whose SDK middleware opens the request span outside loopwatch's: enrich that span."""

    def __init__(self, closer: SpanCloser) -> None:
        self.closer = closer
        self._current = trace.get_current_span

    def start(self, call: CallRecord) -> None:
        span = self._current()
        if span.is_recording():
            call.span = span

    def end(self, call: CallRecord, duration: float, error_type: str | None) -> None:
        if call.span is not None:
            self.closer.finish(call, call.span)


class _Slot:
    """The call being served, the span current when loopwatch's middleware saw it, and what finishes spans."""

    __slots__ = ("call", "outer", "closer", "ctx")

    def __init__(self, call: CallRecord, outer: Any, closer: SpanCloser) -> None:
        self.call, self.outer, self.closer = call, outer, closer
        self.ctx: Any = None


_SLOT: ContextVar[_Slot | None] = ContextVar("loopwatch_otel_call", default=None)


class SlotHook:
    """For servers whose span (if any) opens inside loopwatch's middleware: hand the call inward.

    It joins the middleware, and the inner middleware joins the chain, only once a tracer provider is
    configured (`Tracing._attach`): with no SDK, requests pay nothing for tracing.
    """

    def __init__(self, closer: SpanCloser) -> None:
        self.closer = closer
        self._current = trace.get_current_span

    def start(self, call: CallRecord) -> None:
        _SLOT.set(_Slot(call, self._current(), self.closer))

    def end(self, call: CallRecord, duration: float, error_type: str | None) -> None:
        # `set`, not a token reset: `initialize` runs inline in the read loop's own context.
        _SLOT.set(None)


class RequestSpanMiddleware:
    """`ServerMiddleware` placed where fastmcp's span is current: enrich it, or open a SERVER span.

    A span opened between loopwatch's middleware and this one is fastmcp's: it is enriched. Where none
    was opened (a low-level server without the SDK's middleware, fastmcp with telemetry off or in
    propagation-only mode), loopwatch opens a semconv SERVER span itself, parented on the `traceparent`
    the client sent in `params._meta`.
    """

    def __init__(self, tracer: Any, closer: SpanCloser, configured: Callable[[], bool]) -> None:
        self.tracer, self.closer, self.configured = tracer, closer, configured
        self._current = trace.get_current_span
        self.framework_methods: frozenset[str] = frozenset()
        """Methods whose span the framework opens further in (fastmcp 3.x): `enter_framework_span` enriches it."""

    async def __call__(self, ctx: Any, call_next: Callable[[Any], Any]) -> Any:
        slot = _SLOT.get()
        if slot is None or ctx.request_id is None:
            return await call_next(ctx)
        current = self._current()
        if current is not slot.outer and not current.get_span_context().is_remote:
            if not current.is_recording():
                return await call_next(ctx)
            slot.call.span = current
            try:
                return await call_next(ctx)
            finally:
                self.closer.finish(slot.call, current)
        if not self.configured():
            return await call_next(ctx)
        if ctx.method in self.framework_methods and _global_provider_set():
            slot.ctx = ctx
            return await call_next(ctx)
        return await self._in_own_span(ctx, slot.call, call_next)

    async def _in_own_span(self, ctx: Any, call: CallRecord, call_next: Callable[[Any], Any]) -> Any:
        try:
            span = self.tracer.start_span(
                span_name(call), context=parent_context(ctx), kind=SpanKind.SERVER, attributes=request_attributes(ctx)
            )
        except Exception:
            logger.exception("could not open a request span")
            return await call_next(ctx)
        if span.is_recording():
            call.span = span
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            try:
                result = await call_next(ctx)
            except BaseException as exc:
                mark_error(span, exc)
                self.closer.finish(call, span, own=True)
                raise
        if call.method == "tools/call":
            from .mcp import _is_tool_error

            if _is_tool_error(result):
                span.set_attribute("error.type", "tool_error")
                span.set_status(StatusCode.ERROR)
        self.closer.finish(call, span, own=True)
        return result


_GLOBAL_SET = False


def _global_provider_set() -> bool:
    """Whether the global tracer provider is a real one (fastmcp records its spans there). Once true, stays."""
    global _GLOBAL_SET
    if not _GLOBAL_SET:
        _GLOBAL_SET = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _GLOBAL_SET


# What the framework's span lacks of a request's semconv attributes (fastmcp 3.x sets the method and names).
_ADDED_TO_FRAMEWORK_SPANS = ("jsonrpc.request.id", "mcp.protocol.version", "gen_ai.operation.name")


@contextlib.contextmanager
def enter_framework_span(span: Any) -> Iterator[None]:
    """Inside a request span a framework opened within loopwatch's seam (fastmcp 3.x's `server_span`): the
    call's span for blame, and finished (loopwatch's attributes; its end held for a late block) as it ends.
    A span opened inside another one of the same call (a mounted server's) is left as it is."""
    slot = _SLOT.get()
    if slot is None or slot.ctx is None or slot.call.span is not None or not span.is_recording():
        yield
        return
    call = slot.call
    call.span = span
    try:
        added = request_attributes(slot.ctx)
        span.set_attributes({k: added[k] for k in _ADDED_TO_FRAMEWORK_SPANS if k in added})
    except Exception:
        logger.exception("could not enrich a request span")
    try:
        yield
    finally:
        slot.closer.finish(call, span)


def span_name(call: CallRecord) -> str:
    """`{mcp.method.name} {target}`, as the semantic conventions and the SDK name it."""
    return f"{call.method} {call.tool}" if call.tool else call.method


def request_attributes(ctx: Any) -> dict[str, Any]:
    """The attributes the SDK's OpenTelemetryMiddleware sets, for the spans loopwatch opens itself."""
    method = ctx.method
    attributes: dict[str, Any] = {"mcp.method.name": report_text(method)}
    version = getattr(ctx, "protocol_version", None)
    if version:
        attributes["mcp.protocol.version"] = version
    if ctx.request_id is not None:
        attributes["jsonrpc.request.id"] = report_text(ctx.request_id)  # client-chosen: cut and escaped
    name = ctx.params.get("name") if ctx.params else None
    if method == "tools/call":
        attributes["gen_ai.operation.name"] = "execute_tool"
        if isinstance(name, str):
            attributes["gen_ai.tool.name"] = report_text(name)
    elif method == "prompts/get" and isinstance(name, str):
        attributes["gen_ai.prompt.name"] = report_text(name)
    elif method == "resources/read":
        uri = ctx.params.get("uri") if ctx.params else None
        if isinstance(uri, str):
            attributes["mcp.resource.uri"] = report_text(uri, 2048)
    return attributes


def parent_context(ctx: Any) -> Any:
    """The trace context in `params._meta` (traceparent), or None to parent on the current span."""
    meta = getattr(ctx, "meta", None)
    if not meta:
        return None
    try:
        extracted = extract(meta)
    except (TypeError, ValueError):
        return None
    return extracted if trace.get_current_span(extracted).get_span_context().is_valid else None


def mark_error(span: Any, exc: BaseException) -> None:
    from .mcp import error_type

    code = error_type(exc)
    span.set_attribute("error.type", code)
    if code.lstrip("-").isdigit():
        span.set_attribute("rpc.response.status_code", code)
    if code != "cancelled":
        span.set_status(StatusCode.ERROR, type(exc).__qualname__)


def final_attributes(call: CallRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        LOOP_BLOCKED_S: call.blocked_s,
        EXECUTION: call.execution,
        "network.transport": call.transport(),
    }
    session = call.session_id()
    if session:
        attributes["mcp.session.id"] = session
    return attributes


# -- ending spans after the watchdog has caught up ------------------------------------------------


class _Pending:
    __slots__ = ("call", "span", "real_end", "end_ns", "count", "heartbeat", "seen_step", "done")

    def __init__(self, call: CallRecord, span: Any, real_end: Any, count: int, heartbeat: Any) -> None:
        self.call, self.span, self.real_end = call, span, real_end
        self.end_ns: int | None = None
        self.count, self.heartbeat = count, heartbeat
        self.seen_step: int | None = None
        self.done = False


class SpanCloser:
    """Sets the final attributes on a request span, and holds its end while a block may be unreported.

    A block still in progress when a call returns is reported once the sentinel beats again and the
    watchdog polls. If that may be the case, the span's `end` is intercepted: the time the owner ended
    it is kept, and the span really ends (with that time) one watchdog step after the sentinel has beaten
    past the call's end, by which time the block's event is on it. Nothing here waits on the loop.
    """

    def __init__(self, monitor: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.clock = clock
        """The sentinel's clock (monotonic), replaceable in tests."""
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()

    def finish(self, call: CallRecord, span: Any, own: bool = False) -> None:
        """On the loop, as the call ends (before the span's owner ends it). Never raises into the call."""
        try:
            self._finish(call, span, own)
        except Exception:
            logger.exception("could not finish a request span")

    def _finish(self, call: CallRecord, span: Any, own: bool) -> None:
        span.set_attributes(final_attributes(call))
        waiting = self._unreported_block()
        if waiting is None:
            if own:
                span.end()
            return
        pending = _Pending(call, span, span.end, *waiting)
        if own:
            pending.end_ns = time.time_ns()
        else:
            try:
                span.end = functools.partial(self._ended_by_owner, pending)
            except (AttributeError, TypeError):
                return  # a span type that cannot be intercepted: its end stays where its owner puts it
        with self._lock:
            self._pending.append(pending)

    def _unreported_block(self) -> tuple[int, Any] | None:
        """(beat count, heartbeat) when a block may be in progress or found but not yet reported."""
        monitor = self.monitor
        hb = monitor.heartbeat
        if hb is None or not monitor.active:
            return None
        count, beat_at = hb.beat
        if hb.late or self.clock() - beat_at - hb.interval >= hb.threshold / 2:
            return count, hb
        return None

    def _ended_by_owner(self, pending: _Pending, end_time: int | None = None) -> None:
        with self._lock:
            if not pending.done:
                pending.end_ns = end_time if end_time is not None else time.time_ns()
                return
        pending.real_end(end_time)

    def tick(self, _lag: float = 0.0) -> None:
        """On the watchdog thread, for each sentinel beat: end the spans whose blocks are reported."""
        if not self._pending:
            return
        monitor = self.monitor
        hb, steps, active = monitor.heartbeat, monitor.watchdog_steps, monitor.active
        ready = []
        with self._lock:
            for pending in self._pending:
                if pending.heartbeat is not hb or not active:
                    ready.append(pending)
                elif pending.seen_step is None:
                    if hb.beat[0] > pending.count:
                        # The late record of that beat is queued; the next step's poll reports it.
                        pending.seen_step = steps
                elif steps != pending.seen_step:  # a later step (or a replaced watchdog, counting anew)
                    ready.append(pending)
            if ready:
                self._pending = [p for p in self._pending if p not in ready]
        for pending in ready:
            self._end(pending)

    def flush(self) -> None:
        """End every held span now (uninstrument, interpreter exit)."""
        with self._lock:
            ready, self._pending = self._pending, []
        for pending in ready:
            self._end(pending)

    def _end(self, pending: _Pending) -> None:
        with self._lock:
            pending.done = True
            end_ns = pending.end_ns
        span = pending.span
        try:
            vars(span).pop("end", None)
            span.set_attribute(LOOP_BLOCKED_S, pending.call.blocked_s)
            if end_ns is not None:
                pending.real_end(end_ns)
        except Exception:
            logger.exception("could not end a request span")


# -- blocks and offload decisions, on the watchdog thread ----------------------------------------


class BlockEvidence:
    """Span events and back-dated spans for blocks; span events for offload decisions."""

    def __init__(self, tracer: Any, configured: Callable[[], bool]) -> None:
        self.tracer, self.configured = tracer, configured
        self._recent: dict[str, Any] = {}
        """Tool name -> span of its last blocked call, where its offload decision is recorded."""

    def on_block(self, event: BlockEvent, call: CallRecord | None) -> None:
        span = call.span if call is not None else None
        if span is None and not self.configured():
            return
        attributes = block_attributes(event)
        start = ns(event.time)
        if span is not None:
            parent = trace.set_span_in_context(span)
            if span.is_recording():
                span.add_event(BLOCK_EVENT, attributes, timestamp=start)
                span.set_attribute(LOOP_BLOCKED_S, call.blocked_s)  # type: ignore[union-attr]
            if call is not None and call.tool:
                self._remember(call.tool, span)
        else:
            parent = otel_context.Context()  # a root span: no call, or a call nobody traced
            attributes.update(blamed_call_attributes(event))
        blocked = self.tracer.start_span(
            BLOCK_SPAN, context=parent, kind=SpanKind.INTERNAL, attributes=attributes, start_time=start
        )
        blocked.end(end_time=start + round(event.duration_s * 1e9))

    @any_thread
    def on_blocking(self, call: CallRecord, elapsed: float, importing: bool, stack: object = ()) -> None:
        """While a block goes on: an offload decision it causes belongs on this call's span."""
        if call.span is not None and call.tool:
            self._remember(call.tool, call.span)

    def on_event(self, event: Event) -> None:
        if not isinstance(event, OffloadEvent):
            return
        attributes = {
            "gen_ai.tool.name": event.tool,
            "loopwatch.offload.action": event.action,
            "loopwatch.offload.reason": event.reason,
            "loopwatch.offload.blocks": event.blocks,
        }
        at = ns(event.time)
        span = self._recent.get(event.tool)
        if span is not None and span.is_recording():
            span.add_event(OFFLOAD_EVENT, attributes, timestamp=at)
            return
        if not self.configured():
            return
        decision = self.tracer.start_span(
            f"{OFFLOAD_SPAN} {event.tool}", context=otel_context.Context(), attributes=attributes, start_time=at
        )
        decision.add_event(OFFLOAD_EVENT, attributes, timestamp=at)
        decision.end(end_time=at)

    def _remember(self, tool: str, span: Any) -> None:
        recent = self._recent
        recent.pop(tool, None)
        recent[tool] = span
        if len(recent) > _RECENT_TOOLS:
            del recent[next(iter(recent))]


def ns(seconds: float) -> int:
    """Wall-clock seconds (microsecond precision, as events carry them) to integer nanoseconds."""
    return round(seconds * 1e6) * 1000


def block_attributes(event: BlockEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "loopwatch.duration_s": event.duration_s,
        "loopwatch.kind": event.kind,
        "loopwatch.cpu_s": event.cpu_s,
        "loopwatch.samples": event.samples,
    }
    if event.gc_s:
        attributes["loopwatch.gc_s"] = event.gc_s
    where = event.culprit or (event.frames[-1] if event.frames else None)
    if where is not None:
        attributes["code.function.name"] = where.function
        attributes["code.file.path"] = where.file
        attributes["code.line.number"] = where.line
    if event.frames:
        leaf = event.frames[-1]
        attributes["loopwatch.leaf"] = f"{leaf.file}:{leaf.line} in {leaf.function}"
        attributes["code.stacktrace"] = format_stack(event.frames)
    if event.module:
        attributes["loopwatch.module"] = event.module
    return attributes


def blamed_call_attributes(event: BlockEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if event.method:
        attributes["mcp.method.name"] = event.method
    if event.tool:
        attributes["gen_ai.tool.name"] = event.tool
    if event.request_id is not None:
        attributes["jsonrpc.request.id"] = event.request_id
    if event.session_id:
        attributes["mcp.session.id"] = event.session_id
    return attributes


def format_stack(frames: Any) -> str:
    """Python's traceback layout, innermost last, without reading source files."""
    lines = [f'  File "{f.file}", line {f.line}, in {f.function}\n' for f in frames]
    return "Traceback (most recent call last):\n" + "".join(lines)


# -- the SDK for `loopwatch run` ----------------------------------------------------------------------

EXPORTERS = ("otlp", "console", "none")
OTLP_EXPORTERS = {  # protocol: (module, what to install)
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "loopwatch[otel]"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry-exporter-otlp-proto-grpc"),
}


def configure_from_env(service_name: str | None = None, environ: Mapping[str, str] = os.environ) -> Any:
    """Set up the OpenTelemetry SDK from the standard OTEL_* variables; returns the provider, or None.

    Nothing is set up when the program already set a tracer provider, when `OTEL_SDK_DISABLED=true`, when
    `OTEL_TRACES_EXPORTER=none`, or when neither `OTEL_TRACES_EXPORTER` nor an OTLP endpoint is set.
    Spans are exported by batch processors on their own threads; `console` writes to stderr.
    `service_name` is the fallback for `service.name` when `OTEL_SERVICE_NAME` does not set one.
    """
    names = _exporter_names(environ)
    if not names or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if trace is None:
        raise OptionError("OpenTelemetry is not installed: pip install 'loopwatch[otel]'")
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        logger.info("tracing: keeping the tracer provider the program set")
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise OptionError("the OpenTelemetry SDK is not installed: pip install 'loopwatch[otel]'") from None
    exporters = [_exporter(name, environ) for name in names]
    resource = Resource.create()
    if service_name and str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logger.info("tracing: exporting spans to %s", ", ".join(names))
    return provider


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise OptionError(f"OTEL_TRACES_EXPORTER={raw}: loopwatch run supports {', '.join(EXPORTERS)}")
    return [] if "none" in names else names


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout carries the stdio protocol
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip()
    if protocol not in OTLP_EXPORTERS:
        raise OptionError(f"OTLP protocol {protocol!r} is not supported: use http/protobuf or grpc")
    module, extra = OTLP_EXPORTERS[protocol]
    try:
        exporter_class = importlib.import_module(module).OTLPSpanExporter
    except ImportError:
        raise OptionError(f"the OTLP {protocol} exporter is not installed: pip install '{extra}'") from None
    return exporter_class()
