"""Timing helpers shared by the benchmark modules."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeat: int = 5, number: int = 1) -> float:
    """Best-of-``repeat`` wall time in seconds of ``number`` calls of ``fn`` (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def _alternate(
    ours: Callable[[], object], anchor: Callable[[], object], calls: int
) -> tuple[list[float], list[float]]:
    """Wall times of ``calls`` calls of each, alternating (after one warm-up each), so that load
    on a shared machine falls on both alike."""
    ours(), anchor()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(calls):
        for fn, record in zip((ours, anchor), times, strict=True):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return times


def best_time_pair(
    ours: Callable[[], object], anchor: Callable[[], object], repeat: int = 5
) -> tuple[float, float]:
    """Best-of-``repeat`` wall times of two functions timed alternately."""
    ours_times, anchor_times = _alternate(ours, anchor, repeat)
    return min(ours_times), min(anchor_times)


def mean_time_pair(
    ours: Callable[[], object], anchor: Callable[[], object], calls: int
) -> tuple[float, float]:
    """Mean wall times over ``calls`` alternating calls of each.

    For steps whose cost depends on what they draw: a GP's masked objective factorises blocks of
    the sizes its masks happen to have, so one call can cost three times another, and a best of
    a few calls would time the luckiest draw. The mean over the same seeded sequence of draws is
    the expected cost per step, and is reproducible."""
    ours_times, anchor_times = _alternate(ours, anchor, calls)
    return sum(ours_times) / calls, sum(anchor_times) / calls


def count_row(
    benchmark: str, case: str, ours: float, anchor: float, anchor_name: str, unit: str
) -> dict:
    """A result row of counts (e.g. forward passes), not times: ours, the anchor's, the ratio."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ours_value": round(ours, 4),
        "anchor": anchor_name,
        "anchor_value": round(anchor, 4),
        "unit": unit,
        "ratio": round(ours / anchor, 3),
    }


def row(benchmark: str, case: str, ours: float, anchor: float, anchor_name: str) -> dict:
    """One result row: our time, the anchor's, and their ratio (ours / anchor)."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ours_ms": round(ours * 1e3, 3),
        "anchor": anchor_name,
        "anchor_ms": round(anchor * 1e3, 3),
        "ratio": round(ours / anchor, 2),
    }
