"""Shared by the tests: load fixture servers fresh, and wait for the watchdog without racing it."""

import importlib
import sys
import threading
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def fresh(module: str, attr: str):
    """A new instance of a fixture server (its module re-imported), so instrumenting it leaks nowhere."""
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    sys.modules.pop(module, None)
    sys.modules.pop("heavy_report_lib", None)
    return getattr(importlib.import_module(module), attr)


def client_for(server):
    if type(server).__module__.startswith("fastmcp"):
        import fastmcp

        return fastmcp.Client(server)
    from mcp import Client

    return Client(server)


async def settle(monitor, beats: int = 5, timeout: float = 10.0) -> None:
    """Let blocks that already ended be reported (bounded; see Monitor.settle)."""
    await monitor.settle(beats=beats, timeout=timeout)


async def threads_left(before: set, timeout: float = 10.0) -> list:
    """Threads started since `before` that are still alive once given `timeout` to end (bounded).

    The idle threads of anyio's and trio's shared pools are not counted (the SDK runs sync tools there,
    the test runner uses them): they belong to those libraries and end by themselves after ten idle seconds.
    """
    import anyio

    def left() -> list:
        pools = ("AnyIO worker thread", "Trio thread")
        return [t for t in threading.enumerate() if t not in before and not t.name.startswith(pools)]

    with anyio.move_on_after(timeout):
        while left():
            await anyio.sleep(0.02)
    return left()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(span: int = 1) -> int:
    """A free port on 127.0.0.1, with the next `span - 1` ports free too (a console takes three).

    Drawn below the kernel's ephemeral range: a port the kernel handed out by `bind(0)` and released goes
    back into the pool that outgoing connections take their local ports from, and CI once lost a console's
    port to one between the probe and the listen. Ports below that range are taken only when asked for.
    """
    import random
    import socket

    low, _ = _ephemeral_range()
    floor = 10000 if low > 12000 else 1024
    for _ in range(200):
        if low - span > floor:
            port = random.randrange(floor, low - span)
        else:  # no room below the ephemeral range on this machine: take the kernel's choice
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port + span > 65535:
                continue
        try:
            for offset in range(span):
                with socket.socket() as taken:
                    taken.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free ports")


def read_events(path) -> list[dict]:
    """The events of a JSON-lines file another process may be writing: complete lines only (a reader can
    see the first part of a line being written; a CI run failed on one)."""
    import json

    if not Path(path).exists():
        return []
    *complete, _partial = Path(path).read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in complete if line]


def has_stall_timer() -> bool:
    """Whether watches here get a stall timer (Linux timerfd, `LOOPWATCH_NO_TIMER` unset)."""
    from loopwatch._timer import stall_timer

    probe = stall_timer(1.0)
    if probe is None:
        return False
    probe.close()
    return True
