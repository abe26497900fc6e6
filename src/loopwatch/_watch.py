"""`watch()`: the same sentinel and watchdog for any anyio or asyncio program that is not an MCP server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ._monitor import Monitor
from ._options import Options


@asynccontextmanager
async def watch(**options: Any) -> AsyncIterator[Monitor]:
    """Watch the running loop for the duration of the block.

        async with loopwatch.watch(threshold=0.05) as monitor:
            await main()
        print(monitor.snapshot()["recent_events"])
    """
    monitor = Monitor(Options.build(**options))
    async with monitor.running():
        yield monitor
