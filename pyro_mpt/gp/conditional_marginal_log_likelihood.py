r"""Conditional marginal likelihood (CLML) of an exact GP: two estimators of one quantity.

Lotfi et al. (2022) score hyperparameters by how well a model that has seen a random fraction c of
the data predicts the rest. With a held-out set H of :math:`p` observations and the conditioning
set :math:`C` (the other :math:`n - p`), averaged over uniformly random splits,

.. math::

    \mathrm{CLML}_p(\theta) = \mathbb E_{H}\big[\log p(\mathbf y_H \mid \mathbf y_C, \theta)\big]
        = \sum_{t=1}^{p} S(\mathbf y; t), \qquad
    S(\mathbf y; t) = \binom{n}{t}^{-1} \sum_{|M| = t} \frac{1}{t}
        \sum_{j \in M} \log p(y_j \mid \mathbf y_{R}, \theta),

where the second equality is the chain rule over a random order of H: its k-th factor predicts one
held-out point from :math:`n - p + k - 1` others, and averaged over splits and orders that is
:math:`S(\mathbf y; p - k + 1)`. The right-hand side is the target of the mask scheme
:class:`~pyro_mpt.masks.RateRange` ``(0, p/n)``; with :math:`p = n` it is the log marginal
likelihood, with :math:`p = 1` leave-one-out.

**Fraction convention.** ``condition_fraction`` c is the fraction of the data *conditioned on*
(Lotfi et al.'s c = 0.9: predict 10% from 90%); the held-out size is
:math:`p = \max(1, \lfloor (1 - c) n \rfloor)`. ``RateRange(0, 1 - c)`` has the same target.

Two estimators (:class:`ConditionalMarginalLogLikelihood`, ``estimator=``):

* ``"split"`` (Lotfi et al.): draw H uniformly, score the held-out block jointly,
  :math:`\log p(\mathbf y_H \mid \mathbf y_C)`. The joint density is computed by the chain rule,
  :math:`\sum_{k=1}^{p} \log p(y_{h_k} \mid \mathbf y_C, y_{h_1..h_{k-1}})`: p nested masks
  :math:`\{h_k..h_p\}` conditioned through :func:`pyro_mpt.gaussian.full_rank_conditionals`, all
  from the one Cholesky factor of the call.
* ``"masked"`` (masked pre-training): for every size :math:`t = 1..p` an independent uniformly
  random mask of that size, each masked observation scored on its own, weight :math:`1/t`
  (stratified over sizes): the same p masks' worth of factorisations as one split, but every
  masked observation is scored, not only one per mask.

Both are unbiased for :math:`\mathrm{CLML}_p`. The objective returned, as in
:class:`gpytorch.mlls.ExactMarginalLogLikelihood`, adds the log priors and added loss terms and
divides by the number of scored observations, here p (Lotfi et al. call
``ExactMarginalLogLikelihood`` on the held-out points of a model conditioned on C, which
divides by :math:`|H|`): a log predictive density per held-out observation.

References:
    S. Lotfi, P. Izmailov, G. Benton, M. Goldblum, A. G. Wilson, "Bayesian Model Selection, the
    Marginal Likelihood, and Generalization", ICML 2022.
    E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 107(2), 2020.
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gpytorch.distributions import MultivariateNormal
from torch import Tensor

from ..gaussian import normal_log_prob
from ..masks import MaskSample, MPTEstimate, RateRange, _check_positive_int, masks_of_sizes
from ..threads import limited_threads
from ._masked_exact_mll import (
    MaskedExactMLL,
    Observations,
    _check_function_dist,
    _conditionals,
)

__all__ = [
    "ConditionalMarginalLogLikelihood",
    "held_out_size",
    "clml_rate_range",
    "split_log_prob",
    "stratified_clml_masks",
]

ESTIMATORS = ("split", "masked")


def _check_fraction(condition_fraction) -> float:
    if not (
        isinstance(condition_fraction, (int, float))
        and not isinstance(condition_fraction, bool)
        and math.isfinite(condition_fraction)
        and 0.0 <= condition_fraction < 1.0
    ):
        raise ValueError(
            "condition_fraction (the fraction of the data conditioned on) must be a number in "
            f"[0, 1), got {condition_fraction!r}"
        )
    return float(condition_fraction)


def held_out_size(condition_fraction: float, size: int) -> int:
    r"""Held-out observations :math:`p = \max(1, \lfloor (1 - c) n \rfloor)` for a fraction c
    conditioned on.

    Example:
        >>> held_out_size(0.9, 300), held_out_size(0.9, 5), held_out_size(0.0, 7)
        (30, 1, 7)
    """
    fraction = _check_fraction(condition_fraction)
    _check_positive_int("size", size)
    return min(size, max(1, math.floor((1.0 - fraction) * size + 1e-9)))


def clml_rate_range(condition_fraction: float) -> RateRange:
    r"""The mask scheme whose target is the CLML with a fraction c conditioned on.

    ``RateRange(0, 1 - c)``: mask sizes :math:`1..\lfloor (1 - c) D \rfloor`, target
    :math:`\sum_{t=1}^{p} S(x; t) = \mathbb E_H \log p(x_H \mid x_C)`. Use it with
    :class:`~pyro_mpt.gp.MaskedPretrainingMLL` or :class:`~pyro_mpt.infer.MaskedPretrainingELBO`
    (there the maskable dimensions are the D entries of each observed row, so the target is each
    row's CLML over its own dimensions). It needs :math:`(1 - c) D \ge 1`.

    Example:
        >>> clml_rate_range(0.9)
        RateRange(low=0.0, high=0.1)
    """
    fraction = _check_fraction(condition_fraction)
    return RateRange(0.0, round(1.0 - fraction, 12))


def split_log_prob(observations: Observations, held_out: Tensor) -> Tensor:
    r"""Joint :math:`\log p(\mathbf y_H \mid \mathbf y_C)` for every held-out set H in ``held_out``.

    The chain rule in the order of the held-out indices: the k-th term is the conditional of the
    k-th held-out observation given C and the held-out ones before it, i.e. the masked conditional
    of mask :math:`\{h_k..h_p\}` at :math:`h_k` (:func:`~pyro_mpt.gaussian.full_rank_conditionals`).

    Args:
        observations: the flat targets and GPyTorch's Cholesky factor (see ``_observations``).
        held_out: boolean ``(S, *batch, n)``, True on H; every row holds out the same number p.

    Returns:
        ``(S, *batch)``: one joint log-density per held-out set.
    """
    sizes = held_out.sum(-1)
    size = int(sizes.flatten()[0])
    if size < 1 or not bool((sizes == size).all()):
        raise ValueError("every held-out set must hold out the same number (>= 1) of points")
    # Rank of each held-out index among the held-out ones (0..p-1); -1 outside H.
    rank = held_out.long().cumsum(-1) - 1
    rank = torch.where(held_out, rank, torch.full_like(rank, -1))
    steps = torch.arange(size, device=held_out.device).reshape(-1, *[1] * held_out.dim())
    masks = rank >= steps  # (p, S, *batch, n): {h_k..h_p}
    scored = rank == steps  # h_k
    log_prob = normal_log_prob(*_conditionals(observations, masks), masks)
    return torch.where(scored, log_prob, torch.zeros_like(log_prob)).sum((0, -1))


def stratified_clml_masks(
    size: int,
    event_size: int,
    batch_shape: Sequence[int] = (),
    num_draws: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> MaskSample:
    r"""``num_draws`` uniform masks of every size :math:`t = 1..p`, each weighted
    :math:`1/(\text{num\_draws}\; t)`.

    The weighted masked sum is unbiased for :math:`\sum_{t=1}^{p} S(x; t)`, the CLML with p held
    out; sizes are strata (a standard error needs ``num_draws >= 2``).

    Example:
        >>> stratified_clml_masks(3, 10).masks.sum(-1).tolist()
        [1, 2, 3]
    """
    _check_positive_int("size", size)
    _check_positive_int("num_draws", num_draws)
    strata = torch.arange(size).repeat_interleave(num_draws)
    sizes = (strata + 1).reshape(-1, *[1] * len(batch_shape)).expand(len(strata), *batch_shape)
    masks = masks_of_sizes(sizes, event_size, generator).to(device)
    weights = (1.0 / (num_draws * sizes.to(torch.float64))).to(
        dtype=dtype or torch.get_default_dtype(), device=device
    )
    return MaskSample(masks, weights, strata.to(device))


class ConditionalMarginalLogLikelihood(MaskedExactMLL):
    r"""Conditional marginal likelihood of an exact GP (Lotfi et al., 2022), per held-out point.

    .. math::

        \mathcal L(\theta) = \frac1p\Big(\widehat{\mathrm{CLML}}_p(\theta) + \log p(\theta)\Big),
        \qquad \mathrm{CLML}_p = \mathbb E_H \log p(\mathbf y_H \mid \mathbf y_C)
        = \sum_{t=1}^{p} S(\mathbf y; t),

    with :math:`p = \max(1, \lfloor (1 - c) n \rfloor)` held out and the other :math:`n - p`
    (a fraction c, ``condition_fraction``) conditioned on. A drop-in for
    :class:`gpytorch.mlls.ExactMarginalLogLikelihood`: called as ``mll(model(x), y)``, priors and
    added loss terms enter as there. Each call factorises :math:`\mathbf K + \sigma^2 \mathbf I`
    once (GPyTorch's Cholesky, jitter included) and draws new splits or masks.

    Args:
        likelihood: a Gaussian likelihood.
        model: the ``gpytorch.models.ExactGP``.
        condition_fraction: c, the fraction of the data *conditioned on* (0.9: predict 10% of the
            points from the other 90%). ``0`` scores every point from nothing: the LML.
        estimator: ``"split"`` (Lotfi et al.: random split, the held-out block scored jointly) or
            ``"masked"`` (masks of every size 1..p, each masked point scored on its own). Same
            target, same number of small factorisations per draw.
        num_draws: splits (``"split"``) or masks per size (``"masked"``) per call.
        generator: ``torch.Generator`` for reproducible splits and masks.

    Example:
        >>> import gpytorch
        >>> train_x = torch.linspace(0, 1, 20)
        >>> train_y = torch.sin(6 * train_x)
        >>> class GP(gpytorch.models.ExactGP):
        ...     def __init__(self, x, y, likelihood):
        ...         super().__init__(x, y, likelihood)
        ...         self.mean_module = gpytorch.means.ConstantMean()
        ...         self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(
        ...             self.mean_module(x), self.covar_module(x))
        >>> likelihood = gpytorch.likelihoods.GaussianLikelihood()
        >>> model = GP(train_x, train_y, likelihood)
        >>> clml = ConditionalMarginalLogLikelihood(likelihood, model, condition_fraction=0.8,
        ...     estimator="masked", generator=torch.Generator().manual_seed(0))
        >>> loss = -clml(model(train_x), train_y)  # 4 of 20 points predicted from 16
        >>> loss.backward()
    """

    def __init__(
        self,
        likelihood,
        model,
        condition_fraction: float = 0.9,
        estimator: str = "split",
        num_draws: int = 1,
        generator: torch.Generator | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        _check_positive_int("num_draws", num_draws)
        super().__init__(likelihood, model, generator)
        self.condition_fraction = _check_fraction(condition_fraction)
        self.estimator = estimator
        self.num_draws = num_draws

    def held_out_size(self, size: int) -> int:
        """p for ``size`` observations."""
        return held_out_size(self.condition_fraction, size)

    def draw_masks(self, event_size, batch_shape, dtype, device=None) -> MaskSample:
        """Held-out sets (``"split"``: weights ``1/num_draws`` on the joint log-densities) or the
        stratified masks (``"masked"``)."""
        size = self.held_out_size(event_size)
        if self.estimator == "masked":
            return stratified_clml_masks(
                size, event_size, batch_shape, self.num_draws, self.generator, dtype, device
            )
        sizes = torch.full((self.num_draws, *batch_shape), size)
        masks = masks_of_sizes(sizes, event_size, self.generator).to(device)
        weights = torch.full(sizes.shape, 1.0 / self.num_draws, dtype=dtype, device=device)
        return MaskSample(
            masks, weights, torch.zeros(self.num_draws, dtype=torch.long, device=device)
        )

    def masked_sums(self, observations: Observations, draw: MaskSample) -> Tensor:
        """Per-draw log-densities to sum with ``draw``'s weights: the held-out block's joint
        log-density (``"split"``) or the masked conditionals' sum (``"masked"``)."""
        if self.estimator == "split":
            return split_log_prob(observations, draw.masks)
        return super().masked_sums(observations, draw)

    def num_scored(self, function_dist: MultivariateNormal, observations: Observations) -> int:
        """The divisor: p, the number of held-out points (Lotfi et al.'s scale)."""
        return self.held_out_size(observations.size)

    def estimate(
        self, function_dist: MultivariateNormal, target: Tensor, *params, **kwargs
    ) -> MPTEstimate:
        r""":math:`\widehat{\mathrm{CLML}}_p` (a sum over the p held-out points, no priors, not
        divided) with its Monte-Carlo standard error, one value per batch element.

        Example:
            >>> import gpytorch
            >>> x = torch.linspace(0, 1, 10, dtype=torch.float64)
            >>> class GP(gpytorch.models.ExactGP):
            ...     def __init__(self, x, y, likelihood):
            ...         super().__init__(x, y, likelihood)
            ...         self.mean_module = gpytorch.means.ZeroMean()
            ...         self.covar_module = gpytorch.kernels.RBFKernel()
            ...     def forward(self, x):
            ...         return gpytorch.distributions.MultivariateNormal(
            ...             self.mean_module(x), self.covar_module(x))
            >>> likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
            >>> model = GP(x, torch.sin(6 * x), likelihood).double()
            >>> clml = ConditionalMarginalLogLikelihood(likelihood, model, 0.5, "masked",
            ...     num_draws=8, generator=torch.Generator().manual_seed(0))
            >>> est = clml.estimate(model(x), torch.sin(6 * x))
            >>> est.mean.shape, bool(est.stderr > 0), est.dof.item()  # 5 sizes x (8 - 1)
            (torch.Size([]), True, 35.0)
        """
        draw, contributions = self.contributions(function_dist, target, *params, **kwargs)
        return draw.estimate(contributions, summed=True)

    def contributions(
        self, function_dist: MultivariateNormal, target: Tensor, *params, **kwargs
    ) -> tuple[MaskSample, Tensor]:
        """The draw (held-out sets or masks) and its per-draw log-densities ``(S, *batch)``:
        ``draw.estimate(contributions, summed=True)`` is :meth:`estimate`. Two models scored with
        generators seeded alike get the same draw (common random numbers), so the estimate of
        their difference, ``draw.estimate(a - b, summed=True)``, has a paired standard error."""
        _check_function_dist(function_dist)
        with limited_threads(dense=True):
            _, draw, sums = self._draw_and_sum(function_dist, target, *params, **kwargs)
            return draw, sums
