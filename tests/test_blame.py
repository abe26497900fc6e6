import sys

from loopwatch._blame import CallRecord, Sample, culprit_frame, register_call_frame, sample_frame, summarize
from loopwatch._events import Frame

SITE = "/venv/lib/python3.11/site-packages"


def _serve_one(record):
    _lw_call = record  # noqa: F841 - read by blame through the frame
    return _inner()


def _inner():
    return sample_frame(sys._getframe())


register_call_frame(_serve_one.__code__)


def test_a_sample_finds_the_call_held_by_a_registered_frame_outward_of_the_leaf():
    record = CallRecord("tools/call", "lookup", 3, ctx=None)
    sample = _serve_one(record)
    assert sample.call is record
    assert sample.stack[-1][2] == "_inner"
    assert sample.stack[-2][2] == "_serve_one"


def test_a_sample_outside_any_call_has_no_call():
    assert sample_frame(sys._getframe()).call is None


def test_no_frame_is_no_sample():
    assert sample_frame(None) is None


def test_the_culprit_is_the_innermost_frame_of_the_applications_own_code():
    stack = [
        Frame(f"{SITE}/mcp/server/runner.py", 210, "_inner"),
        Frame("/srv/app/server.py", 15, "lookup"),
        Frame("/srv/app/legacy.py", 8, "fetch_record"),
    ]
    assert culprit_frame(stack) == Frame("/srv/app/legacy.py", 8, "fetch_record")


def test_the_culprit_skips_stdlib_frames_at_the_leaf():
    socket_py = sys.modules["socket"].__file__
    stack = [
        Frame(f"{SITE}/mcp/server/runner.py", 210, "_inner"),
        Frame("/srv/app/server.py", 15, "lookup"),
        Frame(socket_py, 700, "readinto"),
    ]
    assert culprit_frame(stack) == Frame("/srv/app/server.py", 15, "lookup")


def test_inside_an_import_the_culprit_is_the_import_statement():
    stack = [
        Frame("/srv/app/server.py", 20, "report"),
        Frame("<frozen importlib._bootstrap>", 1176, "_find_and_load"),
        Frame("/srv/app/heavy.py", 2, "<module>"),
    ]
    assert culprit_frame(stack) == Frame("/srv/app/server.py", 20, "report")


def test_the_hottest_stack_wins_and_a_call_needs_a_majority_of_samples():
    a = CallRecord("tools/call", "a", 1, ctx=object())
    b = CallRecord("tools/call", "b", 2, ctx=object())
    hot = (("/x.py", 1, "f"),)
    cold = (("/x.py", 2, "g"),)
    profile = summarize([Sample(hot, a), Sample(hot, a), Sample(cold, b)])
    assert profile.call is a
    assert [f.line for f in profile.stack] == [1]
    assert summarize([Sample(hot, a), Sample(cold, b)]).call is None


def test_records_of_one_request_read_from_different_frames_count_as_one_call():
    ctx = object()
    samples = [Sample((("/x.py", 1, "f"),), CallRecord("tools/call", "a", 1, ctx)) for _ in range(3)]
    assert summarize(samples).call is not None


def test_arguments_are_read_only_from_the_request_params():
    class Ctx:
        params = {"name": "lookup", "arguments": {"token": "secret"}}
        request = None

    record = CallRecord("tools/call", "lookup", 1, Ctx())
    assert record.arguments() == {"token": "secret"}
    assert record.transport() == "pipe"
    assert record.session_id() is None
