"""Score a file of texts into a JSONL file: resumable, data-parallel under ``accelerate launch``.

:func:`score_file` reads a text file (one text per line) or a JSONL file (``text``, or ``prompt``
and ``continuation``, per line), scores every text not already in the output and appends one JSON
line per text, in index order. Under ``accelerate launch --num_processes N`` each chunk of texts is
split between the processes (``PartialState.split_between_processes``), their records are gathered
(``gather_object``) and the main process writes them. A text's masks are drawn from a generator
seeded by ``(seed, index)`` and its forward passes never contain another text, so the file does not
depend on N: N processes write the bytes one process writes.

On CPUs, ``accelerate launch --cpu --num_processes N`` starts a single process unless MPI is set
up (accelerate's multi-CPU launcher is ``mpirun``); ``accelerate launch --multi_gpu
--num_processes N`` and ``torchrun --nproc_per_node N`` start N, and on a machine without CUDA
they score on the CPU with gloo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from ..masks import _check_positive_int
from .predictor import MaskedPredictor
from .score import score_texts

__all__ = ["read_texts", "score_file"]

Format = Literal["auto", "lines", "jsonl"]


def read_texts(path: str | Path, format: Format = "auto") -> list[str | tuple[str, str]]:
    """The texts of a file: one per non-blank line, or one per JSONL record.

    A JSONL record is an object with ``text`` (a text to score), or with ``continuation`` and
    optionally ``prompt`` (score the continuation given the prompt; a pair is returned). Blank
    lines are skipped, so a text's index counts texts, not lines.

    Args:
        path: the file (UTF-8).
        format: ``"lines"``, ``"jsonl"``, or ``"auto"``: JSONL when the name ends in ``.jsonl``
            or ``.json``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "texts.jsonl").write_text(
        ...     '{"text": "a cat"}\\n\\n{"prompt": "The", "continuation": " dog"}\\n')
        >>> read_texts(folder / "texts.jsonl")
        ['a cat', ('The', ' dog')]
    """
    if format not in ("auto", "lines", "jsonl"):
        raise ValueError(f"format must be 'auto', 'lines' or 'jsonl', got {format!r}")
    path = Path(path)
    if format == "auto":
        format = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "lines"
    texts: list[str | tuple[str, str]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if format == "lines":
                texts.append(line.rstrip("\r\n"))
            else:
                texts.append(_record_text(line, f"{path}:{number}"))
    if not texts:
        raise ValueError(f"{path} contains no texts")
    return texts


def _record_text(line: str, where: str) -> str | tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not a JSON line ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and "continuation" not in record:
        text = record["text"]
        if isinstance(text, str):
            return text
    elif "continuation" in record and "text" not in record:
        prompt, continuation = record.get("prompt", ""), record["continuation"]
        if isinstance(prompt, str) and isinstance(continuation, str):
            return (prompt, continuation) if prompt else continuation
    raise ValueError(
        f"{where}: a record needs a string 'text', or a string 'continuation' with an optional "
        f"string 'prompt'; got keys {sorted(record)}"
    )


class _SingleProcess:
    """What :func:`score_file` needs of ``accelerate.PartialState``, for one process."""

    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _process_state():
    """``accelerate.PartialState()`` when accelerate is installed, else a single process.

    The processes work on the CPU (gloo) when ``ACCELERATE_USE_CPU`` is set, or when several were
    launched (``accelerate launch --multi_gpu``, ``torchrun``) on a machine without CUDA:
    ``PartialState`` would otherwise see no distributed setup there and let every process score
    every text.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        if several:
            raise ImportError(
                "several processes were launched but accelerate is not installed: "
                "pip install 'pyro_mpt[lm]'"
            ) from None
        return _SingleProcess()
    import torch

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _read_done(out: Path, count: int, state) -> set[int]:
    """Indices already in ``out``. The main process first cuts off a line left half-written by
    an interrupted run."""
    if state.is_main_process and out.exists():
        data = out.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with out.open("r+b") as handle:
                handle.truncate(end)
    state.wait_for_everyone()
    done: set[int] = set()
    if not out.exists():
        return done
    with out.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                index = json.loads(line)["index"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{out}:{number} is not a record of pyro-mpt score; move the file away or "
                    "choose another output"
                ) from None
            if not (isinstance(index, int) and 0 <= index < count):
                raise ValueError(
                    f"{out}:{number} has index {index!r} but the input has {count} texts: the "
                    "output belongs to another input"
                )
            done.add(index)
    return done


def _sort_records(out: Path) -> None:
    """Rewrite ``out`` in index order (after a resumed run appended out of order)."""
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    indices = [json.loads(line)["index"] for line in lines]
    if indices == sorted(indices):
        return
    ordered = [line for _, line in sorted(zip(indices, lines, strict=True))]
    temporary = out.with_name(out.name + ".sorting")
    temporary.write_text("".join(ordered), encoding="utf-8")
    os.replace(temporary, out)


def score_file(
    predictor: MaskedPredictor,
    texts: str | Path | Sequence[str | tuple[str, str]],
    out: str | Path,
    *,
    format: Format = "auto",
    chunk_size: int = 64,
    progress: bool = True,
    **options,
) -> dict:
    """Score every text of a file (or list) not yet in ``out``, appending one JSON line per text.

    Each line is :meth:`TextScore.to_dict` (``index``, ``tokens``, ``pll``, ``log_prob``,
    ``stderr``, ``dof``, ``masks``, ``forward_rows``; ``prompt_tokens``, ``target_met`` and
    ``curve`` where they apply). Run it again after an interruption and it scores only the
    missing texts (a half-written last line is dropped); the finished file is in index order and
    the same as an uninterrupted run's. It must be re-run with the same input and options.

    Args:
        predictor: a :class:`~pyro_mpt.lm.MaskedPredictor`, already on this process's device.
        texts: a file (see :func:`read_texts`) or a list of texts.
        out: the JSONL output file (created, or resumed).
        format: the input file's format (see :func:`read_texts`).
        chunk_size: texts per process between two writes of the output.
        progress: a tqdm bar over texts (main process only).
        **options: keywords of :func:`~pyro_mpt.lm.score_texts` (``masks``, ``num_masks``,
            ``target_stderr``, ``per_token``, ``max_masks``, ``pll``, ``curve``, ``seed``,
            ``token_budget``, ``exhaustive_up_to``).

    Returns:
        A dict: ``texts`` (in the input), ``skipped`` (already in ``out``), ``scored`` (now) and
        ``target_missed`` (texts of this run whose standard error stayed above the target).

    Example:
        >>> score_file(predictor, "texts.txt", "scores.jsonl", target_stderr=0.5)  # doctest: +SKIP
        {'texts': 1000, 'skipped': 0, 'scored': 1000, 'target_missed': 0}
    """
    for name in ("indices", "progress"):
        if name in options:
            raise TypeError(f"score_file() sets {name} itself")
    _check_positive_int("chunk_size", chunk_size)
    if isinstance(texts, (str, Path)):
        texts = read_texts(texts, format)
    texts = list(texts)
    out = Path(out)
    state = _process_state()
    done = _read_done(out, len(texts), state)
    todo = [index for index in range(len(texts)) if index not in done]
    # Tokenize (and so validate) every remaining text first: a bad one stops the run before any
    # forward pass, on every process alike.
    encoded = dict(zip(todo, predictor.encode_all([texts[i] for i in todo]) if todo else [],
                       strict=True))  # fmt: skip
    missed = 0
    main = state.is_main_process
    bar = tqdm(total=len(todo), desc="pyro-mpt score", disable=not (progress and main))
    step = chunk_size * state.num_processes
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            with state.split_between_processes(chunk) as mine:
                records = _records(predictor, encoded, mine, options)
            records = gather_object(records)
        else:
            records = _records(predictor, encoded, chunk, options)
        missed += sum(record.get("target_met") is False for record in records)
        if main:
            with out.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
        bar.update(len(chunk))
    bar.close()
    if main and out.exists():
        _sort_records(out)
    state.wait_for_everyone()
    return {"texts": len(texts), "skipped": len(done), "scored": len(todo),
            "target_missed": missed}  # fmt: skip


def _records(predictor, encoded: dict, indices: list[int], options: dict) -> list[dict]:
    if not indices:
        return []
    scores = score_texts(predictor, [encoded[i] for i in indices], indices=indices, **options)
    return [score.to_dict() for score in scores]
