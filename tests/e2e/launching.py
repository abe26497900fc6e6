"""Helpers for the `loopwatch run -- COMMAND` tests: the command bare or wrapped, its stderr kept in a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

LOOPWATCH = [sys.executable, "-m", "loopwatch"]
SH = shutil.which("sh") or "/bin/sh"


def wrapped(command: list[str], *options: str) -> list[str]:
    return [*LOOPWATCH, "run", *options, "--", *command]


def stdio(command: list[str], stderr: Path, env: dict[str, str] | None = None, cwd=None) -> StdioServerParameters:
    """COMMAND over stdio as a client starts it, its stderr appended to `stderr` (through an exec'ing shell)."""
    return StdioServerParameters(
        command=SH,
        args=["-c", 'exec "$@" 2>>"$LW_TEST_STDERR"', "sh", *command],
        env={**(env or os.environ), "LW_TEST_STDERR": str(stderr), "PYTHONUNBUFFERED": "1"},
        cwd=cwd,
    )


def dump(result) -> dict:
    return result.model_dump(mode="json", exclude_none=True)


async def session_answers(params: StdioServerParameters, mode: str, calls: list[tuple[str, dict]], during=None) -> dict:
    """What a real client gets from a server: its info, its tools and the answers to `calls`, in order.
    `during()` runs in a thread while the session is still open (a scrape of the server's metrics)."""
    async with Client(params, mode=mode) as client:
        tools = await client.list_tools()
        answers = [dump(await client.call_tool(name, args)) for name, args in calls]
        info = client.server_info
        seen = await anyio.to_thread.run_sync(during) if during is not None else None
    got = {"tools": dump(tools), "answers": answers, "info": dump(info) if info is not None else None}
    return got if during is None else {**got, "during": seen}


def run(command: list[str], env=None, stdin: bytes = b"", timeout: float = 60.0, cwd=None):
    return subprocess.run(command, input=stdin, capture_output=True, timeout=timeout, env=env, cwd=cwd)
