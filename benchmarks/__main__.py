"""``python -m benchmarks [name ...]``: run every ``benchmarks/bench_*.py`` (or the named ones).

Each module defines ``run() -> list[dict]`` (rows from :func:`benchmarks.timing.row`), run at one
intra-op thread and at torch's default. Its table is printed and written to
``benchmarks/results/<module>.json``; ``benchmarks/results/README.md`` is rebuilt from every
module's latest JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _value(r: dict, side: str) -> str:
    """A row's value with its unit: a time (``ours_ms``) or a count (``ours_value``, ``unit``)."""
    if "unit" in r:
        return f"{r[side + '_value']} {r['unit']}"
    return f"{r[side + '_ms']} ms"


def format_table(rows: list[dict]) -> str:
    header = (
        "| benchmark | case | threads | load | ours | anchor | anchor's | ratio |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['benchmark']} | {r['case']} | {r['threads']} | {r.get('load', '')} "
        f"| {_value(r, 'ours')} | {r['anchor']} "
        f"| {_value(r, 'anchor')} | {r['ratio']} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def main(names: list[str]) -> None:
    # Every module at one intra-op thread and at torch's default (what users have): on a busy
    # machine the default makes small batched kernels spin, which is what pyro_mpt.threads is for.
    default_threads = torch.get_num_threads()
    available = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    selected = [n if n.startswith("bench_") else f"bench_{n}" for n in names] or available
    RESULTS.mkdir(exist_ok=True)
    for name in selected:
        module = importlib.import_module(f"benchmarks.{name}")
        rows = []
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            rows += [{**r, "threads": threads, "load": round(load, 2)} for r in module.run()]
        torch.set_num_threads(default_threads)
        print(f"\n## {name}\n{format_table(rows)}", flush=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    # The page shows every module's latest run, so `python -m benchmarks gp` refreshes one section.
    sections = [
        f"## {path.stem}\n\n{format_table(json.loads(path.read_text()))}\n"
        for path in sorted(RESULTS.glob("bench_*.json"))
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, default intra-op "
        f"threads: {default_threads}, torch {torch.__version__}"
    )
    (RESULTS / "README.md").write_text(
        "# Benchmark results\n\nRatio = our time / the anchor's time on the same work, timed in "
        f"the same run ({machine}); `load` is the 1-minute load average when the module's "
        "rows at that thread count started (other jobs on a shared machine).\n\n"
        + "\n".join(sections)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
