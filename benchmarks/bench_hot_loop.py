"""Cost of watching a hot loop: bare against `loopwatch.watch()` against pyleak, interleaved in one run.

    python benchmarks/bench_hot_loop.py [--rounds 20] [--scale 0.2] [--backends asyncio,uvloop,trio]

Two hot loops, on asyncio, uvloop and trio: 500,000 `sleep(0)` in one task, and 100,000 ping-pongs between
two tasks over a pair of queues (asyncio.Queue; trio memory channels). Each run is a fresh event loop
(`asyncio.run`, `uvloop.run`, `trio.run`); within a round the configurations run in a rotated order: bare,
loopwatch (`watch()` with its defaults, log lines off), the same with its watchdog in a descriptor table of
its own (`private-fds`: `LOOPWATCH_PRIVATE_FDS=1`, opt-in, Linux), any `--also` copies, pyleak's
`no_event_loop_blocking()` (its defaults; `pip install pyleak`, optional: skipped when missing), bare with one
idle thread (the floor of any watcher whose thread shares the process's descriptor table: see `idle_thread`)
and bare again (the A/A line). Prints, per backend and loop, the median of the per-round ratios against bare
with their quartiles, for the process's CPU time (the loop and any watching thread: robust to a machine that
others share) and for wall time; then, per backend and loop, loopwatch's CPU ratio (and private-fds')
against bare and against pyleak in the same rounds, each median with a 95% bootstrap interval (how sure it
is). Many short rounds (the default: a fifth of the counts, 20 rounds) interleave better than a few long ones
on a shared machine; `--scale 1` runs the full counts. Ratios closer together than the A/A spread
are noise. To compare with another version: `cp -r OLD/src/loopwatch /tmp/old/loopwatch_old` (its imports
are relative), then `PYTHONPATH=/tmp/old python benchmarks/bench_hot_loop.py --also loopwatch_old`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import statistics
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable

from _common import median_interval

import loopwatch

SLEEPS = 500_000
PING_PONGS = 100_000


async def asyncio_sleeps(n: int) -> None:
    sleep = asyncio.sleep
    for _ in range(n):
        await sleep(0)


async def asyncio_ping_pong(n: int) -> None:
    ping: asyncio.Queue[int] = asyncio.Queue()
    pong: asyncio.Queue[int] = asyncio.Queue()

    async def echo() -> None:
        for _ in range(n):
            await pong.put(await ping.get())

    task = asyncio.create_task(echo())
    for i in range(n):
        await ping.put(i)
        await pong.get()
    await task


async def trio_sleeps(n: int) -> None:
    import trio

    sleep = trio.sleep
    for _ in range(n):
        await sleep(0)


async def trio_ping_pong(n: int) -> None:
    import trio

    ping_send, ping_recv = trio.open_memory_channel[int](1)
    pong_send, pong_recv = trio.open_memory_channel[int](1)

    async def echo() -> None:
        for _ in range(n):
            await pong_send.send(await ping_recv.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for i in range(n):
            await ping_send.send(i)
            await pong_recv.receive()


WORK = {
    "asyncio": {"sleep(0)": asyncio_sleeps, "ping-pong": asyncio_ping_pong},
    "uvloop": {"sleep(0)": asyncio_sleeps, "ping-pong": asyncio_ping_pong},
    "trio": {"sleep(0)": trio_sleeps, "ping-pong": trio_ping_pong},
}


def bare():
    return contextlib.nullcontext()


def watched():
    return loopwatch.watch(log_blocks=False)


@contextlib.asynccontextmanager
async def watched_private() -> AsyncIterator[None]:
    """`watch()` with its watchdog in a descriptor table of its own (`LOOPWATCH_PRIVATE_FDS=1`, opt-in: see
    `loopwatch._fdtable`): no thread of the process's table beside a hot loop."""
    old = os.environ.get("LOOPWATCH_PRIVATE_FDS")
    os.environ["LOOPWATCH_PRIVATE_FDS"] = "1"
    try:
        async with loopwatch.watch(log_blocks=False):
            yield
    finally:
        if old is None:
            os.environ.pop("LOOPWATCH_PRIVATE_FDS", None)
        else:
            os.environ["LOOPWATCH_PRIVATE_FDS"] = old


@contextlib.asynccontextmanager
async def idle_thread() -> AsyncIterator[None]:
    """Bare, with one more thread parked on a lock for the run: the floor of any watcher whose thread shares the
    process's descriptor table. While two threads share one, Linux takes and drops a reference to the file at
    every system call on a descriptor (one thread alone borrows it), and a hot loop makes one (its poll) an
    iteration. With `LOOPWATCH_PRIVATE_FDS=1` loopwatch's watchdog takes a table of its own
    (`loopwatch._fdtable`) and is not under it."""
    parked = threading.Lock()
    parked.acquire()
    thread = threading.Thread(target=parked.acquire, daemon=True)
    thread.start()
    try:
        yield
    finally:
        parked.release()
        thread.join()


def pyleak_watched():
    from pyleak import no_event_loop_blocking

    return no_event_loop_blocking()


class _Async:
    """An async context manager around a maybe-sync factory (nullcontext is both)."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make

    async def __aenter__(self) -> None:
        self.cm = self.make()
        await self.cm.__aenter__()  # type: ignore[attr-defined]

    async def __aexit__(self, *exc: object) -> None:
        await self.cm.__aexit__(*exc)  # type: ignore[attr-defined]


def run_once(backend: str, work, n: int, make) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process: the loop and any watching thread) of one run."""

    async def main() -> tuple[float, float]:
        async with _Async(make):
            start, cpu = time.perf_counter(), time.process_time()
            await work(n)
            return time.perf_counter() - start, time.process_time() - cpu

    if backend == "asyncio":
        return asyncio.run(main())
    if backend == "uvloop":
        import uvloop

        return uvloop.run(main())
    import trio

    return trio.run(main)


def configurations(also: list[str]) -> dict[str, Callable[[], object]]:
    configs: dict[str, Callable[[], object]] = {"bare": bare, "loopwatch": watched, "private-fds": watched_private}
    for name in also:  # another copy of loopwatch, importable under another name (an older release, a branch)
        module = importlib.import_module(name)
        configs[name] = lambda module=module: module.watch(log_blocks=False)
    try:
        import pyleak  # noqa: F401

        configs["pyleak"] = pyleak_watched
    except ImportError:
        print("pyleak is not installed (pip install pyleak): its line is skipped")
    configs["idle-thread"] = idle_thread
    configs["bare-again"] = bare
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.2, help="fraction of 500k sleeps / 100k ping-pongs")
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    parser.add_argument("--also", action="append", default=[], metavar="MODULE",
                        help="time MODULE.watch() too: a copy of loopwatch under another name, to compare versions")
    args = parser.parse_args()
    logging.getLogger("pyleak").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", ResourceWarning)
    counts = {"sleep(0)": int(SLEEPS * args.scale), "ping-pong": int(PING_PONGS * args.scale)}
    configs = configurations(args.also)
    names = list(configs)
    cases = [(b, w) for b in args.backends.split(",") for w in WORK[b]]
    times: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for backend, work in cases:  # warm-up, discarded
        for name in names:
            run_once(backend, WORK[backend][work], counts[work] // 10, configs[name])
    for index in range(args.rounds):
        for backend, work in cases:
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                seconds = run_once(backend, WORK[backend][work], counts[work], configs[name])
                times.setdefault((backend, work, name), []).append(seconds)
    print(f"{args.rounds} rounds; {counts['sleep(0)']} sleep(0), {counts['ping-pong']} ping-pongs; order rotated")
    print("ratio to bare: median of the rounds (quartiles); CPU = the process's CPU time, wall = elapsed time")
    for which, column in (("CPU", 1), ("wall", 0)):
        for backend, work in cases:
            base = [t[column] for t in times[(backend, work, "bare")]]
            line = f"{which:<5}{backend:<8} {work:<10} bare {statistics.median(base):.3f} s"
            for name in names[1:]:
                other = [t[column] for t in times[(backend, work, name)]]
                ratios = [o / b for b, o in zip(base, other, strict=True)]
                label = "A/A" if name == "bare-again" else name
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                line += f" | {label} {statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f})"
            print(line)
    # The two questions of the cost issue, with how sure each median is: loopwatch against bare (<= 1.02), and
    # loopwatch against pyleak in the same rounds (<= 1: a watcher no heavier than the lightest peer).
    print("CPU, median with its 95% bootstrap interval: against bare | against pyleak, same rounds")
    for ours_name in ("loopwatch", "private-fds"):
        for backend, work in cases:
            base = [t[1] for t in times[(backend, work, "bare")]]
            ours = [t[1] for t in times[(backend, work, ours_name)]]
            line = f"{ours_name:<12} {backend:<8} {work:<10}"
            for name in ("bare", "pyleak"):
                against = [t[1] for t in times.get((backend, work, name), [])]
                if not against:
                    continue
                ratios = [o / b for b, o in zip(against, ours, strict=True)]
                low, high = median_interval(ratios)
                line += f" | vs {name} {statistics.median(ratios):.3f} ({low:.3f}-{high:.3f})"
            print(line)

if __name__ == "__main__":
    main()
