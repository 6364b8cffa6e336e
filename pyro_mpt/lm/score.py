r"""Per-text scores of a masked predictor: PLL, cumulative estimate of log p(x) ± s.e., curve.

For each text (or continuation, given its prompt) with D scored tokens, :func:`score_texts`
returns

* the exact pseudo-log-likelihood :math:`\sum_j \log p(x_j \mid x_{-j})` (D forward passes),
* an unbiased estimate of :math:`\sum_{m=1}^{D} S(x; m)` with its standard error, from masks drawn
  by a :class:`~pyro_mpt.masks.MaskScheme` (default :class:`~pyro_mpt.lm.StratifiedBins`),
  either a fixed number of them or, with ``target_stderr``, as many as it takes to bring the
  standard error under the target (up to a cap),
* optionally the curve: the mean of :math:`S(x; m)` over each stratum's sizes, with errors.

For a masked LM whose conditionals come from one joint distribution the estimate is
:math:`\log p(x)`; for a masked diffusion LM it is minus its continuous-time NELBO (see
:class:`~pyro_mpt.lm.DiffusionTime`); in general (conditionals that do not come from one joint)
it is the expected any-order log-likelihood: the average over the D! orders of the chain rule's
log-probability, a lower bound on the log-probability of the mixture over orders.

Every text's masks come from its own generator, seeded by ``(seed, index)``: scores do not depend
on which other texts are scored, in which batch, or by which process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..masks import Exhaustive, MaskSample, MaskScheme, MPTEstimate, _check_positive_int
from .predictor import EncodedText, MaskedPredictor
from .schemes import StratifiedBins

__all__ = ["TextCurve", "TextScore", "score_texts", "text_generator"]


def text_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of text ``index``'s masks: seeded by ``(seed, index)`` through
    NumPy's ``SeedSequence``, so that neighbouring indices get unrelated streams.

    Example:
        >>> a = torch.rand(2, generator=text_generator(0, 7))
        >>> torch.equal(a, torch.rand(2, generator=text_generator(0, 7)))
        True
    """
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    state = np.random.SeedSequence((seed, index)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TextCurve(NamedTuple):
    r"""One text's masked-prediction curve, per stratum of mask sizes.

    Attributes:
        low, high: ``(K,)`` long, the smallest and largest mask size of each stratum (equal when
            every size is its own stratum, i.e. D <= ``max_strata``).
        mean: ``(K,)`` the mean of :math:`S(x; m)` over the stratum's sizes, nats per token.
        stderr: ``(K,)`` its Monte-Carlo standard error.
        num_tokens: D.
    """

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    stderr: torch.Tensor
    num_tokens: int

    @property
    def rates(self) -> torch.Tensor:
        """The middle of each stratum as a masking rate, ``(low + high) / (2 D)``."""
        return (self.low + self.high).double() / (2 * self.num_tokens)


class TextScore(NamedTuple):
    r"""The scores of one text, in nats.

    Attributes:
        index: the text's index (which also seeds its masks).
        num_tokens: D, the scored tokens (the continuation's, for a prompt/continuation pair).
        prompt_tokens: tokens of the prompt, visible and not scored (0 without a prompt).
        log_prob: :class:`~pyro_mpt.masks.MPTEstimate` of :math:`\sum_m S(x; m)` (scalars).
        pseudo_log_likelihood: the exact PLL, or ``None`` when not asked for.
        num_masks: Monte-Carlo masks drawn.
        forward_rows: rows run through the predictor (masks that hide something, plus D for the
            PLL).
        target_met: with ``target_stderr``, whether the standard error reached it (False: the
            mask cap was hit first); ``None`` without a target.
        curve: a :class:`TextCurve`, or ``None``.
    """

    index: int
    num_tokens: int
    prompt_tokens: int
    log_prob: MPTEstimate
    pseudo_log_likelihood: float | None
    num_masks: int
    forward_rows: int
    target_met: bool | None
    curve: TextCurve | None

    def to_dict(self) -> dict:
        """A JSON-ready dict (floats; NaN and infinity become ``None``).

        Example:
            >>> est = MPTEstimate(torch.tensor(-9.5), torch.tensor(0.25), torch.tensor(30.0))
            >>> record = TextScore(3, 4, 0, est, -8.0, 32, 36, None, None).to_dict()
            >>> record["log_prob"], record["stderr"], record["masks"], "target_met" in record
            (-9.5, 0.25, 32, False)
        """
        record = {"index": self.index, "tokens": self.num_tokens}
        if self.prompt_tokens:
            record["prompt_tokens"] = self.prompt_tokens
        record.update(
            pll=_number(self.pseudo_log_likelihood),
            log_prob=_number(self.log_prob.mean),
            stderr=_number(self.log_prob.stderr),
            dof=_number(self.log_prob.dof),
            masks=self.num_masks,
            forward_rows=self.forward_rows,
        )
        if self.target_met is not None:
            record["target_met"] = self.target_met
        if self.curve is not None:
            record["curve"] = {
                "low": self.curve.low.tolist(),
                "high": self.curve.high.tolist(),
                "mean": [_number(v) for v in self.curve.mean],
                "stderr": [_number(v) for v in self.curve.stderr],
            }
        return record


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _combine(draws: list[tuple[MaskSample, int]]) -> MaskSample:
    """Rounds of replicates of one scheme as one sample of all of them: each round's weights
    were divided by its own replicate count, so rescale them to the total."""
    total = sum(count for _, count in draws)
    return MaskSample(
        torch.cat([draw.masks for draw, _ in draws]),
        torch.cat([draw.weights * (count / total) for draw, count in draws]),
        torch.cat([draw.strata for draw, _ in draws]),
        exact=all(draw.exact for draw, _ in draws),
    )


def _curve(scheme: StratifiedBins, sample: MaskSample, sums: torch.Tensor, size: int) -> TextCurve:
    r"""Per bin of sizes, the mean of :math:`S(x; m)` over its sizes: the bin's share of the
    estimate divided by its number of sizes (the masks of a bin are one stratum, or all of its
    masks when the text was enumerated)."""
    low, high = scheme.bins(size)
    sizes = sample.masks.sum(-1)
    means, errors = [], []
    for first, last in zip(low.tolist(), high.tolist(), strict=True):
        rows = (sizes >= first) & (sizes <= last)
        part = MaskSample(sample.masks[rows], sample.weights[rows] / (last - first + 1),
                          torch.zeros(int(rows.sum()), dtype=torch.long), sample.exact)  # fmt: skip
        estimate = part.estimate(sums[rows], summed=True)
        means.append(estimate.mean)
        errors.append(estimate.stderr)
    return TextCurve(low, high, torch.stack(means), torch.stack(errors), size)


def _check_options(masks, num_masks, target_stderr, per_token, max_masks, token_budget,
                   exhaustive_up_to):  # fmt: skip
    if not isinstance(masks, MaskScheme):
        raise TypeError(f"masks must be a pyro_mpt.masks.MaskScheme, got {type(masks).__name__}")
    _check_positive_int("num_masks", num_masks)
    _check_positive_int("max_masks", max_masks)
    _check_positive_int("token_budget", token_budget)
    if isinstance(exhaustive_up_to, bool) or not isinstance(exhaustive_up_to, int) or (
        exhaustive_up_to < 0
    ):
        raise ValueError(
            f"exhaustive_up_to must be a non-negative integer, got {exhaustive_up_to!r}"
        )
    if target_stderr is not None:
        if isinstance(target_stderr, bool) or not isinstance(target_stderr, (int, float)) or not (
            0 < target_stderr < math.inf
        ):
            raise ValueError(
                f"target_stderr must be a positive number (nats), got {target_stderr!r}"
            )
        if num_masks < 2 and not masks.exact:
            raise ValueError(
                "target_stderr needs a standard error from the first round: num_masks >= 2"
            )
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be True or False, got {per_token!r}")


def score_texts(
    predictor: MaskedPredictor,
    texts: Sequence[str | tuple[str, str]],
    *,
    masks: MaskScheme | None = None,
    num_masks: int = 2,
    target_stderr: float | None = None,
    per_token: bool = False,
    max_masks: int = 4096,
    pll: bool = True,
    curve: bool = False,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    token_budget: int = 8192,
    exhaustive_up_to: int = 63,
    progress: bool = False,
) -> list[TextScore]:
    r"""Score texts (or continuations given prompts) with a masked predictor.

    Args:
        predictor: a :class:`~pyro_mpt.lm.MaskedPredictor`.
        texts: strings, or ``(prompt, continuation)`` pairs: then the prompt is always visible
            and only the continuation is masked and scored, giving
            :math:`\log p(\text{continuation} \mid \text{prompt})` (what lm-evaluation-harness's
            ``loglikelihood`` asks of a model).
        masks: the scheme (default :class:`~pyro_mpt.lm.StratifiedBins`, 32 strata at most).
        num_masks: replicates of the scheme's draw in the first round (a stratified replicate
            is one mask per stratum; two give a standard error; an exact scheme draws one).
        target_stderr: draw more replicates, per text, until the standard error of its estimate
            is at most this many nats (per token with ``per_token``), or ``max_masks`` is
            reached: after each round the replicates still needed are projected from
            :math:`\mathrm{s.e.} \propto 1/\sqrt{n}` and drawn at once. Stopping on the
            estimated error biases the estimate by a small fraction of the error (the same
            masks decide both); report ``target_met``.
        per_token: ``target_stderr`` is in nats per scored token.
        max_masks: the most Monte-Carlo masks per text that ``target_stderr`` may draw (the
            first round, ``num_masks`` replicates, is always drawn).
        pll: also compute the exact pseudo-log-likelihood (D more rows per text).
        curve: also return the per-stratum curve (needs :class:`~pyro_mpt.lm.StratifiedBins`).
        seed: with the text's index, seeds its masks (see :func:`text_generator`).
        indices: the texts' indices (default ``0..N-1``): give a shard its global indices and it
            draws the masks the whole corpus would.
        token_budget: the most tokens (rows x length) in one forward pass.
        exhaustive_up_to: a text with at most this many distinct masks (:math:`2^D - 1`; the
            default 63 is D <= 6) is scored exactly with every mask instead. Few tokens mean few
            distinct masks of a size, so two random ones are often the same: the standard error
            would then read 0 for a text that was not scored exactly. 0 turns this off.
        progress: show a tqdm bar over texts.

    Returns:
        One :class:`TextScore` per text, in order.

    Example:
        >>> import torch
        >>> from pyro_mpt.mlm import word_level_tokenizer
        >>> tokenizer = word_level_tokenizer(["the cat sat on the mat"])
        >>> uniform = lambda input_ids: torch.zeros(*input_ids.shape, len(tokenizer))
        >>> predictor = MaskedPredictor(uniform, tokenizer, mask_token_id=tokenizer.mask_token_id)
        >>> [score] = score_texts(predictor, [("the cat", " sat on the mat")], curve=True)
        >>> score.num_tokens, score.prompt_tokens, round(score.log_prob.mean.item(), 3)
        (4, 2, -9.21)
        >>> score.curve.mean  # at every size, -ln 10 (the vocabulary) per token
        tensor([-2.3026, -2.3026, -2.3026, -2.3026], dtype=torch.float64)
    """
    masks = StratifiedBins() if masks is None else masks
    _check_options(masks, num_masks, target_stderr, per_token, max_masks, token_budget,
                   exhaustive_up_to)  # fmt: skip
    if curve and not isinstance(masks, StratifiedBins):
        raise ValueError(f"curve=True needs StratifiedBins masks, got {masks!r}")
    encoded = predictor.encode_all(texts)
    if indices is None:
        indices = range(len(encoded))
    indices = list(indices)
    if len(indices) != len(encoded):
        raise ValueError(f"indices must give one index per text ({len(encoded)}), got "
                         f"{len(indices)}")  # fmt: skip
    settings = _Settings(masks, num_masks, target_stderr, per_token, max_masks, pll, curve,
                         token_budget, exhaustive_up_to)  # fmt: skip
    return [
        _score_one(predictor, text, index, text_generator(seed, index), settings)
        for text, index in tqdm(list(zip(encoded, indices, strict=True)), desc="scoring",
                                disable=not progress, leave=False)  # fmt: skip
    ]


class _Settings(NamedTuple):
    """The options of :func:`score_texts` that every text is scored with."""

    scheme: MaskScheme
    num_masks: int
    target_stderr: float | None
    per_token: bool
    max_masks: int
    pll: bool
    curve: bool
    token_budget: int
    exhaustive_up_to: int


def _score_one(
    predictor: MaskedPredictor,
    text: EncodedText,
    index: int,
    generator: torch.Generator,
    settings: _Settings,
) -> TextScore:
    """Draw rounds of masks for one text until its standard error meets the target (or the cap),
    all forward passes on this text alone."""
    scheme, pll, max_masks = settings.scheme, settings.pll, settings.max_masks
    size = len(text.positions)
    drawn = scheme
    if not scheme.exact and size <= 20 and 2**size - 1 <= settings.exhaustive_up_to:
        drawn = Exhaustive()
    rows_per_batch = max(1, settings.token_budget // len(text.input_ids))
    target = settings.target_stderr
    if target is not None and settings.per_token:
        target = target * size
    draws: list[tuple[MaskSample, int]] = []
    sums: list[torch.Tensor] = []
    replicates = 1 if drawn.exact else settings.num_masks  # exact: every mask once, no error
    per_replicate = None
    # The PLL's D single-token masks go with the first round's: fewer, fuller forward passes.
    singles = torch.eye(size, dtype=torch.bool) if pll else torch.zeros(0, size, dtype=torch.bool)
    pseudo = None
    while True:
        draw = drawn.sample(size, (), replicates, generator, dtype=torch.float64)
        draws.append((draw, replicates))
        if not sums:
            both = predictor.masked_sums(text, torch.cat([draw.masks, singles]), rows_per_batch)
            sums.append(both[: len(draw.masks)])
            if pll:
                pseudo = float(both[len(draw.masks) :].sum())
        else:
            sums.append(predictor.masked_sums(text, draw.masks, rows_per_batch))
        sample = _combine(draws)
        estimate = sample.estimate(torch.cat(sums), summed=True)
        if per_replicate is None:
            per_replicate = len(draw.masks) // replicates
        stderr = float(estimate.stderr)
        if target is None or stderr <= target:
            break
        done = sum(count for _, count in draws)
        room = (max_masks - len(sample.masks)) // per_replicate
        if room < 1:
            break
        # s.e. ~ 1/sqrt(replicates): project the total needed; at least one more replicate.
        needed = math.ceil(done * (stderr / target) ** 2) if math.isfinite(stderr) else 2 * done
        replicates = min(room, max(1, needed - done))
    total_sums = torch.cat(sums)
    rows = int(sample.masks.any(-1).sum()) + len(singles)
    return TextScore(
        index=index,
        num_tokens=size,
        prompt_tokens=text.prompt_tokens,
        log_prob=estimate,
        pseudo_log_likelihood=pseudo,
        num_masks=len(sample.masks),
        forward_rows=rows,
        target_met=None if target is None else bool(float(estimate.stderr) <= target),
        curve=_curve(scheme, sample, total_sums, size) if settings.curve else None,
    )
