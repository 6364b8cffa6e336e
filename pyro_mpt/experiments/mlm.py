r"""E4: the masked-prediction curve of a trained masked language model against an untrained one.

The paper scores BERT (pretrained vs randomly initialised) on GLUE text: :math:`S(x; m)`, the mean
log-probability of a masked token when a fraction :math:`\rho = m/D` of the tokens is hidden, falls
from about -2.8 nats at 1% to -5.7 at 99% for the pretrained model and is flat near
:math:`-\ln 30522 = -10.33` for the random one; the area under the curve estimates
:math:`\log p(x)`. No pretrained weights can be fetched here, so this reproduces the contrast at
small scale and offline:

1. corpus: English prose shipped with Python and scikit-learn: the docstrings of a fixed list of
   standard-library modules (and their classes and functions) and the ``DESCR`` of scikit-learn's
   bundled data sets; paragraphs that look like code or tables are dropped, the rest packed into
   texts of at most ``MAX_WORDS`` words. Every tenth paragraph is held out for scoring.
2. a WordPiece tokenizer trained on the training paragraphs
   (:func:`pyro_mpt.mlm.train_wordpiece_tokenizer`);
3. a small ``BertForMaskedLM`` (2 layers, hidden 128, 4 heads, V = 1000, no dropout) trained
   from scratch with the *cumulative* masked pre-training objective: each text draws a rate
   :math:`\rho \sim U(0, 1)`, hides :math:`m = \max(1, \mathrm{round}(\rho D))` tokens (always
   ``[MASK]``, as in scoring) and the loss is the mean cross-entropy of the hidden tokens, so
   every mask size counts equally (the per-token cumulative score). AdamW 1e-3 with warm-up and
   cosine decay, batch 32, 2500 steps (5000 with ``full``). Such a small model first learns the
   unigram frequencies (a flat curve near the unigram entropy) and only then the use of context:
   a first attempt (V = 2000, 2 heads, dropout 0.1, 1500 steps) was still on that plateau.
4. :func:`pyro_mpt.mlm.mlm_curve` and :func:`pyro_mpt.mlm.mlm_score` of the trained model and of
   the same architecture untrained (seeded, ``initializer_range=0.02``, so its logits are nearly
   constant and it scores about :math:`-\ln V` per token) on the held-out texts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..mlm import DEFAULT_RATES, MLMCurve, mlm_curve, mlm_score, train_wordpiece_tokenizer
from ._report import Timer, environment, timing_line

__all__ = ["english_corpus", "run"]

STDLIB_MODULES = """abc argparse ast asyncio base64 bisect calendar cmath codecs collections
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib doctest
email enum fractions functools gettext gzip hashlib heapq hmac html.parser http.client imaplib
importlib inspect io ipaddress itertools json locale logging mailbox math multiprocessing numbers
operator optparse os pathlib pdb pickle platform pprint queue random re sched secrets selectors
shutil signal smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile
textwrap threading timeit tokenize trace types typing unicodedata unittest urllib.parse
urllib.request uuid warnings wave weakref xml.etree.ElementTree zipfile""".split()

SKLEARN_LOADERS = (
    "load_iris",
    "load_wine",
    "load_breast_cancer",
    "load_diabetes",
    "load_digits",
    "load_linnerud",
)

MAX_WORDS = 40
# Lines that start like this are code, reST markup or tables, not prose.
_MARKUP = (">>>", "...", "..", ":", "=", "-", "|", "*", "+")


def _docstrings() -> list[str]:
    """Distinct docstrings of the standard-library modules and the scikit-learn descriptions."""
    from sklearn import datasets

    docs: dict[str, None] = {}  # an ordered set: the corpus must not depend on hashing
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a platform without, e.g., ssl: the corpus just gets smaller
            continue
        with warnings.catch_warnings():  # reading typing.io and the like warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs.update(dict.fromkeys(_module_docstrings(module)))
    for loader in SKLEARN_LOADERS:
        docs.setdefault(getattr(datasets, loader)().DESCR, None)
    return list(docs)


def _module_docstrings(module) -> list[str]:
    """Docstrings of a module, its classes and functions, and the classes' methods."""
    objects = [module]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            objects.append(obj)
            objects += [v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
        elif inspect.isfunction(obj):
            objects.append(obj)
    return [doc for doc in map(inspect.getdoc, objects) if doc]


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if any(line.lstrip().startswith(_MARKUP) for line in lines):
        return False
    text = " ".join(paragraph.split())
    letters = sum(char.isalpha() or char == " " for char in text)
    return len(text.split()) >= 8 and letters / len(text) > 0.9


def _pack(paragraph: str, max_words: int) -> list[str]:
    """Split a paragraph into sentences and pack them into texts of at most ``max_words`` words."""
    texts, current = [], []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
        words = sentence.split()
        if current and len(current) + len(words) > max_words:
            texts.append(" ".join(current))
            current = []
        current += words
        while len(current) > max_words:  # a run-on sentence
            texts.append(" ".join(current[:max_words]))
            current = current[max_words:]
    if current:
        texts.append(" ".join(current))
    return texts


def english_corpus(max_words: int = MAX_WORDS) -> tuple[list[str], list[str]]:
    """Offline English prose: (train texts, held-out texts); every tenth paragraph is held out.

    Example:
        >>> train, held_out = english_corpus()
        >>> len(train) > 5 * len(held_out) > 0
        True
    """
    paragraphs = [
        paragraph
        for doc in _docstrings()
        for paragraph in re.split(r"\n\s*\n", doc)
        if _is_prose(paragraph)
    ]
    train, held_out = [], []
    for index, paragraph in enumerate(paragraphs):
        (held_out if index % 10 == 9 else train).extend(_pack(paragraph, max_words))
    return train, held_out


def _settings(full: bool) -> dict:
    """Default: a few minutes of CPU; ``full``: the same model trained twice as long."""
    return {
        "vocab_size": 1000,
        "max_length": 64,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        # Small data, few steps: dropout only slows the escape from the unigram plateau.
        "dropout": 0.0,
        "initializer_range": 0.02,
        "steps": 5000 if full else 2500,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup": 0.05,
        "train_rates": (0.0, 1.0),
        "eval_texts": 300 if full else 200,
        "masks_per_rate": 16 if full else 8,
        "score_masks": 32 if full else 16,
    }


def _build_model(tokenizer, settings: dict, seed: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        intermediate_size=settings["intermediate_size"],
        max_position_embeddings=settings["max_length"],
        initializer_range=settings["initializer_range"],
        hidden_dropout_prob=settings["dropout"],
        attention_probs_dropout_prob=settings["dropout"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # transformers initialises from the global generator
    return BertForMaskedLM(config)


def _cumulative_batch(
    encoded: list[list[int]],
    special: list[list[int]],
    mask_id: int,
    pad_id: int,
    generator: torch.Generator,
    rates: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch and hide ``max(1, round(rho * D))`` tokens per text, ``rho ~ U(*rates)``.

    Returns input ids, attention mask and labels (``-100`` where nothing is predicted).
    """
    length = max(map(len, encoded))
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scoreable = torch.zeros_like(ids, dtype=torch.bool)
    for row, (tokens, is_special) in enumerate(zip(encoded, special, strict=True)):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        scoreable[row, : len(tokens)] = ~torch.tensor(is_special, dtype=torch.bool)
    counts = scoreable.sum(-1)
    low, high = rates
    rho = low + (high - low) * torch.rand(len(encoded), generator=generator)
    sizes = (rho * counts).round().clamp(min=1)
    # Rank the scoreable positions in random order; the `size` lowest are hidden.
    noise = torch.rand(ids.shape, generator=generator).masked_fill(~scoreable, 2.0)
    ranks = noise.argsort(-1).argsort(-1)
    hidden = (ranks < sizes.unsqueeze(-1)) & scoreable
    labels = torch.where(hidden, ids, torch.full_like(ids, -100))
    return ids.masked_fill(hidden, mask_id), attention, labels


def _train(model, tokenizer, texts: list[str], settings: dict, seed: int, progress: bool):
    """Cumulative masked pre-training: mean masked-token cross-entropy per text, then over texts."""
    tokens = tokenizer(
        texts, truncation=True, max_length=settings["max_length"], return_special_tokens_mask=True
    )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    steps = settings["steps"]
    warmup = max(1, int(settings["warmup"] * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * 0.5
        * (1 + math.cos(math.pi * min(1.0, step / steps))),
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="training MLM", disable=not progress)
    for _ in bar:
        rows = torch.randint(len(texts), (settings["batch_size"],), generator=generator).tolist()
        ids, attention, labels = _cumulative_batch(
            [tokens["input_ids"][r] for r in rows],
            [tokens["special_tokens_mask"][r] for r in rows],
            tokenizer.mask_token_id,
            tokenizer.pad_token_id,
            generator,
            settings["train_rates"],
        )
        hidden = labels != -100
        # The LM head (a V-way softmax) runs only where a token is hidden: most of a step's cost.
        states = model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
        per_token = torch.nn.functional.cross_entropy(
            model.cls(states[hidden]), labels[hidden], reduction="none"
        )
        rows = hidden.nonzero()[:, 0]
        per_text = torch.zeros(len(ids)).index_add(0, rows, per_token) / hidden.sum(-1)
        loss = per_text.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _summary(curve: MLMCurve, score) -> dict:
    average = curve.average()
    area = curve.area()
    tokens = curve.num_tokens.double()
    return {
        "curve_mean": [round(v, 4) for v in average.mean.tolist()],
        "curve_stderr": [round(v, 4) for v in average.stderr.tolist()],
        "area_per_token": round((area.mean / tokens).mean().item(), 4),
        "area_per_text": round(area.mean.mean().item(), 3),
        "cumulative_per_token": round((score.log_prob.mean / tokens).mean().item(), 4),
        "cumulative_per_token_stderr": round(
            ((score.log_prob.stderr / tokens).pow(2).sum().sqrt() / len(tokens)).item(), 4
        ),
        "pll_per_token": round((score.pseudo_log_likelihood / tokens).mean().item(), 4),
    }


def _plot(path: Path, rates: list[float], results: dict, log_vocab: float) -> None:
    from matplotlib.figure import Figure

    percent = [100 * rate for rate in rates]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for key, label, color in (("trained", "trained", "C0"), ("untrained", "untrained", "C3")):
        res = results[key]
        mean = torch.tensor(res["curve_mean"])
        band = 2 * torch.tensor(res["curve_stderr"])
        ax.plot(percent, mean, "o-", color=color, ms=3,
                label=f"{label}: area {res['area_per_token']:.2f} nats/token")  # fmt: skip
        ax.fill_between(percent, mean - band, mean + band, color=color, alpha=0.25)
    ax.axhline(-log_vocab, color="gray", ls="--", lw=1, label=f"$-\\ln V$ = {-log_vocab:.2f}")
    ax.set_xlabel("masking rate (%)")
    ax.set_ylabel("MPT score $S(x; m)$ (nats per masked token)")
    ax.set_title("Masked LM: masked-prediction curve (held-out text)")
    ax.legend(loc="center left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _markdown(results: dict) -> str:
    s = results["settings"]
    rows = [
        "# E4: masked language model, trained vs untrained (MPT curve)",
        "",
        f"BERT-style masked LM ({s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
        f"WordPiece vocabulary V = {results['vocab_size']}) trained from scratch for "
        f"{s['steps']} steps (batch {s['batch_size']}) with the cumulative MPT objective on "
        f"{results['train_texts']} texts of offline English prose (Python standard-library "
        "docstrings and scikit-learn data-set descriptions); scored on "
        f"{results['eval_texts']} held-out texts ({results['eval_tokens_mean']:.1f} tokens on "
        f"average), {s['masks_per_rate']} masks per rate and text. Seed {results['seed']}; "
        f"training took {results['train_seconds']:.0f} s, the whole run "
        f"{results['total_seconds']:.0f} s wall ({results['cpu_seconds']:.0f} s of CPU time) on "
        f"{results['threads']} CPU thread(s).",
        "",
        "S(x; m) in nats per masked token (mean over texts ± Monte-Carlo standard error):",
        "",
        "| masking rate | trained | untrained | trained − untrained |",
        "|---:|---:|---:|---:|",
    ]
    trained, untrained = results["trained"], results["untrained"]
    for i, rate in enumerate(results["rates"]):
        t, u = trained["curve_mean"][i], untrained["curve_mean"][i]
        rows.append(
            f"| {100 * rate:.0f}% | {t:.3f} ± {trained['curve_stderr'][i]:.3f} "
            f"| {u:.3f} ± {untrained['curve_stderr'][i]:.3f} | {t - u:+.3f} |"
        )
    rows += [
        "",
        "Scores of log p(x) per token (mean over held-out texts):",
        "",
        "| | trained | untrained |",
        "|---|---:|---:|",
        f"| area under the curve (interpolated over m = 1..D) | {trained['area_per_token']:.3f} "
        f"| {untrained['area_per_token']:.3f} |",
        f"| cumulative MPT estimate (`mlm_score`, {s['score_masks']} masks/text) "
        f"| {trained['cumulative_per_token']:.3f} ± {trained['cumulative_per_token_stderr']:.3f} "
        f"| {untrained['cumulative_per_token']:.3f} ± "
        f"{untrained['cumulative_per_token_stderr']:.3f} |",
        f"| pseudo-log-likelihood (m = 1 only) | {trained['pll_per_token']:.3f} "
        f"| {untrained['pll_per_token']:.3f} |",
        f"| −ln V | {-results['log_vocab']:.3f} | {-results['log_vocab']:.3f} |",
        "",
        "Checks:",
        "",
    ]
    checks = results["checks"]
    rows += [
        f"- trained beats untrained at every rate: **{checks['trained_beats_untrained']}** "
        f"(smallest margin {checks['min_margin']:.3f} nats)",
        f"- trained curve falls as the rate rises: **{checks['trained_curve_falls']}** "
        f"(from {trained['curve_mean'][0]:.3f} at {100 * results['rates'][0]:.0f}% to "
        f"{trained['curve_mean'][-1]:.3f} at {100 * results['rates'][-1]:.0f}%; "
        f"{checks['rises']} of {len(results['rates']) - 1} steps between neighbouring rates go "
        f"up, {checks['rises_beyond_noise']} by more than 2 standard errors; largest rise "
        f"{checks['max_rise']:+.3f} nats)",
        f"- untrained curve within {checks['untrained_max_deviation']:.3f} nats of −ln V at "
        "every rate",
        f"- PLL overstates log p(x) per token by {checks['pll_minus_area']:.3f} nats for the "
        "trained model (it only scores the easiest, m = 1, term)",
        "",
        "![MPT curve](mlm_curve.png)",
        "",
    ]
    if "timing" in results:
        rows += [timing_line(results), ""]
    return "\n".join(rows)


def run(
    out: Path,
    full: bool = False,
    seed: int = 0,
    *,
    steps: int | None = None,
    eval_texts: int | None = None,
    masks_per_rate: int | None = None,
    progress: bool = True,
) -> dict:
    """Train a small masked LM from scratch, then plot its MPT curve against the untrained model.

    Writes ``mlm_curve.png``, ``results.json`` and ``results.md`` into ``out``. Default settings
    take a few minutes on 2 CPU cores; ``full=True`` trains a bigger model for longer.

    Args:
        out: output folder (created).
        full: bigger model, more steps and masks.
        seed: seeds the model, training batches and masks.
        steps, eval_texts, masks_per_rate: override the settings (a smoke test uses tiny ones).
        progress: show tqdm progress bars.

    Example:
        >>> results = run(Path("out/mlm"))  # doctest: +SKIP
        >>> results["checks"]["trained_beats_untrained"]  # doctest: +SKIP
        True
    """
    timer = Timer()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(full)
    for key, value in (("steps", steps), ("eval_texts", eval_texts),
                       ("masks_per_rate", masks_per_rate)):  # fmt: skip
        if value is not None:
            settings[key] = value
    train_texts, held_out = english_corpus()
    tokenizer = train_wordpiece_tokenizer(train_texts, vocab_size=settings["vocab_size"])
    # Score the held-out texts that fit the model whole; a fixed, seeded subset bounds the time.
    lengths = [len(ids) for ids in tokenizer(held_out)["input_ids"]]
    fits = [text for text, n in zip(held_out, lengths, strict=True) if n <= settings["max_length"]]
    pick = torch.randperm(len(fits), generator=torch.Generator().manual_seed(seed))
    eval_set = [fits[i] for i in pick[: settings["eval_texts"]].tolist()]

    untrained = _build_model(tokenizer, settings, seed).eval()
    trained = _build_model(tokenizer, settings, seed)
    train_start = time.perf_counter()
    losses = _train(trained, tokenizer, train_texts, settings, seed, progress)
    train_seconds = time.perf_counter() - train_start

    results: dict = {"seed": seed, "full": full, "settings": settings}
    rates = list(DEFAULT_RATES)
    for name, model in (("trained", trained), ("untrained", untrained)):
        curve = mlm_curve(
            model, tokenizer, eval_set, rates=rates, masks_per_rate=settings["masks_per_rate"],
            batch_size=128, generator=torch.Generator().manual_seed(seed + 1), progress=progress,
        )  # fmt: skip
        score = mlm_score(
            model, tokenizer, eval_set, num_masks=settings["score_masks"], batch_size=128,
            generator=torch.Generator().manual_seed(seed + 2), progress=progress,
        )  # fmt: skip
        results[name] = _summary(curve, score)
        results["eval_tokens_mean"] = curve.num_tokens.double().mean().item()

    log_vocab = math.log(len(tokenizer))
    trained_mean = torch.tensor(results["trained"]["curve_mean"])
    untrained_mean = torch.tensor(results["untrained"]["curve_mean"])
    rises = trained_mean[1:] - trained_mean[:-1]
    trained_se = torch.tensor(results["trained"]["curve_stderr"])
    # A rise between neighbouring rates counts only beyond Monte-Carlo noise (2 standard errors).
    noise = 2 * (trained_se[1:].pow(2) + trained_se[:-1].pow(2)).sqrt()
    results.update(
        rates=rates,
        vocab_size=len(tokenizer),
        log_vocab=log_vocab,
        train_texts=len(train_texts),
        eval_texts=len(eval_set),
        loss_first=round(sum(losses[:20]) / len(losses[:20]), 4),
        loss_last=round(sum(losses[-20:]) / len(losses[-20:]), 4),
        train_seconds=train_seconds,
        threads=torch.get_num_threads(),
        checks={
            "trained_beats_untrained": bool((trained_mean > untrained_mean).all()),
            "min_margin": (trained_mean - untrained_mean).min().item(),
            "trained_curve_falls": bool(trained_mean[-1] < trained_mean[0])
            and bool((rises <= noise).all()),
            "max_rise": rises.max().item(),
            "rises": int((rises > 0).sum()),
            "rises_beyond_noise": int((rises > noise).sum()),
            "untrained_max_deviation": (untrained_mean + log_vocab).abs().max().item(),
            "pll_minus_area": results["trained"]["pll_per_token"]
            - results["trained"]["area_per_token"],
        },
    )
    # CPU time says what the run costs on an idle machine; wall time includes waiting for cores.
    results["timing"] = timer.summary()
    results["total_seconds"] = results["timing"]["wall_time_s"]
    results["cpu_seconds"] = results["timing"]["cpu_time_s"]
    results["environment"] = environment()
    _plot(out / "mlm_curve.png", rates, results, log_vocab)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    return results
