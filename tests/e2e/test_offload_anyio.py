"""The offload path against the oldest and the newest anyio pyproject.toml allows, with the loop started by
anyio.run, asyncio.run and trio.run: a tool that blocks, moves, then answers 20 calls that each log twice.

The oldest: anyio 4.9 (what mcp requires; pip pairs it with mcp 2.2, the oldest mcp loopwatch allows). The
newest: this run's own environment (the test extras install the newest anyio the range allows)."""

import subprocess
import sys

import pytest
from venvs import venv_fixture

from helpers import FIXTURES

pytestmark = pytest.mark.e2e
PROBE = FIXTURES / "offload_anyio_probe.py"
oldest_anyio = venv_fixture("anyio-oldest", ["anyio==4.9.0", "trio"])


def probe(python):
    done = subprocess.run([python, str(PROBE)], capture_output=True, text=True, timeout=300, cwd=str(FIXTURES))
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["anyio.run", "asyncio.run", "trio.run"], done.stderr[-3000:]
    for line in lines:
        assert line.split()[1] == "ok", line
    return done.stderr.strip().splitlines()[-1]


def test_offload_works_on_the_oldest_anyio_allowed(oldest_anyio):
    assert oldest_anyio.version("anyio") == "4.9.0"
    assert probe(oldest_anyio.python) == "anyio 4.9.0"


def test_offload_works_on_the_newest_anyio_allowed():
    assert probe(sys.executable).startswith("anyio 4.16")
