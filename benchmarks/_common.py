"""What the benchmark scripts share: the per-round ratio line with its interval, and p99. Standard library only:
the mcp 1.x scripts run in another environment's Python (`python benchmarks/NAME.py` puts this folder on
sys.path)."""

from __future__ import annotations

import random
import statistics


def report(label: str, base: list[float], other: list[float], added: bool = False) -> None:
    """One line: the median of the per-round ratios other/base, its 95% interval, quartiles and medians; with
    `added` (times that are not per call, a start), also the median of what other adds to base, per round."""
    ratios = [o / b for b, o in zip(base, other, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    low, high = median_interval(ratios)
    extra = ""
    if added:
        extra = f"; adds {statistics.median([o - b for b, o in zip(base, other, strict=True)]) * 1e6:+.0f} us"
    print(
        f"{label:<40} {'ratio' if added else 'per-call ratio'} median {statistics.median(ratios):.3f}"
        f"  (95% CI {low:.3f}-{high:.3f}; quartiles {q[0]:.3f}-{q[2]:.3f})  {statistics.median(base) * 1e6:.0f} us"
        f" -> {statistics.median(other) * 1e6:.0f} us{extra}"
    )


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median: how sure the median is, given how the rounds scattered."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
