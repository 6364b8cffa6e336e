r"""Masked pre-training scores: the cumulative estimate of :math:`\log p(x)` and the per-rate curve.

.. math::

    \log p(x) = \sum_{m=1}^{D} S(x; m), \qquad
    S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_R).

:func:`mpt_score` estimates the left side with a :mod:`~pyro_mpt.masks` scheme; :func:`mpt_curve`
estimates :math:`S(x; m)` for chosen masking rates, whose area (sum over every size) is the log
marginal likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .gaussian import as_value, batch_shape_of, event_size, masked_conditional_log_prob
from .masks import (
    Cumulative,
    MaskSample,
    MaskScheme,
    MPTEstimate,
    Reduction,
    _check_generator,
    masks_of_sizes,
    size_for_rate,
    stratified_estimate,
)
from .threads import limit_threads_in_backward, limited_threads

__all__ = ["MPTEstimate", "MPTCurve", "mpt_score", "mpt_curve", "stratified_estimate"]



class MPTCurve(NamedTuple):
    r"""Masked-prediction scores :math:`S(x; m)` per mask size.

    Attributes:
        sizes: long tensor ``(R,)`` of mask sizes m.
        rates: ``sizes / D``.
        mean: ``(R, *batch)`` estimates of :math:`S(x; m)`.
        stderr: their Monte-Carlo standard errors.
        event_size: D.
    """

    sizes: torch.Tensor
    rates: torch.Tensor
    mean: torch.Tensor
    stderr: torch.Tensor
    event_size: int

    @property
    def complete(self) -> bool:
        """Whether the curve holds every size ``1..D`` (then :meth:`area` is unbiased)."""
        return len(self.sizes) == self.event_size

    def area(self) -> MPTEstimate:
        r"""The sum of :math:`S(x; m)` over :math:`m = 1..D`: an estimate of :math:`\log p(x)`.

        Unbiased when the curve is :attr:`complete`. Otherwise the missing sizes are linearly
        interpolated (and held constant beyond the ends) and the result is an *approximation*
        whose interpolation error is not in ``stderr`` (it can be many standard errors: a
        5-rate grid on D = 64 PPCA was 17 s.e. off); use every size, or
        :func:`mpt_score`, for an estimate of :math:`\log p(x)`. The standard error assumes
        the rates were estimated independently, as :func:`mpt_curve` does.
        """
        weights = interpolation_weights(self.sizes, self.event_size).to(self.mean)
        mean = torch.tensordot(weights, self.mean, dims=1)
        stderr = torch.tensordot(weights.pow(2), self.stderr.pow(2), dims=1).sqrt()
        return MPTEstimate(mean, stderr)


def interpolation_weights(sizes: torch.Tensor, event_size: int) -> torch.Tensor:
    """Weights c_r with sum_{m=1}^{D} f(m) ~= sum_r c_r f(sizes[r]), by linear interpolation."""
    known = sizes.cpu().numpy().astype(float)
    grid = np.arange(1, event_size + 1, dtype=float)
    basis = np.eye(len(known))
    return torch.as_tensor(
        np.stack([np.interp(grid, known, basis[r]).sum() for r in range(len(known))])
    )


def mpt_score(
    dist,
    value: torch.Tensor,
    masks: MaskScheme | None = None,
    num_masks: int = 1,
    generator: torch.Generator | None = None,
    reduction: Reduction = "none",
    keys: torch.Tensor | None = None,
    gather: bool = False,
) -> MPTEstimate:
    r"""Masked pre-training estimate of :math:`\log p(x)` (or the scheme's target) per row.

    Args:
        dist: a supported Gaussian (``MultivariateNormal``, ``LowRankMultivariateNormal``,
            ``Normal(...).to_event(1)``).
        value: data ``(*batch, D)``.
        masks: a :class:`~pyro_mpt.masks.MaskScheme`; default :class:`~pyro_mpt.masks.Cumulative`.
        num_masks: replicates of the scheme's draw (more = lower variance).
        generator: ``torch.Generator`` for reproducible masks.
        reduction: ``"none"`` (per row), ``"mean"`` or ``"sum"`` over rows. Reduce here rather
            than afterwards: the standard error then pools the rows' mask noise (independent
            masks) or accounts for masks shared across rows.
        keys: instead of ``generator``, one int64 key per row (shape of the batch; see
            :func:`~pyro_mpt.masks.fold_in`): each row's masks are a pure function of its key,
            e.g. of a seed and its global row index.
        gather: when the rows are spread over processes (``torch.distributed``), estimate from
            every process's rows (:mod:`pyro_mpt.distributed`): the same detached estimate and
            standard error on every process, never an average of per-process ones.

    Returns:
        :class:`MPTEstimate` (``.mean`` differentiable, ``.stderr`` detached, ``.dof``). Integer
        or boolean data are promoted to the distribution's floating dtype, as ``log_prob`` does.

    Example:
        >>> import torch
        >>> from torch.distributions import LowRankMultivariateNormal
        >>> from pyro_mpt.masks import Exhaustive
        >>> d = LowRankMultivariateNormal(torch.zeros(4), torch.ones(4, 1), torch.ones(4))
        >>> x = torch.randn(8, 4)
        >>> est = mpt_score(d, x, masks=Exhaustive())
        >>> torch.allclose(est.mean, d.log_prob(x), atol=1e-5)
        True

        Masks keyed by global row index give each row the same estimate in any batch:

        >>> from pyro_mpt.masks import fold_in
        >>> keys = fold_in(0, torch.arange(8))
        >>> first = mpt_score(d, x[:3], keys=keys[:3]).mean
        >>> torch.equal(first, mpt_score(d, x, keys=keys).mean[:3])
        True
    """
    masks = Cumulative() if masks is None else masks
    if not isinstance(masks, MaskScheme):
        raise TypeError(f"masks must be a pyro_mpt.masks.MaskScheme, got {type(masks).__name__}")
    value = as_value(dist, value)
    batch = batch_shape_of(dist, value)
    draw = masks.sample(
        event_size(dist), batch, num_masks, generator, value.dtype, value.device, keys=keys
    )
    with limited_threads():
        log_prob = masked_conditional_log_prob(dist, value, draw.masks)  # zero where unmasked
        estimate = draw.estimate(log_prob.sum(-1), reduction, summed=True, gather=gather)
    return estimate._replace(mean=limit_threads_in_backward(estimate.mean))


def mpt_curve(
    dist,
    value: torch.Tensor,
    rates: Sequence[float] | None = None,
    masks_per_rate: int = 8,
    generator: torch.Generator | None = None,
    reduction: Reduction = "none",
) -> MPTCurve:
    r"""Estimate :math:`S(x; m)` for each masking rate, with standard errors.

    Args:
        dist: a supported Gaussian.
        value: data ``(*batch, D)``.
        rates: masking rates in (0, 1]; each becomes ``m = round(rate * D)`` (duplicates merged).
            Default: every size ``1..D``, so that :meth:`MPTCurve.area` is unbiased for
            :math:`\log p(x)`.
        masks_per_rate: masks per rate and row (>= 2 for a standard error).
        generator: ``torch.Generator`` for reproducible masks.
        reduction: ``"none"``, ``"mean"`` or ``"sum"`` over rows (see :func:`mpt_score`).

    Example:
        >>> import torch
        >>> from torch.distributions import MultivariateNormal
        >>> d = MultivariateNormal(torch.zeros(3), torch.eye(3) + 0.5)
        >>> x = torch.randn(5, 3)
        >>> curve = mpt_curve(d, x, masks_per_rate=4)
        >>> curve.sizes.tolist(), curve.mean.shape
        ([1, 2, 3], torch.Size([3, 5]))
    """
    size = event_size(dist)
    _check_generator(generator)
    if rates is None:
        sizes = list(range(1, size + 1))
    else:
        sizes = sorted({size_for_rate(float(rate), size) for rate in rates})
        if not sizes:
            raise ValueError("rates must contain at least one rate in (0, 1]")
    if not isinstance(masks_per_rate, int) or masks_per_rate < 1:
        raise ValueError(f"masks_per_rate must be a positive integer, got {masks_per_rate!r}")
    value = as_value(dist, value)
    batch = batch_shape_of(dist, value)
    means, stderrs = [], []
    for m in sizes:
        sizes_of_draws = torch.full((masks_per_rate, *batch), m)
        draw = MaskSample(
            masks_of_sizes(sizes_of_draws, size, generator).to(value.device),
            torch.full(sizes_of_draws.shape, 1.0 / (m * masks_per_rate), dtype=value.dtype,
                       device=value.device),
            torch.zeros(masks_per_rate, dtype=torch.long, device=value.device),
        )
        with limited_threads():
            log_prob = masked_conditional_log_prob(dist, value, draw.masks)
            estimate = draw.estimate(log_prob.sum(-1), reduction, summed=True)
        means.append(limit_threads_in_backward(estimate.mean))
        stderrs.append(estimate.stderr)
    sizes_tensor = torch.tensor(sizes, device=value.device)
    return MPTCurve(
        sizes_tensor,
        sizes_tensor.to(value.dtype) / size,
        torch.stack(means),
        torch.stack(stderrs),
        size,
    )
