"""Shared output helpers for the experiments: ``results.json``, ``results.md`` and progress bars."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "write_results",
    "markdown_table",
    "environment",
    "Timer",
    "loglog_slope",
    "single_threaded",
]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch single-threaded inside the block (restoring the setting afterwards).

    The experiments' work is many small batched factorisations and elementwise kernels on
    tensors of ~10^5 elements, which intra-op threads slow down rather than speed up: on the
    2-core development machine one replicate of E1 (D = 50) took 0.07 s of CPU with one thread
    and 0.48 s with two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    """Versions and core count, recorded with every result so numbers can be traced.

    Example:
        >>> "torch" in environment()
        True
    """
    import pyro

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table from a header and rows of already-formatted cells.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out: Path, results: dict, timer: Timer, format_markdown: Callable[[dict], str]
) -> dict:
    """Stamp ``results`` with the wall time and environment, then write ``results.json`` and
    ``results.md`` (rendered by ``format_markdown``) into ``out`` (created if needed)."""
    results = {**results, "wall_time_s": timer.seconds, "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(format_markdown(results).rstrip() + "\n")
    return results


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (-0.5 for a 1/sqrt(x) decay).

    Example:
        >>> round(loglog_slope([1, 4, 16], [1.0, 0.5, 0.25]), 6)
        -0.5
    """
    logs = [(math.log(a), math.log(b)) for a, b in zip(x, y, strict=True) if a > 0 and b > 0]
    if len(logs) < 2:
        return float("nan")
    mx = sum(a for a, _ in logs) / len(logs)
    my = sum(b for _, b in logs) / len(logs)
    num = sum((a - mx) * (b - my) for a, b in logs)
    den = sum((a - mx) ** 2 for a, _ in logs)
    return num / den


class Timer:
    """Wall-clock seconds since construction (``Timer().seconds``)."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
