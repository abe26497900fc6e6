"""What the adapters share: the mcp 2.x middleware-list seam, and swapping a registered tool's callable."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from . import Divert


class Adapter:
    """Defaults for a family whose tools the framework doesn't list (a low-level server: one handler)."""

    family = ""
    kind = "lowlevel"
    supported = True
    problem = ""

    def __init__(self, server: Any, lowlevel: Any) -> None:
        self.server = server
        self.lowlevel = lowlevel

    def registered(self) -> Callable[[str], bool] | None:
        return None

    def where(self, name: str) -> str:
        return "loop"

    def find_tool(self, name: str) -> Any:
        return None

    def tool_fn(self, name: str) -> Any:
        return getattr(self.find_tool(name), "fn", None)

    def can_move(self, name: str) -> bool:
        return self.find_tool(name) is not None

    def swap_tool(self, name: str, divert: Divert) -> Callable[[], None] | None:
        tool = self.find_tool(name)
        return None if tool is None else swap_fn(tool, divert)

    def restore_tools(self) -> None:
        """Undo what swapping needed beyond each tool's own undo (a wrapped handler)."""

    def __repr__(self) -> str:
        return f"<{self.family} adapter for {type(self.server).__qualname__}>"


class MiddlewareList:
    """mcp 2.x: `Server.middleware`, run by the SDK around every request before validation and lookup."""

    lowlevel: Any

    def chain(self) -> list[Any]:
        return self.lowlevel.middleware

    def install(self, middleware: Any) -> None:
        chain = self.chain()
        chain.insert(_position(chain), middleware)

    def remove(self, middleware: Any) -> None:
        chain = self.chain()
        if middleware in chain:
            chain.remove(middleware)


def _position(chain: list[Any]) -> int:
    """Inside the SDK's OpenTelemetry middleware (so its span is current), outside everything else."""
    for index, middleware in enumerate(chain):
        if type(middleware).__name__ == "OpenTelemetryMiddleware":
            return index + 1
    return 0


def swap_fn(tool: Any, divert: Divert) -> Callable[[], None]:
    """Put `divert(tool.fn)` (a coroutine function) in the tool's place; an `is_async` flag follows it."""
    original = tool.fn
    was_async = getattr(tool, "is_async", None)
    tool.fn = divert(original)
    if was_async is False:
        tool.is_async = True

    def undo() -> None:
        tool.fn = original
        if was_async is not None:
            tool.is_async = was_async

    return undo


def made_by(server: Any, package: str) -> bool:
    """Whether `server` is an instance of a class from `package` (or of a user's subclass of one)."""
    return any(c.__module__ == package or c.__module__.startswith(package + ".") for c in type(server).__mro__)


def is_sync(fn: Any) -> bool:
    return fn is not None and not inspect.iscoroutinefunction(fn)
