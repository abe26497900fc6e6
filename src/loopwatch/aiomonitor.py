"""An aiomonitor console with loopwatch's commands, answering while the server's loop is blocked.

    loopwatch run server.py --monitor            # or: loopwatch.instrument(server, monitor=True)
    python -m aiomonitor.cli -p 20101            # then: lw-where, lw-blocks, lw-tools, lw-lag, lw-profile

aiomonitor serves its telnet UI from a thread and loop of its own. Every `lw-` command reads
thread-safe data (snapshots, recent events, `sys._current_frames()`) and never waits on the
monitored loop. aiomonitor has no authentication: loopback only unless `monitor_allow_remote`,
and its Python REPL stays off unless `monitor_console`. asyncio and uvloop only; on trio the
server runs without the console.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._blame import culprit_frame, is_framework, sample_frame
from ._events import BlockEvent, Frame, OffloadEvent
from ._extensions import MissingExtra
from ._monitor import LAG_BOUNDS
from ._options import OptionError, Options

logger = logging.getLogger("loopwatch")

WEBUI_OFFSET = 1
"""aiomonitor's web UI listens on the console port + 1 (20102 by default), its REPL on + 2."""
REPL_OFFSET = 2
START_TIMEOUT = 10.0
BAR_WIDTH = 30

FrameSource = Callable[[], dict[int, Any]]


# -- options --------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: Options) -> str | None:
    """Refuse an unusable or unsafe address; return the warning to log at start-up, if any."""
    host, port = options.monitor_host, options.monitor_port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535 - REPL_OFFSET:
        top = 65535 - REPL_OFFSET
        raise OptionError(
            f"monitor_port must be 1-{top} (the web UI and REPL take the next two), not {port!r}"
        )
    if is_loopback(host):
        return None
    if not options.monitor_allow_remote:
        raise OptionError(
            f"monitor_host {host!r} is not a loopback address and aiomonitor has no authentication: "
            "anyone who reaches it can inspect the server and cancel its tasks. "
            "Pass monitor_allow_remote=True (--allow-remote-monitor) to serve it there anyway"
        )
    reach = f"{host}:{port}" + (f" (web UI {port + WEBUI_OFFSET})" if options.monitor_webui else "")
    warning = (
        f"the aiomonitor console listens on {reach} with no authentication: "
        "anyone who reaches it can read stacks and cancel tasks"
    )
    if options.monitor_console:
        warning += f", and run any Python code in this server through the REPL (port {port + REPL_OFFSET})"
    return warning


# -- which servers a console serves ---------------------------------------------------------------


class _Served:
    """The instrumented servers on one loop, and the one aiomonitor console they share."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.handles: list[Any] = []
        self.console: _Console | None = None


_served: dict[int, _Served] = {}
_served_lock = threading.Lock()


def handles_on(loop: Any) -> list[Any]:
    """The handles of the instrumented servers running on `loop` (an aiomonitor's monitored loop)."""
    with _served_lock:
        entry = _served.get(id(loop))
        return list(entry.handles) if entry is not None and entry.loop is loop else []


def _register(loop: Any, handle: Any) -> _Served:
    with _served_lock:
        entry = _served.get(id(loop))
        if entry is None or entry.loop is not loop:
            entry = _served[id(loop)] = _Served(loop)
        if handle not in entry.handles:
            entry.handles.append(handle)
        return entry


def _unregister(loop: Any, handle: Any) -> _Served | None:
    """Forget `handle`; returns the loop's entry when it was the last server there."""
    with _served_lock:
        entry = _served.get(id(loop))
        if entry is None or entry.loop is not loop or handle not in entry.handles:
            return None
        entry.handles.remove(handle)
        if entry.handles:
            return None
        del _served[id(loop)]
        return entry


# -- the console ----------------------------------------------------------------------------------


@functools.cache
def _monitor_class() -> type:
    import aiomonitor

    class LoopwatchAiomonitor(aiomonitor.Monitor):  # type: ignore[misc]
        """aiomonitor's Monitor, except that a UI thread failing at start-up says so instead of hanging, and its
        web UI runs only when asked for (`webui`), behind a check of the Host and Origin headers."""

        failure: BaseException | None = None
        webui = False

        def _ui_main(self) -> None:
            try:
                super()._ui_main()
            except BaseException as exc:
                if self._ui_started.is_set():
                    logger.error("the aiomonitor console stopped: %s: %s", type(exc).__name__, exc)
                self.failure = exc
                self._ui_started.set()

        async def _ui_main_async(self) -> None:
            """aiomonitor 0.7's UI thread main, with the web UI optional and guarded."""
            import asyncio
            import contextlib

            import janus
            from aiomonitor.monitor import interact

            loop = asyncio.get_running_loop()
            self._termination_info_queue = janus.Queue()
            self._cancellation_chain_queue = janus.Queue()
            self._ui_loop = loop
            self._ui_forever_future = loop.create_future()
            self._ui_termination_handler_task = loop.create_task(self._ui_handle_termination_updates())
            self._ui_cancellation_handler_task = loop.create_task(self._ui_handle_cancellation_updates())
            telnet_server = _telnet_server_class()(interact=functools.partial(interact, self), host=self._host,
                                                   port=self._termui_port)
            webui_runner = await self._start_webui() if self.webui else None
            telnet_server.start()
            await asyncio.sleep(0)
            self._ui_started.set()
            try:
                await self._ui_forever_future
            except asyncio.CancelledError:
                pass
            finally:
                termui_tasks = {*self._termui_tasks}
                for termui_task in termui_tasks:
                    termui_task.cancel()
                await asyncio.gather(*termui_tasks, return_exceptions=True)
                for task in (self._ui_termination_handler_task, self._ui_cancellation_handler_task):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await telnet_server.stop()
                if webui_runner is not None:
                    await webui_runner.cleanup()

        async def _start_webui(self) -> Any:
            from aiohttp import web
            from aiomonitor.webui.app import init_webui

            app = await init_webui(self)
            app.middlewares.append(_host_guard(str(self._host), self._webui_port))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, str(self._host), self._webui_port, reuse_port=True).start()
            return runner

    return LoopwatchAiomonitor


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host header values a web UI bound to `host` accepts (None: any, for a wildcard bind)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    name = f"[{host}]" if ":" in host else host
    return frozenset({name.lower(), f"{name}:{port}".lower()})


def _host_guard(host: str, port: int) -> Any:
    """Refuse requests for another Host (a DNS-rebinding page: 421) or from another Origin (403), as the MCP
    SDK's own transports do: a browser tab on any web site could otherwise list the tasks and cancel them."""
    from aiohttp import web

    hosts = allowed_hosts(host, port)

    @web.middleware
    async def guard(request: Any, handler: Any) -> Any:
        if hosts is not None:
            if request.headers.get("Host", "").lower() not in hosts:
                return web.Response(status=421, text="Invalid Host header")
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower().removeprefix("http://") not in hosts:
                return web.Response(status=403, text="Invalid Origin header")
        return await handler(request)

    return guard


def _check_free(host: str, port: int) -> None:
    """Fail now, with the port's name, rather than inside aiomonitor's thread where nobody sees it."""
    try:
        with _listening_socket(host, port, backlog=0):
            pass
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _listening_socket(host: str, port: int, backlog: int = 4) -> socket.socket:
    """A socket bound to `host` in that address's own family (an IPv4 socket cannot bind ::1)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if backlog:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.cache
def _telnet_server_class() -> type:
    from prompt_toolkit.contrib.telnet.server import TelnetServer

    class FamilyTelnetServer(TelnetServer):  # type: ignore[misc]
        """prompt_toolkit's telnet server, listening in the host's address family (its own is IPv4 only)."""

        @classmethod
        def _create_socket(cls, host: str, port: int) -> socket.socket:
            return _listening_socket(host, port)

    return FamilyTelnetServer


class _Console:
    """One aiomonitor on one loop, started and closed on helper threads: the loop never waits for it."""

    _last_at: dict[tuple[str, int], _Console] = {}
    """The latest console per address, so a restart waits until the previous one has let go of its ports."""

    def __init__(self, loop: Any, loop_thread_id: int, options: Options, locals: dict[str, Any]) -> None:
        self.loop, self.loop_thread_id, self.locals = loop, loop_thread_id, locals
        self.host, self.port = options.monitor_host, options.monitor_port
        self.repl = options.monitor_console
        self.webui = options.monitor_webui
        self.started = threading.Event()
        self.closing = threading.Event()
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.aiomonitor: Any = None
        self._previous: _Console | None = None

    def start(self) -> None:
        self._previous = _Console._last_at.get((self.host, self.port))
        _Console._last_at[(self.host, self.port)] = self
        threading.Thread(target=self._start, name="loopwatch-console-start", daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        threading.Thread(target=self._close, name="loopwatch-console-close", daemon=True).start()

    def wait_started(self, timeout: float = START_TIMEOUT) -> bool:
        """True once the console listens; False when it failed or did not start in time."""
        return self.started.wait(timeout) and self.error is None

    def _start(self) -> None:
        try:
            previous = self._previous
            if previous is not None and previous.closing.is_set():
                previous.closed.wait(START_TIMEOUT)
            self.aiomonitor = self._open()
            host, port = self.host, self.port
            attach = f"python -m aiomonitor.cli -H {host} -p {port}"
            webui = f" (web UI on port {port + WEBUI_OFFSET})" if self.webui else ""
            logger.info("aiomonitor console on %s:%d%s: attach with `%s`", host, port, webui, attach)
        except Exception as exc:
            self.error = exc
            self.closed.set()
            logger.error("no aiomonitor console: %s", exc)
        finally:
            self.started.set()

    def _open(self) -> Any:
        ports = [self.port] + [self.port + WEBUI_OFFSET] * self.webui + [self.port + REPL_OFFSET] * self.repl
        for port in ports:
            _check_free(self.host, port)
        monitor_class = _monitor_class()
        monitor = monitor_class(
            self.loop,
            host=self.host,
            termui_port=self.port,
            webui_port=self.port + WEBUI_OFFSET,
            console_port=self.port + REPL_OFFSET,
            console_enabled=self.repl,
            locals=self.locals,
        )
        monitor.webui = self.webui
        monitor.start()
        monitor._event_loop_thread_id = self.loop_thread_id  # start() ran here, not on the loop's thread
        if monitor.failure is not None:
            raise OSError(f"aiomonitor did not start: {type(monitor.failure).__name__}: {monitor.failure}")
        return monitor

    def _close(self) -> None:
        self.started.wait(START_TIMEOUT)
        try:
            if self.aiomonitor is not None and not self.aiomonitor.closed:
                self.aiomonitor.close()
        except Exception as exc:
            logger.debug("closing the aiomonitor console: %s", exc)
        finally:
            self.closed.set()


class ConsoleIntegration:
    """What `install()` returns: the console starts with the server's loop and stops with it."""

    def __init__(self, handle: Any, warning: str | None = None) -> None:
        self.handle = handle
        self.warning = warning
        self.console: _Console | None = None
        """The console this server is served by, once its loop has started (shared by servers on one loop)."""
        self._loop: Any = None

    def start(self) -> None:
        """Start hook, on the loop thread: register this server with its loop, start the loop's console."""
        monitor = self.handle.monitor
        loop = _running_asyncio_loop(monitor)
        if loop is None:
            logger.warning(
                "the aiomonitor console is asyncio-only; %s runs on %s and goes on without it",
                *(server_name(self.handle), monitor.backend or "an unknown event loop"),
            )
            return
        self._loop = loop
        entry = _register(loop, self.handle)
        with _served_lock:
            console, fresh = entry.console, entry.console is None
            if console is None:
                console = entry.console = _Console(
                    loop, monitor.loop_thread_id, self.handle.options, self._locals()
                )
        self.console = console
        if not fresh:
            where = f"{console.host}:{console.port}"
            logger.info("%s joins the aiomonitor console at %s", server_name(self.handle), where)
            return
        if self.warning:
            logger.warning("%s", self.warning)
        elif self.handle.options.monitor_console:
            logger.warning("the aiomonitor REPL is on: any local user can run code in this server")
        console.start()

    def _locals(self) -> dict[str, Any]:
        """What the REPL (when enabled) starts with."""
        return {
            "__name__": "__console__",
            "__doc__": None,
            "handle": self.handle,
            "server": self.handle.server,
        }

    def stop(self) -> None:
        """Stop hook: forget this server; the last server on a loop closes its console."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        emptied = _unregister(loop, self.handle)
        if emptied is not None and emptied.console is not None:
            emptied.console.close()

    def close(self) -> None:
        monitor = self.handle.monitor
        for hooks, hook in ((monitor.start_hooks, self.start), (monitor.stop_hooks, self.stop)):
            if hook in hooks:
                hooks.remove(hook)
        self.stop()


def _running_asyncio_loop(monitor: Any) -> Any:
    if monitor.backend not in (None, "asyncio"):
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def install(handle: Any) -> ConsoleIntegration:
    warning = check_options(handle.options)
    try:
        import aiomonitor  # noqa: F401
    except ImportError:
        raise MissingExtra("aiomonitor", "monitor") from None
    telnet_log = logging.getLogger("prompt_toolkit.contrib.telnet")
    if telnet_log.level == logging.NOTSET:
        telnet_log.setLevel(logging.WARNING)  # else every attach logs a handful of INFO lines on stderr
    add_commands()
    integration = ConsoleIntegration(handle, warning)
    handle.monitor.start_hooks.append(integration.start)
    handle.monitor.stop_hooks.append(integration.stop)
    return integration


# -- what the commands say: plain functions of thread-safe data ----------------------------------


def server_name(handle: Any) -> str:
    return getattr(handle.server, "name", None) or type(handle.server).__name__


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned; the first left, the others right (they are numbers), the last left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    last = len(widths) - 1

    def cell(i: int, text: str) -> str:
        return text.ljust(widths[i]) if i in (0, last) else text.rjust(widths[i])

    return "\n".join("  ".join(cell(i, text) for i, text in enumerate(row)).rstrip() for row in rows)


def tools_text(snapshot: dict[str, Any]) -> str:
    """A row per tool: calls, errors, in flight, p50, p99, blocks, blocked seconds, loop or thread."""
    header = ("tool", "calls", "errors", "now", "p50 ms", "p99 ms", "blocks", "blocked s", "runs on")
    rows = [header]
    for name, t in sorted(snapshot["tools"].items()):
        counts = map(str, (t["calls"], t["errors"], t["in_flight"]))
        times = (_ms(t["p50_s"]), _ms(t["p99_s"]), str(t["blocks"]), f"{t['blocked_s']:.3f}")
        rows.append((name, *counts, *times, t["executes"]))
    if len(rows) == 1:
        return "no tool calls yet"
    return table(rows)


def _origin(file: str) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            return file.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    return "importlib" if file.startswith("<frozen") else "stdlib"


def stack_lines(frames: Sequence[Frame], culprit: Frame | None = None, full: bool = False) -> list[str]:
    """Innermost last, the culprit marked; runs of framework frames folded into one line unless `full`."""
    lines: list[str] = []
    folded: list[Frame] = []

    def fold() -> None:
        if folded:
            origins = ", ".join(dict.fromkeys(_origin(f.file) for f in folded))
            lines.append(f"     ... {len(folded)} frame{'s' if len(folded) > 1 else ''} in {origins}")
            folded.clear()

    for index, frame in enumerate(frames):
        if not full and index < len(frames) - 1 and is_framework(frame.file) and frame != culprit:
            folded.append(frame)
            continue
        fold()
        mark = "->" if frame == culprit else "  "
        lines.append(f"  {mark} {frame.file}:{frame.line} in {frame.function}")
    fold()
    return lines


def blocks_text(events: Sequence[Any], count: int = 10, full: bool = False) -> str:
    """The last `count` blocks with their stacks, then the last offload decisions."""
    blocks = [e for e in events if isinstance(e, BlockEvent)][-count:]
    parts = ["no blocks yet"] if not blocks else []
    for event in blocks:
        parts.append(f"{_clock(event.time)}  {event.describe()}")
        parts.extend(stack_lines(event.frames, event.culprit, full))
    offloads = [e for e in events if isinstance(e, OffloadEvent)][-count:]
    if offloads:
        parts.append("offload decisions:")
        parts.extend(f"  {_clock(e.time)}  {e.describe()}" for e in offloads)
    return "\n".join(parts)


def lag_now(monitor: Any, clock: Callable[[], float] = time.monotonic) -> float | None:
    """How late the sentinel's next beat is right now: it grows while the loop is blocked."""
    heartbeat = monitor.heartbeat
    if heartbeat is None or not monitor.active:
        return None
    return max(0.0, clock() - heartbeat.beat[1] - heartbeat.interval)


def _bound_label(key: str) -> str:
    bound = key.removeprefix("le_")
    return f"> {_duration(LAG_BOUNDS[-1])}" if bound == "inf" else f"<= {_duration(float(bound))}"


def lag_text(snapshot: dict[str, Any], now: float | None) -> str:
    lag, threshold = snapshot["lag"], snapshot["threshold_s"]
    if now is None:
        state = "not watching (the server's loop is not running)"
    elif now >= threshold:
        state = f"{_duration(now)}: BLOCKED (threshold {_duration(threshold)})"
    else:
        state = f"{_duration(now)} (threshold {_duration(threshold)})"
    lines = [
        f"lag now    {state}",
        f"recent     p50 {_ms(lag['p50_s'])} ms, p99 {_ms(lag['p99_s'])} ms, last {_ms(lag['last_s'])} ms",
        f"all time   max {_ms(lag['max_s'])} ms over {lag['beats']} beats",
    ]
    histogram = lag["histogram"]
    most = max(histogram.values(), default=0)
    if most:
        lines.append("histogram")
        for key, n in histogram.items():
            if n:
                bar = "#" * max(1, round(n / most * BAR_WIDTH))
                lines.append(f"  {_bound_label(key):>11}  {n:>8}  {bar}")
    return "\n".join(lines)


def where_text(monitor: Any, full: bool = False, frames: FrameSource = sys._current_frames) -> str:
    """The loop thread's stack right now, the call it serves, and whether it is blocked."""
    thread_id = monitor.loop_thread_id
    if thread_id is None or not monitor.active:
        return "the server's loop is not being watched (not started yet, or stopped)"
    sample = sample_frame(frames().get(thread_id))
    if sample is None:
        return f"the loop thread {thread_id} has no Python frame (it has exited)"
    now = lag_now(monitor)
    blocked = now is not None and now >= monitor.options.threshold
    stack = tuple(Frame(*raw) for raw in sample.stack)
    home = monitor._tool_home(sample.call) if sample.call is not None else None  # as the block report decides
    culprit = culprit_frame(stack, home) if stack else None
    state = f"BLOCKED for {_duration(now)}" if blocked else "responsive"
    lines = [
        f"loop thread {thread_id} ({monitor.backend}): {state}",
        f"serving    {describe_call(sample.call)}",
    ]
    if stack:
        where = stack[-1].short() + (f" <- {culprit.short()}" if culprit and culprit != stack[-1] else "")
        lines.append(f"{'blocked at' if blocked else 'now at    '} {where}")
        if sample.module:
            lines.append(f"importing  {sample.module}")
        lines.append("stack (innermost last):")
        lines.extend(stack_lines(stack, culprit, full))
    return "\n".join(lines)


def describe_call(call: Any) -> str:
    if call is None:
        return "no call (the loop is between requests)"
    target = f" {call.tool}" if call.tool else ""
    rid = f" (request {call.request_id})" if call.request_id is not None else ""
    since = f", for {_duration(time.perf_counter() - call.started)}" if call.started else ""
    return f"{call.method}{target}{rid}{since}"


def _knows(handle: Any, tool: str) -> bool:
    names = handle.monitor.tools
    if tool in names.known:
        return True
    try:
        return bool(names.registry is not None and names.registry(tool))
    except Exception:
        return False


def pick_server(handles: Sequence[Any], tool: str, server: str | None = None) -> Any:
    """The server a tool command is for: named, the only one, or the only one that has the tool."""
    if server is not None:
        named = [h for h in handles if server_name(h) == server]
        if not named:
            raise LookupError(f"no server named {server!r} here; servers: {_names(handles)}")
        return named[0]
    if len(handles) == 1:
        return handles[0]
    having = [h for h in handles if _knows(h, tool)]
    if len(having) == 1:
        return having[0]
    which = "several servers have" if having else "no server knows"
    raise LookupError(f"{which} a tool {tool!r}: pick one with --server NAME ({_names(having or handles)})")


def _names(handles: Sequence[Any]) -> str:
    return ", ".join(server_name(h) for h in handles)


def policy_text(handles: Sequence[Any], tool: str, policy: str, server: str | None = None) -> str:
    """Set a tool's offload policy by hand, the way the `lw-offload` and `lw-restore` commands do."""
    try:
        handle = pick_server(handles, tool, server)
        handle.set_tool_policy(tool, policy)
    except (LookupError, RuntimeError, ValueError) as exc:
        return f"✗ {exc}"
    runs = handle.monitor.where(tool)
    if policy == "process":
        if runs == "process":
            return f"✓ {tool} runs in a worker process from its next call (policy process)"
        why = handle.offload.processes.can_move(tool) or "see the server's log"
        return f"✗ {tool} cannot run in a process ({why}); it runs on {runs}"
    if policy == "always" and runs not in ("thread", "process"):
        return f"✗ {tool} stays on the loop: {server_name(handle)} has no such tool that loopwatch can move"
    if policy == "always":
        return f"✓ {tool} runs off the loop from its next call (policy always)"
    return f"✓ {tool} is back to policy auto (runs on {runs} now): blocks decide where it runs"


# -- the commands on aiomonitor's command group --------------------------------------------------


def _per_server(handles: Sequence[Any], render: Callable[[Any], str]) -> str:
    if len(handles) == 1:
        return render(handles[0])
    return "\n\n".join(f"== {server_name(h)} ==\n{render(h)}" for h in handles)


def _tools(handles: Sequence[Any]) -> str:
    """Per-tool calls, latency and blocks.

    A row per tool: calls, errors, calls in flight now, p50 and p99 in ms, blocks, seconds of
    loop blocked, and where the tool runs (loop or thread).
    """
    return _per_server(handles, lambda h: tools_text(h.snapshot()))


def _blocks(handles: Sequence[Any], n: int, full: bool) -> str:
    """Recent blocks with the call and line.

    The last N blocks (10 by default), each with the call it is blamed on, its kind, and its
    stack, innermost last; the culprit line is marked ->. Framework frames are folded unless --all.
    """
    return _per_server(handles, lambda h: blocks_text(list(h.monitor.recent), n, full))


def _lag(handles: Sequence[Any]) -> str:
    """Loop lag now, and its histogram.

    "lag now" grows while the loop is blocked; then p50/p99 of recent beats and a histogram.
    """
    return _per_server(handles, lambda h: lag_text(h.snapshot(), lag_now(h.monitor)))


def _where(handles: Sequence[Any], full: bool) -> str:
    """The loop thread's stack right now.

    Read from another thread, so it answers while the loop is blocked: whether it is blocked
    and for how long, the call being served, and the stack with the culprit line marked ->.
    """
    return where_text(handles[0].monitor, full)


def _offload(handles: Sequence[Any], tool: str, server: str | None, process: bool = False) -> str:
    """Run a tool off the loop from now on.

    Sets the tool's policy to always: its calls run on a worker thread; with --process, to
    process: they run in a worker process (for CPU-bound tools: no shared GIL). Works with
    --offload off too (off stops only the automatic moves). Written to the events like every
    offload decision.
    """
    return policy_text(handles, tool, "process" if process else "always", server)


def _restore(handles: Sequence[Any], tool: str, server: str | None) -> str:
    """Undo lw-offload: policy back to auto.

    Blocks decide again where the tool runs.
    """
    return policy_text(handles, tool, "auto", server)


def profile_text(handle: Any, prefix: str | None = None) -> str:
    """Write a server's recent blocks as a speedscope profile and folded stacks, as `loopwatch report` does."""
    import os

    from ._announce import integration_of
    from .report import blocks_from_dicts, write_profiles

    announced = integration_of(handle)
    events = list(announced.log.blocks) if announced is not None else list(handle.monitor.recent)
    blocks = blocks_from_dicts(e.to_dict() for e in events if isinstance(e, BlockEvent))
    if not blocks:
        return "no blocks yet: nothing to draw"
    name = server_name(handle)
    base = prefix or f"loopwatch-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}-{os.getpid()}"
    title = f"{name} (pid {os.getpid()}): blocked loop time"
    written = write_profiles(blocks, f"{base}.speedscope.json", f"{base}.folded", title)
    return "\n".join([f"✓ {len(blocks)} blocks written", *written])


def _profile(handles: Sequence[Any], prefix: str | None, server: str | None) -> str:
    """Write the recent blocks as flame graphs.

    PREFIX.speedscope.json (open it at speedscope.app) and PREFIX.folded (flamegraph.pl,
    inferno), in the server's working directory unless PREFIX has a path; by default
    loopwatch-NAME-PID. The same files `loopwatch report` writes from an events file.
    """
    if server is not None:
        handles = [h for h in handles if server_name(h) == server]
        if not handles:
            return f"✗ no server named {server!r} here"
    return _per_server(handles, lambda h: profile_text(h, prefix if len(handles) == 1 else None))


def answer(aiomonitor: Any, body: Callable[..., str], **arguments: Any) -> str:
    """What a command prints, for the aiomonitor whose monitored loop runs the servers."""
    handles = handles_on(getattr(aiomonitor, "_monitored_loop", None))
    if not handles:
        return "✗ no server instrumented by loopwatch with monitor=True is running on this loop"
    try:
        return body(handles, **arguments)
    except Exception as exc:
        logger.debug("console command failed", exc_info=True)
        return f"✗ {type(exc).__name__}: {exc}"


def _write(text: str) -> None:
    from aiomonitor.context import current_stdout

    out = current_stdout.get(None) or sys.stderr  # never stdout: under stdio it is the protocol's
    out.write(text.rstrip("\n") + "\n")
    out.flush()


def _complete_tool(ctx: Any, param: Any, incomplete: str) -> list[str]:
    from aiomonitor.context import current_monitor

    try:
        loop = current_monitor.get()._monitored_loop
    except (LookupError, AttributeError):
        return []
    names = {name for h in handles_on(loop) for name in h.monitor.tools.known}
    return sorted(n for n in names if n.startswith(incomplete))[:20]


_commands_added = False


def add_commands() -> None:
    """Add the `lw-` commands to aiomonitor's command group (once per process)."""
    global _commands_added
    if _commands_added:
        return
    import click
    from aiomonitor.termui.commands import auto_command_done, custom_help_option, monitor_cli

    def command(name: str, body: Callable[..., str], *params: Callable[[Any], Any]) -> None:
        def run(ctx: click.Context, **arguments: Any) -> None:
            _write(answer(ctx.obj, body, **arguments))

        run.__doc__ = body.__doc__
        decorated = custom_help_option(auto_command_done(run))
        for param in reversed(params):
            decorated = param(decorated)
        monitor_cli.command(name=name)(decorated)

    every_frame = click.option("-a", "--all", "full", is_flag=True, help="every frame, framework ones too")
    tool = click.argument("tool", shell_complete=_complete_tool)
    server = click.option("-s", "--server", help="the server's name, when several run on this loop")
    command("lw-tools", _tools)
    count = click.argument("n", type=click.IntRange(min=1), default=10, required=False)
    command("lw-blocks", _blocks, count, every_frame)
    command("lw-lag", _lag)
    command("lw-where", _where, every_frame)
    in_process = click.option("-p", "--process", "process", is_flag=True, help="in a worker process, not a thread")
    command("lw-offload", _offload, tool, server, in_process)
    command("lw-restore", _restore, tool, server)
    prefix = click.argument("prefix", required=False)
    command("lw-profile", _profile, prefix, server)
    _commands_added = True
