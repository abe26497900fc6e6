"""Per-tool and per-method call statistics: bounded, updated on the loop, read from any thread."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

OTHER = "_OTHER"
DURATIONS_KEPT = 1024


class CallStats:
    __slots__ = ("calls", "errors", "durations", "blocks", "blocked_s", "in_flight")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.in_flight = 0
        self.blocks = 0
        self.blocked_s = 0.0
        self.durations: deque[float] = deque(maxlen=DURATIONS_KEPT)

    def finish(self, duration: float, error: bool) -> None:
        self.in_flight -= 1
        self.calls += 1
        self.errors += error
        self.durations.append(duration)

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(tuple(self.durations))
        return {
            "calls": self.calls,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "p50_s": percentile(ordered, 0.50),
            "p99_s": percentile(ordered, 0.99),
            "blocks": self.blocks,
            "blocked_s": round(self.blocked_s, 6),
        }


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 6)


class ToolNames:
    """Which tool names get a row (and a metric label) of their own; any other name is `_OTHER`.

    A name is admitted when the server's registry has it, when a tools/list result lists it, or,
    for servers whose registry can't be read, when a call to it succeeds. At most `limit` names.
    """

    def __init__(self, limit: int, registry: Callable[[str], bool | None] | None = None) -> None:
        self.limit = limit
        self.registry = registry
        self.known: set[str] = set()

    def label(self, name: Any) -> str:
        if not isinstance(name, str):  # a client may send any JSON as the name: a list would not even hash
            return OTHER
        if name in self.known:
            return name
        if self.registry is not None and self.registry(name):
            return self.admit(name)
        return OTHER

    def admit(self, name: str) -> str:
        if name in self.known:
            return name
        if len(self.known) >= self.limit or not isinstance(name, str):
            return OTHER
        self.known.add(name)
        return name

    def admit_all(self, names: Iterable[Any]) -> None:
        for name in names:
            self.admit(name)

    @property
    def learns_from_success(self) -> bool:
        return self.registry is None


class StatsTable:
    """Rows keyed by tool label (tools/call) or by method (everything else)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.tools: dict[str, CallStats] = {}
        self.methods: dict[str, CallStats] = {}

    def tool(self, label: str) -> CallStats:
        row = self.tools.get(label)
        if row is None:
            row = self.tools[label] = CallStats()
        return row

    def method(self, method: str) -> CallStats:
        row = self.methods.get(method)
        if row is None:
            if len(self.methods) >= self.max_rows:
                method = OTHER
            row = self.methods.setdefault(method, CallStats())
        return row
