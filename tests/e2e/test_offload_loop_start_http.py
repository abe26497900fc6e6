"""Under `uvicorn app:app` with `instrument()` (the usual streamable-HTTP deployment) moved calls answer."""

import os
import subprocess
import sys

import pytest
from test_offload_loop_start import AFTER_THE_MOVE

from e2e.test_http import wait_for_port

from helpers import FIXTURES, free_port, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Remote:
    """The handle of a server in another process, as far as `moved_and_answering` asks: settle, offloaded."""

    class monitor:
        @staticmethod
        async def settle():
            pass

    class offload:
        offloaded = ("parse",)  # checked below in the server's events instead


async def test_moved_calls_answer_under_uvicorn_with_instrument(tmp_path):
    from test_offload_loop_start import moved_and_answering

    port, events = free_port(), tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "loop_start_app:app", "--port", str(port), "--log-level", "warning"],
        cwd=str(FIXTURES), env={**os.environ, "LOOP_START_EVENTS": str(events)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        answers = await moved_and_answering(f"http://127.0.0.1:{port}/mcp", Remote)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert len(answers) == AFTER_THE_MOVE
    moves = [e for e in read_events(events) if e["event"] == "offloaded"]
    assert [e["tool"] for e in moves] == ["parse"]
