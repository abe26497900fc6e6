"""Load over streamable HTTP: the short run of benchmarks/bench_load.py, bare against wrapped.

The benchmark itself runs here (500 calls instead of 10,000), so the script the README's figures come
from is the one CI exercises. Nothing here asserts throughput or time: only what was answered, and that
loopwatch's tables and metric series stop growing once the configuration's bounds are reached.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_load.py"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


async def test_500_calls_from_50_clients_get_the_bare_servers_answers_and_leave_every_table_bounded(anyio_backend):
    bench = load_bench()
    report = await bench.run(calls=500, clients=50, rounds=1, mix="hostile", limit=240)
    [bare], [wrapped] = report.of("bare"), report.of("wrapped")

    assert len(wrapped.outcomes) == len(bare.outcomes) == 500
    assert report.errors_added == 0
    assert wrapped.raised == bare.raised == 0
    assert {o[1] for o in wrapped.outcomes.values()} == {False, True}  # the failures were answered, as bare

    half, end = wrapped.stats_half, wrapped.stats_end
    appeared = sorted(set(end["metric_names"]) - set(half["metric_names"]))
    for key in ("tool_rows", "method_rows", "known_tools", "metric_series"):
        assert end[key] == half[key], f"{key} grew with traffic: {half[key]} -> {end[key]}; new series: {appeared}"
    assert end["tool_rows"] == 3  # echo, fail, and _OTHER for the 50 names no server registered
    assert end["known_tools"] == 2
    assert end["recent_events"] <= 100
    assert end["durations_kept"] <= 1024 * (end["tool_rows"] + end["method_rows"])
    assert end["lags_kept"] <= 1024 + 4096
    assert end["snapshot_bytes"] < 256 * 1024
    assert end["calls"] == 50 * bench.WARMUP_CALLS + 500  # every call counted once
    assert end["in_flight"] == 0 and end["active"]

    assert end["threads"].count("loopwatch-watchdog") == 1
    assert len([t for t in end["threads"] if t.startswith("loopwatch-offload")]) <= 4  # the pool's bound
    assert wrapped.rss_growth_kb - bare.rss_growth_kb < 20 * 1024
    assert wrapped.returncode == bare.returncode == 0  # both stop cleanly when their stdin closes
