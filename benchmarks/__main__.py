"""``python -m benchmarks [name ...]``: run every ``benchmarks/bench_*.py`` (or the named ones).

Each module defines ``run() -> list[dict]`` (rows from :func:`benchmarks.timing.row`). The table is
printed and written to ``benchmarks/results/<module>.json`` and ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import importlib
import json
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
        "| benchmark | case | threads | ours | anchor | anchor's | ratio |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['benchmark']} | {r['case']} | {r['threads']} | {_value(r, 'ours')} | {r['anchor']} "
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
    sections = []
    for name in selected:
        module = importlib.import_module(f"benchmarks.{name}")
        rows = []
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            rows += [{**r, "threads": threads} for r in module.run()]
        torch.set_num_threads(default_threads)
        table = format_table(rows)
        print(f"\n## {name}\n{table}", flush=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        sections.append(f"## {name}\n\n{table}\n")
    machine = (
        f"{platform.processor() or platform.machine()}, default intra-op threads: "
        f"{default_threads}, torch {torch.__version__}"
    )
    if not names:
        (RESULTS / "README.md").write_text(
            "# Benchmark results\n\nRatio = our time / the anchor's time on the same work, one run "
            f"of `make bench` ({machine}).\n\n" + "\n".join(sections)
        )


if __name__ == "__main__":
    main(sys.argv[1:])
