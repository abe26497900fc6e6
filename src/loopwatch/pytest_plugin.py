"""pytest plugin: fail an async test when the code it runs blocks the event loop.

Registered through the `pytest11` entry point; it does nothing unless asked to:

    @pytest.mark.anyio                        # or @pytest.mark.asyncio with pytest-asyncio
    @pytest.mark.no_blocking(threshold=0.05)
    async def test_search(): ...

    pytest --no-blocking                      # every async test of the session, 0.05 s
    pytest --no-blocking=0.2

The watch starts on the test's own loop around the test function (its fixtures are not watched),
and the failure names the tool, the kind of block and the frames, as the run-time report does.
Blocks that a `loopwatch.testing.collect_blocks` inside the test collected are the test's own
business and do not fail it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest

from .testing import DEFAULT_THRESHOLD, _format_blocks, _guarding, _warm_up

MARKER = "no_blocking"
FLAG = "--no-blocking"
_DEST = "loopwatch_no_blocking"

AsyncTest = Callable[..., Coroutine[Any, Any, Any]]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "event-loop blocking (loopwatch)")
    group.addoption(
        FLAG,
        dest=_DEST,
        nargs="?",
        const=str(DEFAULT_THRESHOLD),
        default=None,
        metavar="SECONDS",
        help=f"fail every async test that blocks the event loop for SECONDS or more "
        f"(default {DEFAULT_THRESHOLD}); a no_blocking marker's own threshold takes precedence",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str]) -> None:
    """`pytest --no-blocking tests/` is the flag and a path, not a threshold of `tests/`."""
    moved = []
    for index, arg in enumerate(args[:-1]):
        following = args[index + 1]
        if arg == FLAG and not following.startswith("-") and _seconds(following) is None:
            args[index] = f"{FLAG}={DEFAULT_THRESHOLD}"
            moved.append(following)
    known = early_config.known_args_namespace  # parsed already, from the arguments as they were
    value = getattr(known, _DEST, None)
    if value in moved:
        known.file_or_dir.append(value)
        setattr(known, _DEST, str(DEFAULT_THRESHOLD))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(threshold={DEFAULT_THRESHOLD}, gc=False): fail this async test when it blocks the event "
        "loop for threshold seconds or more; with gc=True, also when the garbage collector does (loopwatch)",
    )
    value = config.getoption(_DEST)
    if value is not None and _seconds(value) is None:
        raise pytest.UsageError(f"{FLAG} takes a positive number of seconds, like {FLAG}=0.1, not {value!r}")


def pytest_report_header(config: pytest.Config) -> str | None:
    value = config.getoption(_DEST)
    if value is None:
        return None
    return (
        f"loopwatch: async tests fail when they block the event loop for {float(value) * 1000:g} ms or more"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    threshold = _threshold(item)
    if threshold is None:
        return (yield)
    assert isinstance(item, pytest.Function)
    _warm_up()  # here, while no loop runs
    # pytest-asyncio and anyio both run whatever `item.obj` is at this point on the test's loop.
    original = item.obj
    marker = item.get_closest_marker(MARKER)
    item.obj = _watched(original, threshold, bool(marker is not None and marker.kwargs.get("gc", False)))
    try:
        return (yield)
    finally:
        item.obj = original


def _threshold(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker(MARKER)
    flag = item.config.getoption(_DEST)
    if marker is None and flag is None:
        return None
    if not _is_plain_async_test(item):
        if any(mark.name == MARKER for mark in getattr(item, "own_markers", ())):
            item.warn(
                pytest.PytestWarning(f"{MARKER} applies to async test functions; {item.name} is not one")
            )
        return None
    session = DEFAULT_THRESHOLD if flag is None else float(flag)
    if marker is None:
        return session
    value = marker.kwargs.get("threshold", marker.args[0] if marker.args else session)
    threshold = _seconds(value)
    if threshold is None:
        pytest.fail(f"{MARKER}: threshold must be a positive number of seconds, not {value!r}", pytrace=False)
    return threshold


def _is_plain_async_test(item: pytest.Item) -> bool:
    """An `async def` test we can wrap (Hypothesis drives its own inner test: left alone)."""
    obj = getattr(item, "obj", None)
    return (
        isinstance(item, pytest.Function)
        and inspect.iscoroutinefunction(obj)
        and not hasattr(obj, "hypothesis")
    )


def _watched(test: AsyncTest, threshold: float, gc: bool = False) -> AsyncTest:
    @functools.wraps(test)
    async def watched(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        async with _guarding(threshold, {"gc": gc}) as guard:
            result = await test(*args, **kwargs)
        offending = guard.offending()
        if offending:
            pytest.fail(_format_blocks(offending, threshold), pytrace=False)
        return result

    return watched


def _seconds(value: Any) -> float | None:
    """A positive, finite number of seconds from a marker argument or the flag's text; None if it is not."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
