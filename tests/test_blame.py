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


def _serve_deep(record, depth):
    _lw_call = record  # noqa: F841 - read by blame through the frame
    return _recurse(depth)


def _recurse(depth):
    return _recurse(depth - 1) if depth else sample_frame(sys._getframe())


register_call_frame(_serve_deep.__code__)


def test_a_call_far_below_the_tool_is_still_found():
    record = CallRecord("tools/call", "deep", 4, ctx=None)
    sample = _serve_deep(record, 400)  # a blocker 400 frames below the call's frame
    assert sample.call is record
    assert sample.stack[-1][2] == "_recurse"


def test_a_deep_stack_keeps_the_tools_frame_and_the_leafs_side_and_says_how_many_were_left_out():
    from loopwatch._blame import MAX_DEPTH, OMITTED, bound_stack

    runner = [(f"{SITE}/mcp/server/runner.py", n, "_on_request") for n in range(40)]
    tool = [("/srv/app/server.py", 15, "lookup")]
    deep = [("/srv/app/walk.py", n, "walk") for n in range(500)]
    kept = bound_stack(runner + tool + deep)
    assert len(kept) <= MAX_DEPTH
    assert tool[0] in kept and kept[-1] == deep[-1] and kept[0] == runner[0]
    omitted = [frame for frame in kept if frame[0] == OMITTED]
    assert sum(count for _, count, _ in omitted) == len(runner + tool + deep) - (len(kept) - len(omitted))


def test_loopwatchs_own_frames_are_never_the_leaf():
    import loopwatch._gc as own
    from loopwatch._blame import drop_own_leaf

    app = ("/srv/app/server.py", 10, "convert")
    assert drop_own_leaf([app, (own.__file__, 40, "_callback")]) == [app]
    demo = ("/x/site-packages/loopwatch/demo/server.py", 5, "lookup")
    assert drop_own_leaf([app, demo]) == [app, demo]  # the demo is application code


def test_an_installed_servers_own_code_is_its_package_and_a_venv_inside_an_app_is_not_the_apps():
    from loopwatch._blame import home_of, is_own, short_path

    home = home_of(f"{SITE}/fetchsrv/server.py")
    assert home == f"{SITE}/fetchsrv/"
    assert is_own(f"{SITE}/fetchsrv/parse/html.py", home)
    assert not is_own(f"{SITE}/readabilipy/simple_json.py", home)
    assert not is_own("/srv/app/.venv/lib/python3.11/site-packages/requests/api.py", home_of("/srv/app/server.py"))
    assert short_path(f"{SITE}/regex/_main.py") == "regex/_main.py"
    assert short_path(sys.modules["json"].__file__) == "json/__init__.py"
    assert short_path("/srv/app/server.py") == "server.py"


def test_the_culprit_given_the_tools_home_is_the_innermost_own_frame_not_a_librarys():
    stack = [
        Frame(f"{SITE}/mcp/server/runner.py", 210, "_on_request"),
        Frame(f"{SITE}/fetchsrv/server.py", 494, "fetch"),
        Frame(f"{SITE}/fetchsrv/server.py", 368, "extract_content_from_html"),
        Frame(f"{SITE}/markdownify/__init__.py", 100, "convert"),
        Frame(f"{SITE}/regex/_main.py", 288, "sub"),
    ]
    assert culprit_frame(stack) == stack[2]  # from the tool's frame in the stack
    assert culprit_frame(stack, f"{SITE}/fetchsrv/") == stack[2]


def _raw(frame):
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


def _loop_runner(inner):
    """Stands for asyncio's runner on uvloop: the frame that called into the loop, whose dispatch is C."""
    frame = sys._getframe()
    return inner(frame) if inner else sample_frame(frame, _raw(frame))


def test_a_sample_whose_leaf_is_the_loops_base_is_the_loops_own_and_keeps_only_that_frame():
    sample = _loop_runner(None)
    assert sample.loop_only and sample.call is None
    assert [f[2] for f in sample.stack] == ["_loop_runner"]  # not the test runner's frames outward of it


def test_a_callback_the_loop_runs_is_not_the_loops_own_and_the_frames_outward_of_the_base_are_dropped():
    def callback(base_frame):
        return sample_frame(sys._getframe(), _raw(base_frame))

    sample = _loop_runner(callback)
    assert not sample.loop_only
    assert [f[2] for f in sample.stack] == ["callback"]


def test_the_loops_base_is_the_first_frame_outward_of_the_tasks_coroutines():
    from loopwatch._blame import loop_base

    async def inner():
        return loop_base()

    async def task():
        return await inner()

    def drive():  # a loop's dispatch: it steps the task's coroutine
        coro = task()
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("the coroutine did not finish")

    base = drive()
    assert base[0] == __file__ and base[2] == "drive"
    assert loop_base() is None  # not in a task
