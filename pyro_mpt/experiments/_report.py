"""Shared output helpers for the experiments: ``results.json``, ``results.md`` and progress bars."""

from __future__ import annotations

import contextlib
import json
import math
import os
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
    "timing_line",
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
    """Versions, threads and cores, recorded with every result so numbers can be traced.

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
        "cores": os.cpu_count(),
    }


def load_average() -> list[float] | None:
    """The system's 1-, 5- and 15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # Windows; or not obtainable
        return None


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
    """Stamp ``results`` with the timing and environment, then write ``results.json`` and
    ``results.md`` (rendered by ``format_markdown``) into ``out`` (created if needed).

    The timing is the wall time, the CPU time of this process, the torch threads and the load
    average when the run started and ended (``timing``, see :func:`timing_line`)."""
    timing = timer.summary()
    results = {
        **results,
        "wall_time_s": timing["wall_time_s"],
        "cpu_time_s": timing["cpu_time_s"],
        "timing": timing,
        "environment": environment(),
    }
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
    """Wall-clock and CPU seconds since construction, and the load the run started under.

    Wall time on a shared machine says as much about the other jobs as about the run, so a
    timer also keeps this process's CPU time (``time.process_time``, every thread), the torch
    thread count and the system load average at the start (:func:`load_average`).

    Example:
        >>> timer = Timer()
        >>> timer.seconds >= 0 and timer.cpu_seconds >= 0
        True
        >>> sorted(timer.summary())
        ['cores', 'cpu_time_s', 'load_average_end', 'load_average_start', 'threads', 'wall_time_s']
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.threads = torch.get_num_threads()
        self.load_average_start = load_average()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start

    def summary(self) -> dict[str, Any]:
        """Wall and CPU seconds so far, threads, cores, and load averages at start and now."""
        return {
            "wall_time_s": self.seconds,
            "cpu_time_s": self.cpu_seconds,
            "threads": self.threads,
            "cores": os.cpu_count(),
            "load_average_start": self.load_average_start,
            "load_average_end": load_average(),
        }


def timing_line(results: dict) -> str:
    """The sentence a results page ends with: wall and CPU time, threads, cores and load.

    A 1-minute load average at the start at or above the cores the run's threads leave free
    means other work was competing for the cores, and the line says so: the wall time is then
    not a quiet-machine figure, and the CPU time is the better guide to the run's cost.

    Example:
        >>> timing = {"wall_time_s": 277.0, "cpu_time_s": 30.2, "threads": 1, "cores": 2,
        ...           "load_average_start": [5.3, 4.1, 3.0], "load_average_end": [5.0, 4.4, 3.2]}
        >>> print(timing_line({"timing": timing, "environment": {"torch": "2.13.0"}}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Wall time 277 s, CPU time 30 s (torch 2.13.0, 1 thread(s) on 2 cores; load average 5.30
        at the start). The machine was busy when the run started (other work on the cores it
        did not use): the wall time is not a quiet-machine figure; the CPU time is the better
        guide.
    """
    timing = results["timing"]
    line = (
        f"Wall time {timing['wall_time_s']:.0f} s, CPU time {timing['cpu_time_s']:.0f} s "
        f"(torch {results['environment']['torch']}, {timing['threads']} thread(s) on "
        f"{timing['cores']} cores"
    )
    load = timing["load_average_start"]
    if load is None:
        return line + "; load average not available)."
    line += f"; load average {load[0]:.2f} at the start)."
    spare = (timing["cores"] or 1) - timing["threads"]
    if load[0] >= max(spare, 0.5):
        line += (
            " The machine was busy when the run started (other work on the cores it did not "
            "use): the wall time is not a quiet-machine figure; the CPU time is the better guide."
        )
    return line
