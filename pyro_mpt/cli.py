"""``pyro-mpt``: the command-line interface (``pyro-mpt demo``, ``pyro-mpt reproduce NAME``)."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch

from .experiments import EXPERIMENTS

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# numpy's global seed (set by pyro.set_rng_seed in the experiments) must lie in [0, 2**32), and runs
# derive a few further seeds from this one (seed + 1, ...): 2**31 leaves ample room.
MAX_SEED = 2**31 - 1


# Argument types. They raise argparse.ArgumentTypeError, which argparse turns into a usage error
# naming the option (exit status 2) instead of a traceback minutes into a run.
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {text!r}")
    return value


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an output folder (a file is in the way), or ``None``."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            where = "" if candidate == path else f" (inside {str(path)!r})"
            return f"{str(candidate)!r}{where} is a file, not a folder"
    return None


def _output_folder(text: str) -> Path:
    problem = _folder_problem(Path(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="pyro-mpt",
        description="Train and compare Bayesian models by masked pre-training.",
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = "PPCA on digits: exact LML vs cumulative vs 15%% MPT"
    demo = commands.add_parser(
        "demo", help=summary, description=summary.replace("%%", "%"), formatter_class=formatter
    )
    demo.add_argument("--out", type=_output_folder, default=Path("pyro-mpt-out"),
                      help="output folder; the demo writes OUT/demo/curves.png and results.json")
    demo.add_argument("--steps", type=_positive_int, default=1500,
                      help="optimiser steps per objective")
    demo.add_argument("--lr", type=_positive_float, default=0.05,
                      help="initial Adam learning rate, cosine-annealed to 1e-4")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="seed of the initial model and of the masks")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="floating-point precision of the training")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # The folders a command writes into, checked after parsing (--out itself is checked by its
    # type): a file OUT/demo would otherwise stop the run with a traceback when it saves.
    demo.set_defaults(subparser=demo, folders=lambda args: [args.out / "demo"])

    names = ", ".join(
        f"{name} ({description.split(':')[0]})" for name, (_, description) in EXPERIMENTS.items()
    )
    summary = "reproduce one of the paper's experiments"
    reproduce = commands.add_parser(
        "reproduce", help=summary, description=summary, formatter_class=formatter
    )
    reproduce.add_argument("name", choices=[*EXPERIMENTS, "all"],
                           help=f"the experiment: {names}; or all of them")
    reproduce.add_argument("--out", type=_output_folder, default=Path("pyro-mpt-out"),
                           help="output folder; each experiment writes into OUT/NAME")
    reproduce.add_argument("--full", action="store_true", help="the paper's full sizes (slow)")
    reproduce.add_argument("--seed", type=_seed, default=0,
                           help="first seed (data, initial models, masks)")
    reproduce.set_defaults(
        subparser=reproduce, folders=lambda args: [args.out / name for name in _names(args)]
    )
    return parser


def _names(args: argparse.Namespace) -> list[str]:
    return list(EXPERIMENTS) if args.name == "all" else [args.name]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for folder in args.folders(args):
        problem = _folder_problem(folder)
        if problem is not None:
            args.subparser.error(f"argument --out: {problem}")  # exits with status 2
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
    for name in _names(args):
        module_name, description = EXPERIMENTS[name]
        print(f"== {name}: {description}", flush=True)
        module = importlib.import_module(module_name)
        module.run(args.out / name, full=args.full, seed=args.seed)
        print(f"wrote {args.out / name}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
