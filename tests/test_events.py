import json
import logging
import os

import pytest

from loopwatch._events import BlockEvent, Frame, JsonLinesWriter, Listeners, OffloadEvent

FRAMES = (Frame("/srv/server.py", 15, "lookup"), Frame("/srv/legacy.py", 8, "fetch_record"))


def block(**overrides):
    fields = dict(
        time=1700000000.5, duration_s=0.312, kind="wait", tool="lookup", method="tools/call",
        request_id="7", session_id=None, cpu_s=0.01, samples=20, frames=FRAMES, culprit=FRAMES[0],
    )
    fields.update(overrides)
    return BlockEvent(**fields)


def test_the_log_line_names_duration_kind_call_and_lines():
    assert block().describe() == (
        "loop blocked 312 ms [wait] by tools/call lookup (request 7) at legacy.py:8 in fetch_record"
        " <- server.py:15 in lookup"
    )


def test_a_block_outside_any_call_says_so():
    line = block(tool=None, method=None, request_id=None).describe()
    assert "outside any call" in line


def test_a_collection_that_held_most_of_a_block_is_told_as_the_heaps_cost_during_the_call():
    line = block(kind="gc", gc_s=0.290, frames=(), culprit=None).describe()
    assert line == (
        "loop blocked 312 ms [gc] during tools/call lookup (request 7): the garbage collector ran 290 ms of it"
        " (the heap's cost, not the caller's)"
    )


def test_a_collection_inside_another_block_is_added_to_its_line_when_it_is_a_tenth_or_more():
    assert block(gc_s=0.040).describe().endswith("server.py:15 in lookup (garbage collection 40 ms)")
    assert "garbage" not in block(gc_s=0.020).describe()


def test_the_json_form_has_the_documented_fields_outermost_frame_first():
    data = block().to_dict()
    assert data["event"] == "loop_blocked"
    expected = {"event", "time", "duration_s", "kind", "tool", "method", "request_id", "session_id",
                "cpu_s", "gc_s", "samples", "frames", "culprit"}
    assert set(data) == expected
    assert data["frames"][0] == {"file": "/srv/server.py", "line": 15, "function": "lookup"}
    json.dumps(data)


def test_arguments_appear_only_when_collected():
    assert "arguments" not in block().to_dict()
    assert block(arguments={"q": 1}).to_dict()["arguments"] == {"q": 1}


def test_json_lines_are_appended_one_object_per_line(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(str(path))
    writer(block())
    writer(OffloadEvent(time=1.0, tool="lookup", action="offloaded", reason="blocked", blocks=1))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["loop_blocked", "offloaded"]


def test_a_file_that_cannot_be_opened_fails_at_start_with_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        JsonLinesWriter(str(tmp_path / "missing-dir" / "events.jsonl"))


@pytest.mark.skipif(os.geteuid() == 0 and not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_write_that_fails_later_is_logged_once_and_never_raised(caplog):
    writer = JsonLinesWriter("/dev/full")  # every write fails: disk full
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        writer(block())
        writer(block())
    assert len([r for r in caplog.records if "cannot write events" in r.message]) == 1


def test_a_listener_that_raises_is_logged_and_dropped_and_the_others_still_run(caplog):
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    listeners = Listeners()
    listeners.add(broken)
    listeners.add(seen.append)
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        listeners.emit(block())
        listeners.emit(block())
    assert len(seen) == 2
    assert sum("listener" in r.message for r in caplog.records) == 1


def test_with_a_library_leaf_the_line_names_the_applications_own_innermost_line():
    import socket

    from loopwatch._blame import culprit_frame

    frames = (
        Frame("/srv/server.py", 35, "price"),
        Frame("/srv/catalog_lib.py", 78, "fetch_price"),
        Frame(socket.__file__, 706, "readinto"),
    )
    line = block(frames=frames, culprit=culprit_frame(frames)).describe()
    assert line.endswith("at socket.py:706 in readinto <- catalog_lib.py:78 in fetch_price")


def test_repeated_blocks_of_one_kind_for_one_tool_are_one_line_then_one_line_with_a_count(caplog):
    import logging

    from loopwatch._events import BlockLog

    now = [0.0]
    log = BlockLog(window=10.0, clock=lambda: now[0])
    gc_block = BlockEvent(time=0.0, duration_s=0.2, kind="gc", tool="convert", method="tools/call", request_id="3",
                          session_id=None, cpu_s=0.0, samples=0, gc_s=0.2, offloaded=True)
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        for _ in range(14):
            log(gc_block)
            now[0] += 0.2
        log(block())  # another tool (and kind): its own line
        now[0] += 10.0
        log.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("loop blocked 200 ms [gc]: the garbage collector ran 200 ms of it, in the thread of")
    assert lines[2] == "loop blocked 13 more times [gc] by tools/call convert (offloaded) in the 10 s after it (2600 ms in all)"
