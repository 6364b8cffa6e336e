"""``pyro-mpt``: the command-line interface (``demo``, ``reproduce NAME``, ``score MODEL TEXTS``).

``pyro-mpt score`` also runs data-parallel: ``accelerate launch --num_processes N -m pyro_mpt.cli
score ...`` on N GPUs; on CPUs ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun
--nproc_per_node N`` (``accelerate launch --cpu`` starts a single process without MPI).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch

from . import __version__
from .experiments import EXPERIMENTS

__all__ = ["main"]

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


def _checkpoint(text: str) -> Path:
    path = Path(text)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a local checkpoint directory (a folder with config.json, as "
            "save_pretrained writes it)"
        )
    return path


def _input_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return Path(text)


def _output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    problem = _folder_problem(path.parent)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return path


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}"
        ) from None
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_SCHEMES = ("stratified", "cumulative", "diffusion-time")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where there is none to show: a required
    option, or a ``None`` default whose meaning the help already states ("default: ...")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or (action.default is None and "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class _ListFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """As :class:`_Formatter`, and the epilog keeps its lines (one per experiment)."""


def _experiment_list() -> str:
    width = max(map(len, EXPERIMENTS))
    lines = [f"  {name:<{width}}  {description}" for name, (_, description) in EXPERIMENTS.items()]
    lines.append(f"  {'all':<{width}}  every experiment above, in this order")
    return "experiments:\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    formatter = _Formatter
    parser = argparse.ArgumentParser(
        prog="pyro-mpt",
        description="Train and compare Bayesian models by masked pre-training.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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

    summary = "reproduce one of the paper's experiments (E1-E6), or all"
    reproduce = commands.add_parser(
        "reproduce",
        help=summary,
        description=f"{summary}.\nEach writes its figures, results.json and results.md into "
        "OUT/NAME.",
        epilog=_experiment_list(),
        formatter_class=_ListFormatter,
    )
    reproduce.add_argument("name", choices=[*EXPERIMENTS, "all"],
                           help="the experiment to run (NAME), one of those listed below")
    reproduce.add_argument("--out", type=_output_folder, default=Path("pyro-mpt-out"),
                           help="output folder; each experiment writes into OUT/NAME")
    reproduce.add_argument("--full", action="store_true", help="the paper's full sizes (slow)")
    reproduce.add_argument("--seed", type=_seed, default=0,
                           help="first seed (data, initial models, masks)")
    reproduce.set_defaults(
        subparser=reproduce, folders=lambda args: [args.out / name for name in _names(args)]
    )
    _add_score(commands, formatter)
    return parser


def _add_score(commands, formatter) -> None:
    summary = "score a masked or diffusion LM on a text file: PLL, log p(x) ± s.e., curve"
    description = (
        f"{summary}. Writes one JSON line per text (index, tokens, pll, log_prob, stderr, dof, "
        "masks, forward_rows; prompt_tokens, target_met, curve where they apply), appending to "
        "OUT and skipping the texts already in it. Data-parallel under `accelerate launch "
        "--num_processes N -m pyro_mpt.cli score ...` (on CPUs: `accelerate launch --multi_gpu "
        "--num_processes N`, or torchrun): the file is the same for any N."
    )
    score = commands.add_parser("score", help=summary, description=description,
                                formatter_class=formatter)  # fmt: skip
    score.add_argument("model", type=_checkpoint,
                       help="local checkpoint directory (model and tokenizer)")
    score.add_argument("texts", type=_input_file,
                       help="one text per line, or JSONL with 'text' or 'prompt'+'continuation'")
    score.add_argument("--out", type=_output_file, required=True,
                       help="JSONL output file (appended to, resumed)")
    score.add_argument("--format", choices=["auto", "lines", "jsonl"], default="auto",
                       help="input format; auto: JSONL for *.jsonl and *.json")
    score.add_argument("--mask-token-id", type=_non_negative_int, default=None,
                       help="the model's mask id (default: the tokenizer's mask token)")
    score.add_argument("--trust-remote-code", action="store_true",
                       help="run the model code shipped in the checkpoint (diffusion LMs)")
    score.add_argument("--shift-logits", action="store_true",
                       help="logits at position i predict token i+1 (Dream): shift them back")
    score.add_argument("--dtype", choices=sorted(MODEL_DTYPES), default="float32",
                       help="dtype the model is loaded in")
    score.add_argument("--device", type=_device, default=None,
                       help="device of the model (default: this process's accelerate device, "
                            "else cuda if there is one, else cpu)")  # fmt: skip
    score.add_argument("--masks", choices=MASK_SCHEMES, default="stratified",
                       help="mask scheme: stratified over size bins, cumulative (uniform size, "
                            "LLaDA's), diffusion-time (t ~ U(0,1), MDLM's)")  # fmt: skip
    score.add_argument("--max-strata", type=_positive_int, default=32,
                       help="most strata of mask sizes (stratified)")
    score.add_argument("--num-masks", type=_positive_int, default=2,
                       help="replicates of the scheme per text (a stratified replicate is one "
                            "mask per stratum)")  # fmt: skip
    score.add_argument("--target-stderr", type=_positive_float, default=None,
                       help="draw masks until the standard error of log p(x) is at most this "
                            "(nats; per token with --per-token), up to --max-masks (default: no "
                            "target, --num-masks replicates)")  # fmt: skip
    score.add_argument("--per-token", action="store_true",
                       help="--target-stderr is per scored token")
    score.add_argument("--max-masks", type=_positive_int, default=4096,
                       help="most Monte-Carlo masks per text for --target-stderr (the first "
                            "round, --num-masks replicates, is always drawn)")  # fmt: skip
    score.add_argument("--no-pll", action="store_true",
                       help="skip the pseudo-log-likelihood (D forward rows per text)")
    score.add_argument("--curve", action="store_true",
                       help="write each text's curve S(x; m) per stratum")
    score.add_argument("--seed", type=_seed, default=0,
                       help="seed of the masks (with each text's index)")
    score.add_argument("--token-budget", type=_positive_int, default=8192,
                       help="most tokens (rows x length) per forward pass")
    score.add_argument("--exhaustive-up-to", type=_non_negative_int, default=63,
                       help="score a text exactly, with every mask, when it has at most this "
                            "many (2^D - 1; 63 is D <= 6); 0: never")  # fmt: skip
    score.add_argument("--chunk-size", type=_positive_int, default=64,
                       help="texts per process between two writes of OUT")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(subparser=score, folders=lambda args: [])


def _score(args: argparse.Namespace) -> int:
    from .lm import DiffusionTime, MaskedPredictor, StratifiedBins, score_file
    from .lm.corpus import _process_state
    from .masks import Cumulative

    if args.masks == "stratified":
        masks = StratifiedBins(max_strata=args.max_strata)
    elif args.masks == "cumulative":
        masks = Cumulative()
    else:
        masks = DiffusionTime()
    if args.target_stderr is not None and args.num_masks < 2:
        args.subparser.error("argument --num-masks: --target-stderr needs at least 2")
    if args.curve and args.masks != "stratified":
        args.subparser.error("argument --curve: needs --masks stratified")
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights"
    device = args.device
    if device is None:  # accelerate's choice for this process, else the GPU if there is one
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        device = getattr(_process_state(), "device", fallback)
    try:
        predictor = MaskedPredictor.from_pretrained(
            args.model, args.mask_token_id, trust_remote_code=args.trust_remote_code,
            device=device, dtype=MODEL_DTYPES[args.dtype], shift_logits=args.shift_logits,
        )  # fmt: skip
        summary = score_file(
            predictor, args.texts, args.out, format=args.format, chunk_size=args.chunk_size,
            progress=not args.no_progress, masks=masks, num_masks=args.num_masks,
            target_stderr=args.target_stderr, per_token=args.per_token,
            max_masks=args.max_masks, pll=not args.no_pll, curve=args.curve, seed=args.seed,
            token_budget=args.token_budget, exhaustive_up_to=args.exhaustive_up_to,
        )  # fmt: skip
    except (ValueError, OSError) as exc:  # a bad text, model or file: say which, no traceback
        print(f"pyro-mpt score: error: {exc}", file=sys.stderr)
        return 1
    if _process_state().is_main_process:
        missed = summary["target_missed"]
        note = f"; {missed} stopped at --max-masks above the target" if missed else ""
        processes = _process_state().num_processes
        where = f" on {processes} processes" if processes > 1 else ""
        print(f"scored {summary['scored']} texts{where} ({summary['skipped']} already in "
              f"{args.out}){note}", flush=True)  # fmt: skip
    return 0


def _names(args: argparse.Namespace) -> list[str]:
    return list(EXPERIMENTS) if args.name == "all" else [args.name]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for folder in args.folders(args):
        problem = _folder_problem(folder)
        if problem is not None:
            args.subparser.error(f"argument --out: {problem}")  # exits with status 2
    if args.command == "score":
        return _score(args)
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
