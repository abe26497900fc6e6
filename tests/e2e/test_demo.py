"""`loopwatch demo`, as a newcomer runs it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_the_demo_finds_the_blockers_blames_no_honest_call_and_moves_the_io_blocker():
    result = subprocess.run(
        [sys.executable, "-m", "loopwatch", "demo", "--quick"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "loopwatch found: lookup" in out and "inventory.py:8 in fetch_record" in out
    assert "Honest calls blamed: 0." in out
    assert "loopwatch moved lookup off the loop" in out
    fingerprint = [line for line in out.splitlines() if "loopwatch found: fingerprint" in line]
    if fingerprint and "[cpu]" in fingerprint[0]:  # a loaded machine can make the crunch look otherwise
        assert "to a worker process (--offload-cpu process" in out, out
