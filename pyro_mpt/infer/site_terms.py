r"""Per-site masked-prediction terms used by :class:`~pyro_mpt.infer.MaskedPretrainingELBO`.

Small pure functions on tensors and distributions, so that each can be tested on its own:

* :func:`per_dimension_log_prob`: :math:`\log p(x_j \mid \cdot)` for every position ``j`` of the
  masked (rightmost event) dimension of a distribution that factorises over it;
* :func:`snis_conditional_log_prob`: the self-normalised importance-sampling estimate

  .. math::

      \log \hat p(x_j \mid x_R) = \log \sum_{k=1}^{K} \bar w_k\, p(x_j \mid z_k), \qquad
      \bar w_k = \frac{w_k}{\sum_l w_l}, \quad
      w_k = \frac{p(z_k)\, p(x_R \mid z_k)}{q(z_k)}, \quad z_k \sim q,

  of the conditional of a masked dimension given the visible ones (consistent as
  :math:`K \to \infty`; its first-order bias, :math:`O(1/K)`, is estimated and removed, which
  leaves :math:`O(1/K^2)`; with the prior as proposal :math:`w_k = p(x_R \mid z_k)`);
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
)

from ..gaussian import _all_finite
from ..masks import Cumulative, Exhaustive, MaskScheme, RateRange, Stratified

__all__ = [
    "is_collapsed_gaussian",
    "is_factorised",
    "per_dimension_log_prob",
    "importance_log_weights",
    "effective_sample_size",
    "SNISEstimate",
    "snis_estimate",
    "snis_conditional_log_prob",
    "weighted_conditional_log_prob",
    "laplace_approximation",
    "targets_log_marginal",
]


def is_collapsed_gaussian(fn: Distribution) -> bool:
    """Whether ``fn`` is a correlated Gaussian whose masked conditionals are exact in closed form.

    Example:
        >>> is_collapsed_gaussian(MultivariateNormal(torch.zeros(2), torch.eye(2)))
        True
    """
    return isinstance(fn, (MultivariateNormal, LowRankMultivariateNormal))


def is_factorised(fn: Distribution) -> bool:
    """Whether ``fn`` factorises over its rightmost event dimension (or has no event dimension).

    Such a distribution's per-dimension log-probabilities are :func:`per_dimension_log_prob`.

    Example:
        >>> from pyro.distributions import Bernoulli
        >>> is_factorised(Bernoulli(logits=torch.zeros(3)).to_event(1))
        True
        >>> is_factorised(Bernoulli(0.5))
        True
    """
    if isinstance(fn, Independent):
        return len(fn.base_dist.event_shape) == 0
    return len(fn.event_shape) == 0


def per_dimension_log_prob(fn: Distribution, value: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each position of the rightmost event dimension, shape ``(..., D)``.

    For ``Independent(base, n)`` the log-density of ``base`` summed over every event dimension but
    the rightmost one; a distribution without event dimensions is one position (``D = 1``).

    Example:
        >>> from pyro.distributions import Normal
        >>> fn = Normal(torch.zeros(2, 3), 1.0).to_event(2)
        >>> per_dimension_log_prob(fn, torch.zeros(2, 3)).shape
        torch.Size([3])
    """
    if not is_factorised(fn):
        raise TypeError(f"{type(fn).__name__} does not factorise over its event dimension")
    if isinstance(fn, Independent):
        log_prob = fn.base_dist.log_prob(value)
        extra = fn.reinterpreted_batch_ndims - 1
        return log_prob.sum(tuple(range(-1 - extra, -1))) if extra else log_prob
    return fn.log_prob(value).unsqueeze(-1)


def importance_log_weights(
    log_lik: torch.Tensor,
    mask: torch.Tensor | None,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Self-normalised log-weights :math:`\log \bar w_k` of particles given the visible part.

    :math:`w_k = p(x_R \mid z_k)\, p(z_k) / q(z_k)`; shapes as in
    :func:`snis_conditional_log_prob` (``mask=None``: nothing hidden, :math:`R` is every
    dimension). Returns ``(S, K, *batch)``, normalised over ``K``.

    Example:
        >>> log_lik = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.5]]]))  # S'=1, K=2, D=2
        >>> importance_log_weights(log_lik, torch.tensor([[True, False]])).exp()
        tensor([[0.5000, 0.5000]])
    """
    if mask is None:
        log_w = log_lik.sum(-1)
    else:
        # A product with the 0/1 visibility is ~10x faster than a broadcast where(), but makes
        # NaN of an infinite log-likelihood at a hidden position: then where() decides.
        log_w = (log_lik * (~mask).unsqueeze(1).to(log_lik.dtype)).sum(-1)
        if not _all_finite(log_w):
            visible = ~mask.unsqueeze(1)
            log_w = torch.where(visible, log_lik, torch.zeros_like(log_lik)).sum(-1)
    if log_weights is not None:
        log_w = log_w + log_weights
    return log_w.log_softmax(1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Kish's effective sample size :math:`1 / \sum_k \bar w_k^2` of normalised log-weights
    ``(S, K, *batch)``, over dimension 1.

    Example:
        >>> effective_sample_size(torch.full((1, 4), 0.25).log())
        tensor([4.])
    """
    return (-torch.logsumexp(2 * log_weights, dim=1)).exp()


def snis_conditional_log_prob(
    log_lik: torch.Tensor,
    mask: torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Self-normalised importance-sampling estimates of :math:`\log p(x_j \mid x_R)`.

    Args:
        log_lik: :math:`\log p(x_j \mid z_k)`, shape ``(S', K, *batch, D)`` with ``S'`` either 1
            (particles shared by every mask, e.g. drawn from the prior) or ``S``.
        mask: boolean ``(S, *batch, D)``, ``True`` at masked (hidden) positions.
        log_weights: optional :math:`\log p(z_k) - \log q(z_k)`, broadcastable to
            ``(S, K, *batch)``; omit it when the particles are drawn from the prior.

    Returns:
        ``(S, *batch, D)``: the estimate at masked positions, zero elsewhere.

    Example:
        >>> log_lik = torch.log(torch.tensor([[[0.5, 0.5]]]))  # S'=1, K=1, D=2
        >>> snis_conditional_log_prob(log_lik, torch.tensor([[True, False]]))
        tensor([[-0.6931,  0.0000]])
    """
    return snis_estimate(log_lik, mask, log_weights).conditionals


class SNISEstimate(NamedTuple):
    """:func:`snis_estimate`'s result.

    Example:
        >>> estimate = snis_estimate(torch.zeros(1, 4, 1, 2), torch.tensor([[[True, False]]]))
        >>> estimate.conditionals, estimate.bias  # equal likelihoods: nothing to correct
        (tensor([[[0., 0.]]]), 0.0)
    """

    #: ``(S, *batch, D)``: :math:`\log \hat p(x_j \mid x_R)` at masked positions, zero elsewhere.
    conditionals: torch.Tensor
    #: ``(S, K, *batch)``: the normalised log-weights :math:`\log \bar w_k`.
    log_weights: torch.Tensor
    #: The estimated first-order bias that ``conditionals`` corrects, averaged over the masked
    #: positions (nats per masked dimension): a measure of how far K is from making it negligible.
    bias: float
    #: ``(S, *batch)``: Kish's effective sample size of the weights (detached).
    effective_sample_size: torch.Tensor


def snis_estimate(
    log_lik: torch.Tensor, mask: torch.Tensor, log_weights: torch.Tensor | None = None
) -> SNISEstimate:
    r""":func:`snis_conditional_log_prob` with the normalised weights and the estimated bias.

    Example:
        >>> log_lik = torch.tensor([[[[0.0]], [[-4.0]]]])  # S'=1, K=2, batch 1, D=1
        >>> estimate = snis_estimate(log_lik, torch.tensor([[[True]]]))
        >>> round(estimate.bias, 3), estimate.log_weights.exp()
        (0.232, tensor([[[0.5000],
                 [0.5000]]]))
    """
    log_w = importance_log_weights(log_lik, mask, log_weights)
    conditionals, bias, inverse_ess = _corrected_conditionals(log_w, log_lik, mask)
    masked = mask.sum().clamp_min(1)
    return SNISEstimate(
        conditionals, log_w, float(bias.abs().sum() / masked), inverse_ess.reciprocal()
    )


def weighted_conditional_log_prob(
    log_weights: torch.Tensor, log_lik: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \sum_k \bar w_k\, p(x_j \mid z_k)` from normalised log-weights
    (:func:`importance_log_weights`), less its first-order bias: the step of
    :func:`snis_conditional_log_prob` after the weights, for callers that also need the weights.

    The log of the ratio :math:`\hat N_j / \hat D` of two importance-sampling means is biased
    by :math:`\tfrac12(\mathrm{Var}\,\hat D/D^2 - \mathrm{Var}\,\hat N_j/N_j^2) + O(K^{-2})`
    (the delta method); the estimate adds back :math:`\tfrac12(1/\mathrm{ESS}_{N_j} -
    1/\mathrm{ESS}_D)`, the same quantity estimated from the particles (see
    :attr:`SNISEstimate.bias`), which leaves a bias of order :math:`K^{-2}`. On latent PPCA
    (D = 6, noise 0.3, Laplace proposals, K = 128) this took the error from 0.09 to 0.03 nats per
    row.

    Example:
        >>> log_lik = torch.log(torch.tensor([[[0.5, 0.5]]]))
        >>> weighted_conditional_log_prob(torch.zeros(1, 1), log_lik, torch.tensor([[True, False]]))
        tensor([[-0.6931,  0.0000]])
    """
    return _corrected_conditionals(log_weights, log_lik, mask)[0]


def _corrected_conditionals(log_weights, log_lik, mask):
    r"""The corrected conditionals and the correction :math:`\tfrac12(1/\mathrm{ESS}_{N_j} -
    1/\mathrm{ESS}_D)`, both zero where unmasked, and :math:`1/\mathrm{ESS}_D` ``(S, *batch)``
    (the last two detached)."""
    terms = log_weights.unsqueeze(-1) + log_lik
    # One exponential serves both sums (30-40% faster than two logsumexps, forward and back).
    shift = terms.detach().amax(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    scaled = (terms - shift).exp()
    total = scaled.sum(1)
    log_numerator = total.log() + shift.squeeze(1)
    inverse_ess_numerator = scaled.square().sum(1) / total.square()
    inverse_ess = log_weights.exp().square().sum(1)
    correction = torch.where(
        mask, 0.5 * (inverse_ess_numerator - inverse_ess.unsqueeze(-1)), 0.0
    )
    conditional = torch.where(mask, log_numerator, 0.0) + correction
    return conditional, correction.detach(), inverse_ess.detach()


def laplace_approximation(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    steps: int = 2,
    min_precision: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mode and curvature of a batch of log-densities on :math:`\mathbb{R}^L` by Newton's method.

    Each step solves :math:`\mathbf H \delta = \nabla f` with :math:`\mathbf H = -\nabla^2 f`,
    both by automatic differentiation (one Hessian-vector product per coordinate, batched), and
    moves to :math:`z + \delta`. Where an eigenvalue of :math:`\mathbf H` is below
    ``min_precision`` (a model that is not log-concave in :math:`z`, or flat: a Laplace prior
    with nothing observed), the eigenvalues are replaced by their absolute values floored there
    (and at a millionth of the largest), so the step still climbs and the Gaussian is never
    wider than that. For a Gaussian prior and a likelihood linear-Gaussian in :math:`z` one step
    is exact.

    Args:
        log_density: maps ``z`` ``(*batch, L)`` to ``(*batch,)``; element ``b`` may depend only on
            ``z[b]`` (the rows of a plate, the draws of masks).
        start: ``(*batch, L)``, e.g. the prior mean.
        steps: Newton steps.
        min_precision: the smallest eigenvalue allowed, broadcastable to ``(*batch,)`` (e.g. the
            inverse of the prior's largest variance).

    Returns:
        ``(mode, precision)``: the last iterate ``(*batch, L)`` and :math:`\mathbf H` at the
        iterate before it ``(*batch, L, L)`` (detached), so that :math:`\mathcal{N}(\text{mode},
        \mathbf H^{-1})` is the Laplace approximation.

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> target = MultivariateNormal(torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.5],
        ...                                                                      [0.5, 1.0]]))
        >>> mode, precision = laplace_approximation(target.log_prob, torch.zeros(2), steps=1)
        >>> torch.allclose(mode, target.mean), torch.allclose(precision, target.precision_matrix)
        (True, True)
    """
    z = start.detach()
    size = z.shape[-1]
    basis = torch.eye(size, dtype=z.dtype, device=z.device)
    basis = basis.reshape(size, *(1,) * (z.dim() - 1), size).expand(size, *z.shape)
    for _ in range(steps):
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            (grad,) = torch.autograd.grad(log_density(z).sum(), z, create_graph=True)
            try:  # all L Hessian-vector products in one vectorised backward pass
                (hessian,) = torch.autograd.grad(grad, z, basis, is_grads_batched=True)
            except RuntimeError:  # an operation without a batching rule: one pass each
                hessian = torch.stack([
                    torch.autograd.grad(grad, z, basis[i], retain_graph=True)[0]
                    for i in range(size)
                ])
        precision = -hessian.movedim(0, -2).detach()
        precision = _floor_eigenvalues(0.5 * (precision + precision.mT), min_precision)
        step = torch.linalg.solve(precision, grad.detach().unsqueeze(-1)).squeeze(-1)
        z = z.detach() + step
    if not bool(torch.isfinite(z).all()):
        raise ValueError(
            "Newton's method for the Laplace approximation did not stay finite: the model's "
            "log-density is not finite near the prior mean of a local latent"
        )
    return z, precision


def _floor_eigenvalues(matrix: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    """``matrix`` where its eigenvalues are at least ``floor`` (one Cholesky factorisation tells);
    elsewhere the matrix with absolute eigenvalues floored there, at a millionth of the largest,
    and at the dtype's resolution."""
    floor = torch.as_tensor(floor, dtype=matrix.dtype, device=matrix.device)
    floor = floor.expand(matrix.shape[:-2])
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    _, info = torch.linalg.cholesky_ex(matrix - floor[..., None, None] * eye)
    failed = info != 0
    if not bool(failed.any()):
        return matrix
    values, vectors = torch.linalg.eigh(matrix[failed])
    values = values.abs()
    least = torch.maximum(floor[failed], 1e-6 * values.amax(-1))
    least = least.clamp_min(torch.finfo(matrix.dtype).eps)
    values = torch.maximum(values, least.unsqueeze(-1))
    repaired = matrix.clone()
    repaired[failed] = (vectors * values.unsqueeze(-2)) @ vectors.mT
    return repaired


def targets_log_marginal(scheme: MaskScheme) -> bool:
    r"""Whether ``scheme`` estimates :math:`\log p(x)` itself (cumulative, stratified, exhaustive).

    Example:
        >>> from pyro_mpt.masks import FixedRate
        >>> targets_log_marginal(Cumulative()), targets_log_marginal(FixedRate(0.15))
        (True, False)
    """
    if isinstance(scheme, RateRange):
        return scheme.low == 0.0 and scheme.high == 1.0
    return isinstance(scheme, (Cumulative, Stratified, Exhaustive))
