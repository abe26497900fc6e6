"""Options shared by `instrument()`, `watch()` and the command line, validated in one place."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from ._events import EVENTS_BACKUPS, EVENTS_MAX_BYTES

OffloadMode = Literal["auto", "off"]
ToolPolicy = Literal["auto", "never", "always", "process"]
OffloadCpu = Literal["thread", "process"]


MAX_THRESHOLD = 3600.0


class OptionError(ValueError):
    """An option value loopwatch cannot use; the message says which and why."""


@dataclass(frozen=True)
class Options:
    threshold: float = 0.1
    """Seconds the loop may stall before it counts as blocked."""
    interval: float = 0.01
    """Seconds between sentinel beats; also the watchdog's sampling interval."""
    offload: OffloadMode = "auto"
    """auto: tools caught blocking the loop run their later calls off it."""
    events: str | None = None
    """Path of a JSON-lines file that receives every event (a relative path is resolved once, at start)."""
    events_max_bytes: int = EVENTS_MAX_BYTES
    """Size past which the events file is rotated to `events.1` ... (0: never rotated by loopwatch)."""
    events_backups: int = EVENTS_BACKUPS
    """Rotated events files kept (0: the file starts over when full)."""
    log_blocks: bool = True
    """Write one line per block to the `loopwatch` logger (stderr)."""
    include_arguments: bool = False
    """Put tool argument values in block events. Off by default: arguments may hold secrets."""
    max_tools: int = 1000
    """Distinct tool names tracked before further names count as `_OTHER`."""
    recent_events: int = 100
    tool_policies: dict[str, ToolPolicy] = field(default_factory=dict)
    strikes: int = 1
    """Blocks within `strike_window` seconds before a tool is moved off the loop."""
    strike_window: float = 600.0
    offload_state: str | None = None
    """Path of the file that remembers offloaded tools across restarts (relative: resolved once, at start)."""
    offload_workers: int = 4
    """Worker loops (threads) for offloaded tools."""
    offload_max_calls: int = 64
    """Offloaded calls in flight at once, over all worker loops; more wait their turn (no unbounded queue)."""
    offload_processes: int = 2
    """Worker processes for tools with policy `process` (one call each at a time; more calls wait)."""
    offload_cpu: OffloadCpu = "thread"
    """Where a tool whose blocks are `cpu` moves: a thread (it still takes the GIL) or a process."""
    offload_process_memory: int | None = None
    """Address-space limit of each worker process, in MiB (None: none). A call over it fails; the worker is replaced."""
    metrics: bool | None = None
    """Export Prometheus metrics. None: on when a port, path or registry is given."""
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_path: str | None = None
    """Serve /metrics on the server's own HTTP app (`loopwatch run` with an HTTP transport)."""
    metrics_registry: Any = None
    traces: bool = True
    """Enrich OpenTelemetry spans when opentelemetry is installed."""
    tracer_provider: Any = None
    monitor: bool = False
    monitor_host: str = "127.0.0.1"
    monitor_port: int = 20101
    monitor_console: bool = False
    monitor_allow_remote: bool = False
    monitor_webui: bool = False
    """aiomonitor's web UI on `monitor_port + 1` (it can cancel tasks; off unless asked for)."""
    announce: bool = True
    """Announce the server on a private Unix socket for `loopwatch top` (LOOPWATCH_NO_ANNOUNCE=1 turns it off)."""

    def __post_init__(self) -> None:
        _positive("threshold", self.threshold)
        _positive("interval", self.interval)
        _positive("strike_window", self.strike_window)
        if self.threshold < self.interval:
            raise OptionError(f"threshold must be at least the sentinel's interval ({self.interval} s), "
                              f"not {self.threshold!r}")
        if self.threshold > MAX_THRESHOLD:
            raise OptionError(f"threshold must be at most {MAX_THRESHOLD:.0f} s, not {self.threshold!r}")
        if self.offload not in ("auto", "off"):
            raise OptionError(f"offload must be 'auto' or 'off', not {self.offload!r}")
        for name in ("max_tools", "recent_events", "strikes", "offload_workers", "offload_max_calls",
                     "offload_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"{name} must be a positive integer, not {value!r}")
        for tool, policy in self.tool_policies.items():
            if policy not in ("auto", "never", "always", "process"):
                raise OptionError(f"policy for tool {tool!r} must be auto, never, always or process, not {policy!r}")
        if self.offload_cpu not in ("thread", "process"):
            raise OptionError(f"offload_cpu must be 'thread' or 'process', not {self.offload_cpu!r}")
        memory = self.offload_process_memory
        if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory < 64):
            raise OptionError(f"offload_process_memory must be a whole number of MiB, at least 64, not {memory!r}")
        for name in ("events_max_bytes", "events_backups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OptionError(f"{name} must be an integer of 0 or more, not {value!r}")
        for name in ("events", "offload_state"):
            _resolve_path(self, name)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise OptionError(f"metrics_port must be 0-65535, not {self.metrics_port!r}")

    @classmethod
    def build(cls, **options: Any) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(cls(), **options) if options else cls()


def _resolve_path(options: Options, name: str) -> None:
    """A relative path means the directory loopwatch started in, not wherever the server chdir()s to later."""
    value = getattr(options, name)
    if value is None or value == "":  # unset (an empty LOOPWATCH_EVENTS, say)
        object.__setattr__(options, name, None)
        return
    path = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(path, str):
        raise OptionError(f"{name} must be a file path, not {value!r}")
    object.__setattr__(options, name, os.path.abspath(path))


def check_state_folder(path: str) -> None:
    """An offload state file goes in a folder that exists (checked at start, and by the launcher before its exec)."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise OptionError(f"--offload-state {path}: the folder {folder} does not exist")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"{name} must be a positive number of seconds, not {value!r}")


# -- command-line options defined here (cli.py adds them to `loopwatch run`) -------------------------------

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def byte_size(text: str) -> int:
    """`50MB`, `64MiB`, `1000000`, `0` (no limit)."""
    import argparse

    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or 50MB, 64MiB)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"size must be 0 or more, not {text}")
    return int(value)


def _flag(text: str) -> bool:
    import argparse

    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value")


def count(text: str, least: int = 0) -> int:
    """An integer option's value, `least` or more (argparse's `type`)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
    return value


def positive_count(text: str) -> int:
    """A count of at least 1 (workers, strikes, report lines)."""
    return count(text, least=1)


CLI_OPTIONS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("monitor_webui", ("--monitor-webui",), {"type": _flag, "nargs": "?", "const": True, "default": False,
                                             "metavar": "yes|no", "help": "aiomonitor's web UI on port +1"}),
    ("events_max_bytes", ("--events-max-bytes",), {"type": byte_size, "default": EVENTS_MAX_BYTES, "metavar": "SIZE",
                                                   "help": "rotate the events file past this size; 0: never"}),
    ("events_backups", ("--events-backups",), {"type": count, "default": EVENTS_BACKUPS, "metavar": "N",
                                               "help": "rotated events files kept (events.1 ... events.N)"}),
]
"""name, flags, argparse keyword arguments, as cli.RUN_OPTIONS: each also read from LOOPWATCH_<NAME>."""
