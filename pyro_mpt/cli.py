"""``pyro-mpt``: the command-line interface (``pyro-mpt demo``, ``pyro-mpt reproduce NAME``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from .experiments import EXPERIMENTS

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-mpt", description="Train and compare Bayesian models by masked pre-training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="PPCA on digits: exact LML vs cumulative vs 15%% MPT")
    demo.add_argument("--out", type=Path, default=Path("pyro-mpt-out"), help="output folder")
    demo.add_argument("--steps", type=int, default=1500)
    demo.add_argument("--lr", type=float, default=0.05, help="initial (cosine-annealed) rate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    reproduce = commands.add_parser("reproduce", help="reproduce one of the paper's experiments")
    reproduce.add_argument("name", choices=[*EXPERIMENTS, "all"])
    reproduce.add_argument("--out", type=Path, default=Path("pyro-mpt-out"))
    reproduce.add_argument("--full", action="store_true", help="the paper's full sizes (slow)")
    reproduce.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import format_table, run_demo

        results = run_demo(
            args.out,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            dtype=DTYPES[args.dtype],
            progress=not args.no_progress,
        )
        print(format_table(results))
        print(
            f"\nwrote {args.out / 'demo' / 'curves.png'} and {args.out / 'demo' / 'results.json'}"
        )
        return 0
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        module_name, description = EXPERIMENTS[name]
        print(f"== {name}: {description}", flush=True)
        module = importlib.import_module(module_name)
        module.run(args.out / name, full=args.full, seed=args.seed)
        print(f"wrote {args.out / name}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
