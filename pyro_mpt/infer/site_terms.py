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
  :math:`K \to \infty`, bias :math:`O(1/K)`; with the prior as proposal
  :math:`w_k = p(x_R \mid z_k)`);
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
)

from ..masks import Cumulative, Exhaustive, MaskScheme, RateRange, Stratified

__all__ = [
    "is_collapsed_gaussian",
    "is_factorised",
    "per_dimension_log_prob",
    "importance_log_weights",
    "effective_sample_size",
    "snis_conditional_log_prob",
    "weighted_conditional_log_prob",
    "fit_gaussian_proposal",
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
    return weighted_conditional_log_prob(
        importance_log_weights(log_lik, mask, log_weights), log_lik, mask
    )


def weighted_conditional_log_prob(
    log_weights: torch.Tensor, log_lik: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \sum_k \bar w_k\, p(x_j \mid z_k)` from normalised log-weights
    (:func:`importance_log_weights`): the step of :func:`snis_conditional_log_prob` after the
    weights, for callers that also need the weights (e.g. their effective sample size).

    Example:
        >>> log_lik = torch.log(torch.tensor([[[0.5, 0.5]]]))
        >>> weighted_conditional_log_prob(torch.zeros(1, 1), log_lik, torch.tensor([[True, False]]))
        tensor([[-0.6931,  0.0000]])
    """
    conditional = torch.logsumexp(log_weights.unsqueeze(-1) + log_lik, dim=1)
    return torch.where(mask, conditional, torch.zeros_like(conditional))


def fit_gaussian_proposal(
    particles: torch.Tensor, log_weights: torch.Tensor, spread: torch.Tensor, widen: float = 2.0
) -> MultivariateNormal:
    r"""A Gaussian proposal matched to weighted particles: the next round of adaptive importance
    sampling (population Monte Carlo, Cappé et al. 2004).

    Args:
        particles: :math:`z_k`, ``(S', K, *batch, L)``.
        log_weights: normalised :math:`\log \bar w_k`, ``(S, K, *batch)``.
        spread: ``(..., L, L)`` covariance of the initial (prior) particles; a hundredth of it is
            added so that a proposal fitted to a few particles cannot collapse.
        widen: the weighted covariance is multiplied by it (heavier coverage of the tails).

    Returns:
        A ``MultivariateNormal`` of batch shape ``(S, *batch)`` and event ``(L,)`` (detached).

    Example:
        >>> z = torch.tensor([[[0.0], [2.0]]])  # S'=1, K=2, L=1
        >>> q = fit_gaussian_proposal(z, torch.full((1, 2), 0.5).log(), torch.eye(1))
        >>> q.mean, q.covariance_matrix
        (tensor([[1.]]), tensor([[[2.0100]]]))
    """
    weights = log_weights.detach().exp().unsqueeze(-1)  # (S, K, *batch, 1)
    particles = particles.detach()
    mean = (weights * particles).sum(1)
    centred = particles - mean.unsqueeze(1)
    covariance = (weights.unsqueeze(-1) * centred.unsqueeze(-1) * centred.unsqueeze(-2)).sum(1)
    covariance = widen * covariance + 0.01 * spread.detach()
    return MultivariateNormal(mean, covariance)


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
