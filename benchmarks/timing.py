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
