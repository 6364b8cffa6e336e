r"""One column of a comparison table for one model, and standard errors of differences.

A :class:`Score` is an estimate :math:`\hat v` of a model's score (LML, ELBO, CLML, MPT, elpd
LOO: totals over the data, nats) with its standard error and what it was computed from. For the
best model :math:`b` by a column and another model :math:`a`, the table reports
:math:`\Delta = \hat v_b - \hat v_a` and its standard error:

* **common draws** (masks shared by both models, or i.i.d. replicates paired by index): the
  stratified standard error of the per-draw differences,
  ``draw.estimate(terms_b - terms_a, reduction="sum", summed=True).stderr``: the shared
  Monte-Carlo noise cancels (common random numbers);
* **pointwise** (leave-one-out): :math:`\sqrt{n\,\mathrm{Var}_i(e^b_i - e^a_i)}`, the ``dse`` of
  ``arviz_stats.compare``;
* **importance sampling** with draws paired by index (:math:`\hat v = \log \frac1S \sum_s w_s`):
  the delta method, :math:`\mathrm{sd}_s(w^b_s/\bar w^b - w^a_s/\bar w^a)/\sqrt S`;
* otherwise the estimates are independent: :math:`\sqrt{se_a^2 + se_b^2}` (also reported for
  every column as ``*_dse_unpaired``, what independent estimates would give).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from .masks import MaskSample

__all__ = ["Score", "replicates", "add_differences", "rank_rows"]


def replicates(num: int, dtype: torch.dtype = torch.float64) -> MaskSample:
    """A "draw" of ``num`` i.i.d. replicates averaged with weight ``1/num`` (one stratum): its
    estimate is their mean with standard error ``sd / sqrt(num)``; two models' replicates
    paired by index give the paired standard error.

    Example:
        >>> est = replicates(4).estimate(torch.tensor([1.0, 2.0, 3.0, 4.0]), summed=True)
        >>> est.mean.item(), round(est.stderr.item(), 4)
        (2.5, 0.6455)
    """
    return MaskSample(
        torch.ones(num, 1, dtype=torch.bool),
        torch.full((num,), 1.0 / num, dtype=dtype),
        torch.zeros(num, dtype=torch.long),
    )


class Score(NamedTuple):
    """One column of one model: ``value`` ± ``se`` by ``method``, and what it came from.

    Attributes:
        value, se: the estimate and its standard error (``None``: not available).
        method: how it was computed (``"exact"``, ``"mpt"``, ``"importance"``, ``"snis"``,
            ``"psis"``, ``"draws"``), shown in the table.
        draw, terms: ``value = draw.estimate(terms, reduction="sum", summed=True).mean``.
        pointwise: ``value = pointwise.sum()`` (leave-one-out), ``se`` as ArviZ.
        log_weights: ``value = log mean exp(log_weights)`` (importance sampling).
    """

    value: float | None = None
    se: float | None = None
    method: str | None = None
    draw: MaskSample | None = None
    terms: torch.Tensor | None = None
    pointwise: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None

    @classmethod
    def exact(cls, value: float | torch.Tensor) -> Score:
        """A value without Monte-Carlo error."""
        return cls(float(value), 0.0, "exact")

    @classmethod
    def from_draw(cls, draw: MaskSample, terms: torch.Tensor, method: str) -> Score:
        """The estimate of ``draw`` from per-draw masked sums ``terms`` ``(S, *rows)``, summed
        over rows (rows with independent masks pool their variances).

        Example:
            >>> Score.from_draw(replicates(2), torch.tensor([1.0, 3.0]), "draws").value
            2.0
        """
        estimate = draw.estimate(terms, reduction="sum", summed=True)
        se = 0.0 if draw.exact else estimate.stderr.item()
        return cls(estimate.mean.item(), se, method, draw, terms)

    @classmethod
    def from_pointwise(cls, pointwise: torch.Tensor, method: str) -> Score:
        r"""Leave-one-out: the sum of ``pointwise`` with ArviZ's :math:`\sqrt{n\,\mathrm{Var}}`."""
        n = pointwise.numel()
        se = (n * pointwise.var(unbiased=False)).sqrt().item()
        return cls(pointwise.sum().item(), se, method, pointwise=pointwise)

    @classmethod
    def from_log_weights(cls, log_weights: torch.Tensor) -> Score:
        r""":math:`\log \frac1S \sum_s w_s` with the delta-method standard error.

        Example:
            >>> score = Score.from_log_weights(torch.zeros(8))
            >>> score.value, score.se
            (0.0, 0.0)
        """
        num = log_weights.numel()
        value = (log_weights.logsumexp(0) - math.log(num)).item()
        ratios = num * log_weights.softmax(0)  # w_s / mean(w)
        se = (ratios.std() / math.sqrt(num)).item()
        return cls(value, se, "importance", log_weights=log_weights)


def _same_draw(a: MaskSample, b: MaskSample) -> bool:
    return (
        a.masks.shape == b.masks.shape
        and a.weights.shape == b.weights.shape
        and torch.equal(a.masks, b.masks)
        and torch.equal(a.weights, b.weights.to(a.weights))
        and torch.equal(a.strata, b.strata)
    )


def difference_stderr(best: Score, other: Score) -> float:
    """Standard error of ``best.value - other.value`` (see the module docstring)."""
    if (
        best.draw is not None
        and other.draw is not None
        and _same_draw(best.draw, other.draw)
        and best.terms.shape == other.terms.shape
    ):
        difference = best.terms - other.terms.to(best.terms)
        return best.draw.estimate(difference, reduction="sum", summed=True).stderr.item()
    if (
        best.pointwise is not None
        and other.pointwise is not None
        and best.pointwise.shape == other.pointwise.shape
    ):
        difference = best.pointwise - other.pointwise.to(best.pointwise)
        return (difference.numel() * difference.var(unbiased=False)).sqrt().item()
    if (
        best.log_weights is not None
        and other.log_weights is not None
        and best.log_weights.shape == other.log_weights.shape
    ):
        num = best.log_weights.numel()
        ratios = num * (
            best.log_weights.softmax(0) - other.log_weights.softmax(0).to(best.log_weights)
        )
        return (ratios.std() / math.sqrt(num)).item()
    return math.hypot(best.se or 0.0, other.se or 0.0)


def add_differences(
    rows: Sequence[dict[str, Any]],
    scores: Mapping[str, Mapping[str, Score]],
    keys: Sequence[str],
) -> None:
    """Fill ``key``, ``key_se``, ``key_diff``, ``key_dse`` and ``key_dse_unpaired`` in every row
    (``None`` where a model has no such score); ``scores[model][key]``."""
    for key in keys:
        column = {row["model"]: scores[row["model"]].get(key, Score()) for row in rows}
        for row in rows:
            row[key], row[key + "_se"] = column[row["model"]].value, column[row["model"]].se
        available = [name for name, score in column.items() if score.value is not None]
        best = max(available, key=lambda name: column[name].value) if available else None
        for row in rows:
            this = column[row["model"]]
            if best is None or this.value is None:
                row[key + "_diff"] = row[key + "_dse"] = row[key + "_dse_unpaired"] = None
            elif row["model"] == best:
                row[key + "_diff"] = row[key + "_dse"] = row[key + "_dse_unpaired"] = 0.0
            else:
                reference = column[best]
                row[key + "_diff"] = reference.value - this.value
                row[key + "_dse"] = difference_stderr(reference, this)
                row[key + "_dse_unpaired"] = math.hypot(reference.se or 0.0, this.se or 0.0)


def rank_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("elpd_loo", "lml")) -> None:
    """``rank``: position by the first of ``keys`` every row has (as ``arviz_stats.compare``
    ranks by elpd), else by the next."""
    for key in keys:
        if all(row.get(key) is not None for row in rows):
            order = sorted(rows, key=lambda row, key=key: -row[key])
            break
    else:
        order = list(rows)
    for rank, row in enumerate(order):
        row["rank"] = rank
