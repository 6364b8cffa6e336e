r"""Exact per-dimension masked conditionals of Gaussian distributions.

For :math:`x \sim \mathcal{N}(\mu, \Sigma)`, a mask :math:`M` (the hidden dimensions) and the rest
:math:`R`, each masked dimension is scored on its own against the visible part:

.. math::

    \log p(x_j \mid x_R), \quad j \in M, \qquad
    x_M \mid x_R \sim \mathcal{N}\big(x_M - \Lambda_{MM}^{-1}[\Lambda(x - \mu)]_M,\;
    \Lambda_{MM}^{-1}\big), \quad \Lambda = \Sigma^{-1},

of which only the diagonal of the covariance enters. Three routes, each exact:

* **full covariance** (``MultivariateNormal``): one Cholesky factor of :math:`\Sigma` per call
  (the distribution's own ``scale_tril``), then per mask either the *precision route*
  (Cholesky of the :math:`m \times m` block :math:`\Lambda_{MM}`) or the *conditioning route*
  (Cholesky of the :math:`|R| \times |R|` block :math:`\Sigma_{RR}`), whichever is smaller; masks
  are grouped by size so each group is one batched factorisation.
* **low rank plus diagonal** (``LowRankMultivariateNormal``, :math:`\Sigma = WW^\top + \Psi`): the
  masked dimensions are independent given the latent :math:`z`, so with
  :math:`P_R = I + W_R^\top \Psi_R^{-1} W_R` (:math:`K \times K`, Woodbury)

  .. math::

      x_j \mid x_R \sim \mathcal{N}\big(\mu_j + W_j P_R^{-1} W_R^\top \Psi_R^{-1}(x_R - \mu_R),\;
      \Psi_j + W_j P_R^{-1} W_j^\top\big);

  no :math:`D \times D` matrix is formed unless :math:`K \ge D`.
* **diagonal** (``Normal(...).to_event(1)``): the conditionals are the marginals.

With :math:`m = 1` the precision route is the leave-one-out formula of
``gpytorch.mlls.LeaveOneOutPseudoLikelihood``
(:math:`\sigma_i^2 = 1/\Lambda_{ii}`, :math:`\mu_i = x_i - [\Lambda(x - \mu)]_i / \Lambda_{ii}`).
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

__all__ = [
    "masked_conditional_log_prob",
    "masked_conditional_normal",
    "full_rank_conditionals",
    "low_rank_conditionals",
    "event_size",
    "batch_shape_of",
]

_SUPPORTED = (
    "MultivariateNormal, LowRankMultivariateNormal or Normal(...).to_event(1) "
    "(torch.distributions or pyro.distributions)"
)


def event_size(dist) -> int:
    """The size D of the maskable (rightmost event) dimension of a supported Gaussian.

    Example:
        >>> import pyro.distributions as dist
        >>> event_size(dist.Normal(torch.zeros(3), 1.0).to_event(1))
        3
    """
    if isinstance(dist, (MultivariateNormal, LowRankMultivariateNormal)):
        return dist.event_shape[-1]
    if (
        isinstance(dist, Independent)
        and isinstance(dist.base_dist, Normal)
        and dist.reinterpreted_batch_ndims == 1
    ):
        return dist.event_shape[-1]
    raise TypeError(f"dist must be a {_SUPPORTED}; got {type(dist).__name__}")


def masked_conditional_normal(dist, value: torch.Tensor, mask: torch.Tensor):
    r"""Mean and variance of :math:`x_j \mid x_R` for every masked :math:`j`.

    Args:
        dist: a ``MultivariateNormal``, ``LowRankMultivariateNormal`` or
            ``Normal(...).to_event(1)`` with event shape ``(D,)``.
        value: the data, shape broadcastable to ``dist.batch_shape + (D,)``.
        mask: boolean tensor ``(..., D)`` broadcastable against ``value``; ``True`` marks the
            hidden dimensions. Leading dimensions (e.g. one per mask draw) batch the computation.

    Returns:
        ``(mean, variance)``, each of the broadcast shape of ``mask``, ``value`` and the
        distribution. Entries at unmasked positions are the value itself and zero variance.

    Example:
        >>> cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> d = MultivariateNormal(torch.zeros(2), cov)
        >>> mean, var = masked_conditional_normal(d, torch.tensor([1.0, 0.0]),
        ...                                       torch.tensor([False, True]))
        >>> round(mean[1].item(), 4), round(var[1].item(), 4)
        (0.5, 1.5)
    """
    size = event_size(dist)
    _check_value_and_mask(value, mask, size, dist.batch_shape)
    if isinstance(dist, LowRankMultivariateNormal):
        mean, var = low_rank_conditionals(
            dist.loc,
            value,
            mask,
            # The unbroadcast factors: a plate's expand() must not multiply the work per row.
            cov_factor=dist._unbroadcasted_cov_factor,
            cov_diag=dist._unbroadcasted_cov_diag,
        )
    elif isinstance(dist, MultivariateNormal):
        mean, var = full_rank_conditionals(
            dist.loc, value, mask, scale_tril=dist._unbroadcasted_scale_tril
        )
    else:
        base = dist.base_dist
        shape = torch.broadcast_shapes(mask.shape, value.shape, base.loc.shape)
        mean, var = base.loc.expand(shape), base.scale.pow(2).expand(shape)
    return torch.where(mask, mean, value), torch.where(mask, var, torch.zeros_like(var))


def masked_conditional_log_prob(dist, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Per-dimension masked conditional log-densities :math:`\log p(x_j \mid x_R)`.

    Each masked dimension is conditioned on the unmasked ones only (not on the other masked
    ones): the quantity whose average over masks and mask sizes sums to :math:`\log p(x)`.
    Differentiable in the distribution's parameters and in ``value``.

    Args:
        dist: a supported Gaussian (see :func:`masked_conditional_normal`).
        value: the data, ``(..., D)``.
        mask: boolean ``(..., D)``; every row must mask at least one dimension.

    Returns:
        Tensor of the broadcast shape ``(..., D)``: the conditional log-density at masked
        positions and zero elsewhere, so ``.sum(-1)`` is the masked sum.

    Example:
        >>> import pyro.distributions as dist
        >>> d = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> lp = masked_conditional_log_prob(d, torch.zeros(3), torch.tensor([True, False, True]))
        >>> lp.tolist() == [Normal(0.0, 1.0).log_prob(torch.tensor(0.0)).item(), 0.0, lp[2].item()]
        True
    """
    mean, var = masked_conditional_normal(dist, value, mask)
    scale = torch.where(mask, var, torch.ones_like(var)).sqrt()
    log_prob = Normal(mean, scale, validate_args=False).log_prob(value.expand_as(mean))
    return torch.where(mask, log_prob, torch.zeros_like(log_prob))


def low_rank_conditionals(
    loc: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    *,
    cov_factor: torch.Tensor,
    cov_diag: torch.Tensor,
):
    r"""Per-dimension conditionals for :math:`\Sigma = WW^\top + \mathrm{diag}(\psi)`.

    Cost per mask :math:`O(DK^2 + K^3)`; memory :math:`O(K^2)` per mask beyond the output.
    Falls back to :func:`full_rank_conditionals` when :math:`K \ge D`.

    Returns:
        ``(mean, variance)`` at every position (valid where ``mask`` is ``True``).

    Example:
        >>> W, psi = torch.ones(3, 1), torch.ones(3)
        >>> mean, var = low_rank_conditionals(torch.zeros(3), torch.ones(3),
        ...                                   torch.tensor([True, False, False]),
        ...                                   cov_factor=W, cov_diag=psi)
        >>> round(mean[0].item(), 4), round(var[0].item(), 4)
        (0.6667, 1.3333)
    """
    if not bool((cov_diag > 0).all()):
        raise ValueError(
            "dist.cov_diag must be strictly positive: a zero diagonal makes the covariance singular"
        )
    size, rank = cov_factor.shape[-2:]
    if rank >= size:
        covariance = cov_factor @ cov_factor.mT + torch.diag_embed(cov_diag)
        return full_rank_conditionals(loc, value, mask, covariance=covariance)
    dtype = cov_factor.dtype
    visible_precision = (~mask).to(dtype) / cov_diag  # diag of Psi_R^{-1}, zero on masked dims
    # Outer products W_j W_j^T flattened, so that sum_j w_j W_j W_j^T is one matrix product.
    outer = (cov_factor.unsqueeze(-1) * cov_factor.unsqueeze(-2)).flatten(-2)
    eye = torch.eye(rank, dtype=dtype, device=cov_factor.device)
    precision = eye + (visible_precision.unsqueeze(-2) @ outer).squeeze(-2).unflatten(
        -1, (rank, rank)
    )
    chol = _cholesky(precision)
    projected = ((visible_precision * (value - loc)).unsqueeze(-2) @ cov_factor).mT
    latent_mean = torch.cholesky_solve(projected, chol).mT
    latent_cov = torch.cholesky_inverse(chol).flatten(-2).unsqueeze(-2)
    # Row vectors times (possibly unbatched) matrices: torch folds these into one matrix product
    # instead of broadcasting W over every mask.
    mean = loc + (latent_mean @ cov_factor.mT).squeeze(-2)
    var = cov_diag + (latent_cov @ outer.mT).squeeze(-2)
    return mean, var


def full_rank_conditionals(
    loc: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    *,
    covariance: torch.Tensor | None = None,
    scale_tril: torch.Tensor | None = None,
):
    r"""Per-dimension conditionals for a dense covariance, sharing one Cholesky factor.

    Give ``scale_tril`` (the lower Cholesky factor of :math:`\Sigma`) when you have it, else
    ``covariance``. Masks are grouped by size; a group of size m pays :math:`O(\min(m, D-m)^3)`
    per mask (precision route if :math:`m \le D - m`, conditioning route otherwise).

    Returns:
        ``(mean, variance)`` at every position (valid where ``mask`` is ``True``; elsewhere the
        value and zero).

    Example:
        >>> cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> mean, var = full_rank_conditionals(torch.zeros(2), torch.tensor([1.0, 0.0]),
        ...                                    torch.tensor([False, True]), covariance=cov)
        >>> round(mean[1].item(), 4), round(var[1].item(), 4)
        (0.5, 1.5)
    """
    if scale_tril is None:
        if covariance is None:
            raise TypeError("full_rank_conditionals needs covariance or scale_tril")
        scale_tril = _cholesky(covariance)
    if covariance is None:
        covariance = scale_tril @ scale_tril.mT
    size = scale_tril.shape[-1]
    matrix_batch = scale_tril.shape[:-2]
    residual = value - loc
    batch = torch.broadcast_shapes(mask.shape[:-1], residual.shape[:-1], matrix_batch)
    flat_mask = mask.expand(*batch, size).reshape(-1, size)
    flat_residual = residual.expand(*batch, size).reshape(-1, size)
    flat_loc = loc.expand(*batch, size).reshape(-1, size)
    flat_value = flat_loc + flat_residual
    # Index of each flattened row into the (unexpanded) batch of covariance matrices.
    matrix_index = (
        torch.arange(matrix_batch.numel(), device=mask.device)
        .reshape(matrix_batch)
        .expand(batch)
        .reshape(-1)
    )
    flat_cov = covariance.reshape(-1, size, size)
    num_masked = flat_mask.sum(-1)
    # Masked indices first, then visible ones, each in increasing order.
    order = torch.argsort((~flat_mask).to(torch.int8), dim=-1, stable=True)

    mean = flat_loc.clone()
    var = torch.zeros_like(flat_residual)
    flat_precision = precision_residual = None
    for m in num_masked.unique().tolist():
        rows = (num_masked == m).nonzero().squeeze(-1)
        masked, visible = order[rows, :m], order[rows, m:]
        cov_index = matrix_index[rows]
        if m <= size - m:
            if flat_precision is None:
                precision = torch.cholesky_inverse(scale_tril)
                flat_precision = precision.reshape(-1, size, size)
                # Row vector times the (symmetric) precision: with an unbatched covariance this is
                # one matrix product, and the mask dimensions are only broadcast afterwards.
                precision_residual = (
                    (residual.unsqueeze(-2) @ precision).squeeze(-2).expand(*batch, size)
                ).reshape(-1, size)
            block = flat_precision[cov_index[:, None, None], masked[:, :, None], masked[:, None, :]]
            block_cov = torch.cholesky_inverse(_cholesky(block))
            shift = block_cov @ precision_residual[rows].gather(-1, masked).unsqueeze(-1)
            group_mean = flat_value[rows].gather(-1, masked) - shift.squeeze(-1)
            group_var = block_cov.diagonal(dim1=-2, dim2=-1)
        else:
            group_mean = flat_loc[rows].gather(-1, masked)
            group_var = flat_cov[cov_index[:, None], masked, masked]
            if size - m > 0:
                chol = _cholesky(
                    flat_cov[cov_index[:, None, None], visible[:, :, None], visible[:, None, :]]
                )
                cross = flat_cov[cov_index[:, None, None], visible[:, :, None], masked[:, None, :]]
                whitened_cross = torch.linalg.solve_triangular(chol, cross, upper=False)
                whitened_residual = torch.linalg.solve_triangular(
                    chol, flat_residual[rows].gather(-1, visible).unsqueeze(-1), upper=False
                )
                group_mean = group_mean + (whitened_cross.mT @ whitened_residual).squeeze(-1)
                group_var = group_var - whitened_cross.pow(2).sum(-2)
        mean = mean.index_put((rows[:, None], masked), group_mean)
        var = var.index_put((rows[:, None], masked), group_var)
    return mean.reshape(*batch, size), var.reshape(*batch, size)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        raise ValueError(
            "dist has a singular (not positive-definite) covariance: its Cholesky factorisation "
            "failed; add jitter to the diagonal or check the parameters"
        )
    return chol


def batch_shape_of(dist, value: torch.Tensor) -> torch.Size:
    """Check ``value`` against a supported Gaussian and return the broadcast batch shape."""
    size = event_size(dist)
    _check_value(value, size)
    try:
        return torch.broadcast_shapes(value.shape[:-1], dist.batch_shape)
    except RuntimeError as error:
        raise ValueError(
            f"value of shape {tuple(value.shape)} does not broadcast against the distribution's "
            f"batch shape {tuple(dist.batch_shape)}"
        ) from error


def _check_value(value, size: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(
            f"value must have trailing dimension D={size} (the distribution's event size), "
            f"got shape {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError("value contains NaN or infinite entries")


def _check_value_and_mask(value, mask, size: int, batch_shape: torch.Size) -> None:
    _check_value(value, size)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a boolean torch.Tensor (True = masked)")
    if mask.dim() == 0 or mask.shape[-1] != size:
        raise ValueError(
            f"mask must have trailing dimension D={size}, got shape {tuple(mask.shape)}"
        )
    try:
        torch.broadcast_shapes(mask.shape, value.shape, batch_shape + (size,))
    except RuntimeError as error:
        raise ValueError(
            f"mask {tuple(mask.shape)}, value {tuple(value.shape)} and the distribution's batch "
            f"shape {tuple(batch_shape)} do not broadcast"
        ) from error
    if not bool(mask.any(-1).all()):
        raise ValueError("mask has a row with no masked dimension; every row needs at least one")
