"""A server nobody on the loopwatch team wrote (tests/fixtures/outsider), wrapped by `loopwatch run` over stdio."""

import os
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers import FIXTURES, read_events

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
OUTSIDER = FIXTURES / "outsider"
HONEST = [("ping", {}), ("get_item", {"sku": "SKU00007"}), ("wait_a_bit", {"ms": 20})]
BLOCKERS = {
    # tool: (arguments, kind, the line of the outsider's own library that holds the loop)
    "price": ({"sku": "SKU00042"}, "wait", "with urllib.request.urlopen"),
    "snapshot": ({}, "cpu", None),
    "hash_pw": ({"password": "hunter2"}, "cpu", "return hashlib.pbkdf2_hmac"),
    "reindex": ({"steps": 3}, "wait", "time.sleep(0.15)"),
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def line_of(text):
    lines = (OUTSIDER / "catalog_lib.py").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


async def test_each_blocker_is_found_with_its_kind_and_line_and_moved_and_no_honest_call_is_blamed(tmp_path):
    events = tmp_path / "events.jsonl"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "loopwatch", "run", str(OUTSIDER / "server.py"), "--events", str(events)],
        env={**os.environ, "CATALOG_DB": str(tmp_path / "catalog.db")},
    )
    progress = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with Client(params) as client:
        for _ in range(2):
            for tool, (args, _, _) in BLOCKERS.items():
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        name, honest_args = HONEST[i % len(HONEST)]
                        tg.start_soon(client.call_tool, name, honest_args)
                    await anyio.sleep(0.005)
                    kwargs = {"progress_callback": on_progress} if tool == "reindex" else {}
                    tg.start_soon(lambda t=tool, a=args, k=kwargs: client.call_tool(t, a, **k))
        await anyio.sleep(0.3)
    lines = read_events(events)
    blocks = [e for e in lines if e["event"] == "loop_blocked" and e["kind"] != "gc"]
    assert not [e for e in blocks if e["tool"] in {name for name, _ in HONEST}]
    for tool, (_, kind, text) in BLOCKERS.items():
        # (once moved, the loop can still wait for the GIL its thread holds: told apart as `offloaded`)
        found = [e for e in blocks if e["tool"] == tool and not e.get("offloaded")]
        assert found, f"{tool} was not found"
        first = found[0]
        assert first["kind"] == kind, (tool, first["kind"])
        files_lines = {(f["file"].rsplit("/", 1)[-1], f["line"]) for f in first["frames"]}
        culprit = (first["culprit"]["file"].rsplit("/", 1)[-1], first["culprit"]["line"])
        if text is not None:  # the line to fix: the innermost of the outsider's own code, in its library
            assert ("catalog_lib.py", line_of(text)) in files_lines, (tool, first["frames"][-3:])
            assert culprit == ("catalog_lib.py", line_of(text)), (tool, first["culprit"])
        else:  # its own code, whichever of its files; the tool's frame on the way
            assert first["culprit"]["file"].startswith(str(OUTSIDER)), (tool, first["culprit"])
            assert any(f["file"].endswith("server.py") and f["function"] == tool for f in first["frames"])
        # a call already running can't move (reindex blocks once per step): later calls must not block at all
        assert {e["request_id"] for e in found} == {first["request_id"]}, (f"{tool} blocked again after it moved", found)
    moved = {e["tool"] for e in lines if e["event"] == "offloaded"}
    assert moved == set(BLOCKERS)
    assert progress == [f"step {i}/3" for i in (1, 2, 3)] * 2
