"""Per-call cost of loopwatch on an in-memory round trip: wrapped against bare, interleaved in one run.

    python benchmarks/bench_overhead.py [--rounds 30] [--calls 400]

Each round opens an in-memory client on the bare server, then on the wrapped one, in alternating order, and
times `calls` sequential tools/call round trips of a no-op async tool, after 20 untimed ones. Prints the
median of the per-round ratios (target <= 1.015 for the core) with a 95% bootstrap interval of that median
and, for scale, the SDK's own OpenTelemetryMiddleware against no middleware; for wall time, then for the
process's CPU time. An A/A line (a second bare server against the first) shows how far apart two identical
configurations land on this machine in this run: differences smaller than its spread are noise.

What is timed: the per-call lines time the calls only. The wrapped server's start (monitor, sentinel,
watchdog thread, announcement socket) happens as the client opens, before them, and is timed apart: the
"session start" lines (client open and initialize, which enters the server's lifespan) give its ratio and
what it adds in microseconds. What a started thread still costs while calls run (a sentinel beat, a
watchdog look, a thread waiting for the GIL) lands in the per-call figure. Every round is a fresh session,
so a cost that lasts for a while after each start is paid in every round here; a real server pays it once.
"bare with a parked thread" is the bare server with one thread beside it that does nothing: on Linux a
process with a second thread pays for it in every system call that takes a descriptor (the descriptor table
is shared, so the kernel counts references it skips in a single-threaded process; the loop polls once per
iteration), a floor that any watcher with a thread of its own (loopwatch's watchdog, pyleak's) stands on. A
real stdio server already has such a thread (the SDK reads stdin on a worker thread), so there the floor is
the bare server's too. "loopwatch core vs bare + parked thread" is what loopwatch costs above it. "core,
private fds" is the core with its watchdog in a descriptor table of its own (`LOOPWATCH_PRIVATE_FDS=1`,
opt-in, Linux), off that floor (the announcement's thread stays in the process's table).
"announce on vs off" compares the defaults with and without the announcement socket that `loopwatch top`
reads. `--also MODULE` times another copy of loopwatch (an older release copied under another name, on
PYTHONPATH; its core configuration, announcement on) in the same run.

`--ablate` adds the core's pieces, each against bare in the same rounds (all with the announcement off):
"pass-through middleware" (an `async def` that only awaits `call_next`: the SDK's price for any layer, a
`partial`, its adapter and a coroutine per request), "loopwatch middleware only" (the core with its
lifespan hook undone: no sentinel, no watchdog), "loopwatch watch only" (the core with its middleware taken
out of the chain), "core, announce off" (both together), "core, 50 ms beats" and "core, 100 ms beats"
(`interval=0.05`, `0.1`: what the beat rate costs, against "core, announce off"), and "bare, 10 ms wake-up"
(the bare server beside a loop reader that only re-arms its 10 ms timerfd: what waking the loop a hundred
times a second costs by itself, whatever the beat does). What the two pieces cost together above their sum is
what one costs in the presence of the other.
"""

from __future__ import annotations

import argparse
import importlib
import os
import threading
import time

import anyio
from _common import report
from mcp import Client
from mcp.server.mcpserver import MCPServer

import loopwatch


def make_server(name: str) -> MCPServer:
    server = MCPServer(name)

    @server.tool()
    async def noop(n: int = 0) -> int:
        return n

    return server


async def timed_round(
    server: MCPServer,
    calls: int,
    cpu: list[float] | None = None,
    opened: list[float] | None = None,
    parked_thread: bool = False,
    wake_up: bool = False,
) -> float:
    """Seconds per call; with `cpu`, the process's CPU seconds per call are appended to it (client, server
    and watchdog thread alike: less sensitive than wall time to a machine that others share); with `opened`,
    the seconds the session took to open (the server's start), which the per-call figure leaves out; with
    `parked_thread`, a thread that does nothing (parked on an event) lives through the round; with `wake_up`, a
    reader on the loop that only re-arms its 10 ms timerfd (a beat that does nothing: what waking the loop
    costs by itself)."""
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait, daemon=True) if parked_thread else None
    if thread is not None:
        thread.start()
    stop_waking = _wake_up_every(0.01) if wake_up else None
    try:
        return await _round(server, calls, cpu, opened)
    finally:
        if stop_waking is not None:
            stop_waking()
        parked.set()
        if thread is not None:
            thread.join()


def _wake_up_every(seconds: float):  # noqa: ANN202
    """A timerfd reader on the running loop that only re-arms itself; returns what removes it."""
    import asyncio

    from loopwatch._timer import stall_timer

    loop, timer = asyncio.get_running_loop(), stall_timer(seconds)
    if timer is None or timer.fd is None:
        raise SystemExit("--ablate's wake-up line needs a Linux timerfd")
    timer.arm()
    loop.add_reader(timer.fd, timer.arm)

    def stop() -> None:
        loop.remove_reader(timer.fd)
        timer.close()

    return stop


async def _round(server: MCPServer, calls: int, cpu: list[float] | None, opened: list[float] | None) -> float:
    began = time.perf_counter()
    async with Client(server) as client:
        if opened is not None:
            opened.append(time.perf_counter() - began)
        for _ in range(20):
            await client.call_tool("noop", {"n": 1})
        start, used = time.perf_counter(), time.process_time()
        for i in range(calls):
            await client.call_tool("noop", {"n": i})
        if cpu is not None:
            cpu.append((time.process_time() - used) / calls)
        return (time.perf_counter() - start) / calls


WAKE_UP = "bare, 10 ms wake-up"
"""The ablation whose rounds run the bare server beside a loop reader that only re-arms (`timed_round`)."""
ABLATIONS = (
    "pass-through middleware",
    "loopwatch middleware only",
    "loopwatch watch only",
    "core, announce off",
    "core, 50 ms beats",
    "core, 100 ms beats",
    WAKE_UP,
)


def ablations() -> dict[str, MCPServer]:
    """The core's pieces apart (`--ablate`): see the docstring."""
    servers = {name: make_server(name) for name in ABLATIONS}

    async def pass_through(ctx, call_next):  # noqa: ANN001, ANN202
        return await call_next(ctx)

    chain = servers["pass-through middleware"].middleware  # in loopwatch's place: inside the SDK's OpenTelemetry
    chain.insert(1 if chain and type(chain[0]).__name__ == "OpenTelemetryMiddleware" else 0, pass_through)
    middleware_only = loopwatch.instrument(servers["loopwatch middleware only"], **CORE, announce=False)
    middleware_only._lowlevel.lifespan = middleware_only._original_lifespan  # no watch: the middleware alone
    watch_only = loopwatch.instrument(servers["loopwatch watch only"], **CORE, announce=False)
    watch_only.adapter.remove(watch_only.middleware)  # the watch alone
    loopwatch.instrument(servers["core, announce off"], **CORE, announce=False)
    loopwatch.instrument(servers["core, 50 ms beats"], **CORE, announce=False, interval=0.05)
    loopwatch.instrument(servers["core, 100 ms beats"], **CORE, announce=False, interval=0.1)
    # WAKE_UP stays bare: its rounds run beside a do-nothing reader (`timed_round(wake_up=True)`)
    return servers


CORE = {"traces": False, "log_blocks": False}


class _private_fds:
    """`LOOPWATCH_PRIVATE_FDS=1` for a round when `on` (read as the watch starts)."""

    def __init__(self, on: bool) -> None:
        self.on, self.old = on, None

    def __enter__(self) -> None:
        if self.on:
            self.old = os.environ.get("LOOPWATCH_PRIVATE_FDS")
            os.environ["LOOPWATCH_PRIVATE_FDS"] = "1"

    def __exit__(self, *exc: object) -> None:
        if self.on:
            if self.old is None:
                os.environ.pop("LOOPWATCH_PRIVATE_FDS", None)
            else:
                os.environ["LOOPWATCH_PRIVATE_FDS"] = self.old


async def main(rounds: int, calls: int, also: tuple[str, ...] = (), ablate: bool = False) -> None:
    bare = make_server("bare")
    bare_again = make_server("bare-again")
    core = make_server("core")
    loopwatch.instrument(core, traces=False, log_blocks=False)
    default = make_server("default")
    loopwatch.instrument(default)
    quiet = make_server("no-announce")
    loopwatch.instrument(quiet, announce=False)  # the same defaults without the announcement socket
    no_mw = make_server("no-middleware")
    no_mw.middleware.clear()  # the SDK's OpenTelemetryMiddleware removed, for scale
    parked = make_server("parked-thread")  # bare, with a thread that does nothing beside it: see the docstring
    private = make_server("core-private")
    loopwatch.instrument(private, traces=False, log_blocks=False)  # run with LOOPWATCH_PRIVATE_FDS=1
    servers = {
        "bare": bare,
        "core": core,
        "default": default,
        "quiet": quiet,
        "none": no_mw,
        "bare-again": bare_again,
        "parked": parked,
        "private": private,
    }
    if ablate:
        servers.update(ablations())
    for module_name in also:  # another copy of loopwatch under another name (an older release, a branch)
        other = make_server(module_name)
        importlib.import_module(module_name).instrument(other, traces=False, log_blocks=False)
        servers[module_name] = other
    for name, server in servers.items():  # warm-up, discarded: the first run of anything in a process is slow
        with _private_fds(name == "private"):
            await timed_round(server, calls, wake_up=name == WAKE_UP)
    times: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    opened: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]  # rotate who goes first
        for name in order:
            with _private_fds(name == "private"):
                seconds = await timed_round(servers[name], calls, cpu[name], opened[name],
                                            parked_thread=name == "parked",
                                            wake_up=name == WAKE_UP)
            times[name].append(seconds)
    print(f"{rounds} rounds x {calls} sequential in-memory tools/call round trips, configurations rotated per round")
    for label, table in (("wall", times), ("CPU", cpu)):
        print(f"{label} time per call:")
        report("loopwatch core (traces=False) vs bare", table["bare"], table["core"])
        report("loopwatch defaults vs bare", table["bare"], table["default"])
        report("defaults, announce off vs bare", table["bare"], table["quiet"])
        report("announce on vs off (both defaults)", table["quiet"], table["default"])
        report("SDK OpenTelemetryMiddleware vs none", table["none"], table["bare"])
        report("A/A: bare vs the same bare again", table["bare"], table["bare-again"])
        report("bare with a parked thread vs bare", table["bare"], table["parked"])
        report("loopwatch core vs bare + parked thread", table["parked"], table["core"])
        report("core, private fds vs bare", table["bare"], table["private"])
        for module_name in also:
            report(f"{module_name} core vs bare", table["bare"], table[module_name])
        if ablate:
            for name in ABLATIONS:
                report(f"{name} vs bare", table["bare"], table[name])
            for name in ("core, 50 ms beats", "core, 100 ms beats"):  # the beat rate alone, paired in each round
                report(f"{name} vs 10 ms (announce off)", table["core, announce off"], table[name])
    print("session start (client open and initialize: the server's lifespan, loopwatch's start), not in the above:")
    report("loopwatch core vs bare", opened["bare"], opened["core"], added=True)
    report("loopwatch defaults vs bare", opened["bare"], opened["default"], added=True)
    report("announce on vs off (both defaults)", opened["quiet"], opened["default"], added=True)
    report("A/A: bare vs the same bare again", opened["bare"], opened["bare-again"], added=True)
    for module_name in also:
        report(f"{module_name} core vs bare", opened["bare"], opened[module_name], added=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--also", action="append", default=[], metavar="MODULE",
                        help="time MODULE.instrument() too: a copy of loopwatch under another name (compare versions)")
    parser.add_argument("--ablate", action="store_true", help="time the core's pieces apart too (see above)")
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls, tuple(args.also), args.ablate)
