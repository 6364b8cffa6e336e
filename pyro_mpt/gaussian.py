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

import math

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

__all__ = [
    "as_value",
    "masked_conditional_log_prob",
    "masked_conditional_normal",
    "normal_log_prob",
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
    value = as_value(dist, value)
    deviation, var = _deviation_and_variance(dist, value, mask)
    zero = torch.zeros((), dtype=var.dtype, device=var.device)
    return value - torch.where(mask, deviation, zero), torch.where(mask, var, zero)


def _deviation_and_variance(dist, value: torch.Tensor, mask: torch.Tensor):
    """Checked ``x_j - E[x_j | x_R]`` and ``Var[x_j | x_R]``; valid at masked positions only."""
    _check_value_and_mask(value, mask, event_size(dist), dist.batch_shape)
    if isinstance(dist, LowRankMultivariateNormal):
        deviation, var = low_rank_conditionals(
            dist.loc,
            value,
            mask,
            # The unbroadcast factors: a plate's expand() must not multiply the work per row.
            cov_factor=dist._unbroadcasted_cov_factor,
            cov_diag=dist._unbroadcasted_cov_diag,
        )
    elif isinstance(dist, MultivariateNormal):
        deviation, var = full_rank_conditionals(
            dist.loc, value, mask, scale_tril=dist._unbroadcasted_scale_tril
        )
    else:
        base = dist.base_dist
        shape = torch.broadcast_shapes(mask.shape, value.shape, base.loc.shape)
        deviation, var = (value - base.loc).expand(shape), base.scale.pow(2).expand(shape)
    return deviation, var


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
    value = as_value(dist, value)
    return normal_log_prob(*_deviation_and_variance(dist, value, mask), mask)


def normal_log_prob(deviation: torch.Tensor, var: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal{N}(x_j; \mathbb{E}[x_j \mid x_R], \mathrm{Var}[x_j \mid x_R])` at
    masked positions (zero elsewhere) from the deviation :math:`x_j - \mathbb{E}[x_j \mid x_R]`;
    ``deviation`` and ``var`` are ignored at unmasked positions.

    Example:
        >>> normal_log_prob(torch.zeros(2), torch.ones(2), torch.tensor([True, False]))
        tensor([-0.9189,  0.0000])
    """
    var = torch.where(mask, var, torch.ones_like(var))
    if not bool((var > 0).all()):
        raise ValueError(
            "a masked dimension has zero conditional variance given the visible ones: dist's "
            "covariance is singular (for its dtype); add jitter to the diagonal or use float64"
        )
    log_prob = -0.5 * (deviation.pow(2) / var + var.log() + math.log(2 * math.pi))
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
        ``(deviation, variance)``: :math:`x_j - \mathbb{E}[x_j \mid x_R]` and the conditional
        variance at every position (valid where ``mask`` is ``True``).

    Example:
        >>> W, psi = torch.ones(3, 1), torch.ones(3)
        >>> deviation, var = low_rank_conditionals(torch.zeros(3), torch.ones(3),
        ...                                        torch.tensor([True, False, False]),
        ...                                        cov_factor=W, cov_diag=psi)
        >>> round(deviation[0].item(), 4), round(var[0].item(), 4)  # mean 0.6667
        (0.3333, 1.3333)
    """
    if not bool((cov_diag > 0).all()):
        raise ValueError(
            "dist.cov_diag must be strictly positive: a zero diagonal makes the covariance singular"
        )
    size, rank = cov_factor.shape[-2:]
    if rank >= size:
        covariance = cov_factor @ cov_factor.mT + torch.diag_embed(cov_diag)
        return full_rank_conditionals(loc, value, mask, covariance=covariance)
    residual = value - loc
    if cov_factor.dim() == 2 and cov_diag.dim() == 1:
        # One factor for every row (a plate's expand() of W does not count): the closed-form
        # backward, which never differentiates through the K x K factorisations.
        shape = torch.broadcast_shapes(mask.shape, residual.shape)
        deviation, var = _LowRankConditionals.apply(
            cov_factor,
            cov_diag,
            residual.expand(shape).reshape(-1, size),
            mask.expand(shape).reshape(-1, size),
        )
        return deviation.reshape(shape), var.reshape(shape)
    visible_precision = (~mask).to(cov_factor.dtype) / cov_diag  # diag of Psi_R^{-1}, 0 on M
    # Outer products W_j W_j^T flattened, so that sum_j w_j W_j W_j^T is one matrix product.
    outer = _outer_products(cov_factor)
    chol = _cholesky(_latent_precision(visible_precision, outer, rank))
    projected = ((visible_precision * residual).unsqueeze(-2) @ cov_factor).mT
    latent_mean = torch.cholesky_solve(projected, chol).mT
    latent_cov = torch.cholesky_inverse(chol).flatten(-2).unsqueeze(-2)
    # Row vectors times (possibly unbatched) matrices: torch folds these into one matrix product
    # instead of broadcasting W over every mask.
    deviation = residual - (latent_mean @ cov_factor.mT).squeeze(-2)
    var = cov_diag + (latent_cov @ outer.mT).squeeze(-2)
    return deviation, var


def _outer_products(cov_factor: torch.Tensor) -> torch.Tensor:
    """``(..., D, K) -> (..., D, K*K)``: each row's outer product with itself, flattened."""
    return (cov_factor.unsqueeze(-1) * cov_factor.unsqueeze(-2)).flatten(-2)


def _latent_precision(visible_precision, outer, rank: int) -> torch.Tensor:
    r""":math:`I + W^\top \Psi_R^{-1} W` per row, ``(..., K, K)``."""
    eye = torch.eye(rank, dtype=outer.dtype, device=outer.device)
    return eye + (visible_precision.unsqueeze(-2) @ outer).squeeze(-2).unflatten(-1, (rank, rank))


class _LowRankConditionals(torch.autograd.Function):
    r"""Rows ``(N, D)`` of deviations and variances for one factor ``W (D, K)`` and ``psi (D,)``.

    With :math:`P = I + W^\top \Psi_R^{-1} W`, :math:`S = P^{-1}`,
    :math:`b = W^\top \Psi_R^{-1} e`, :math:`\mu = S b`: deviation :math:`e - W\mu`,
    variance :math:`\psi + \mathrm{diag}(W S W^\top)`. Backward, from the gradients
    :math:`g^d, g^v` of the two outputs: :math:`\bar\mu = -W^\top g^d`,
    :math:`\bar S = W^\top \mathrm{diag}(g^v) W + \bar\mu b^\top`, :math:`\bar b = S\bar\mu`,
    :math:`\bar P = -S \bar S S`; every sum over rows is then one matrix product.
    """

    @staticmethod
    def forward(ctx, cov_factor, cov_diag, residual, mask):
        rank = cov_factor.shape[-1]
        visible_precision = (~mask).to(cov_factor.dtype) / cov_diag
        outer = _outer_products(cov_factor)  # (D, K^2)
        chol = _cholesky(_latent_precision(visible_precision, outer, rank))
        eye = torch.eye(rank, dtype=chol.dtype, device=chol.device)
        inverse_chol = torch.linalg.solve_triangular(chol, eye, upper=False)
        latent_cov = inverse_chol.mT @ inverse_chol  # S: (N, K, K); faster than cholesky_inverse
        projected = (visible_precision * residual) @ cov_factor  # b: (N, K)
        latent_mean = (latent_cov @ projected.unsqueeze(-1)).squeeze(-1)
        deviation = residual - latent_mean @ cov_factor.mT
        var = cov_diag + latent_cov.flatten(-2) @ outer.mT
        ctx.save_for_backward(
            cov_factor, cov_diag, residual, mask, outer, latent_cov, projected, latent_mean
        )
        return deviation, var

    @staticmethod
    def backward(ctx, grad_deviation, grad_var):
        cov_factor, cov_diag, residual, mask, outer, latent_cov, projected, latent_mean = (
            ctx.saved_tensors
        )
        visible = (~mask).to(cov_factor.dtype)
        visible_precision = visible / cov_diag
        grad_mean = -grad_deviation @ cov_factor  # (N, K)
        grad_cov = (grad_var @ outer).unflatten(-1, latent_cov.shape[-2:])
        grad_cov = grad_cov + grad_mean.unsqueeze(-1) * projected.unsqueeze(-2)
        grad_projected = (latent_cov @ grad_mean.unsqueeze(-1)).squeeze(-1)
        grad_precision = -latent_cov @ grad_cov @ latent_cov  # (N, K, K)
        grad_precision = grad_precision + grad_precision.mT
        back_projected = grad_projected @ cov_factor.mT  # (N, D)
        # d/d(visible precision): from P (w_d^T Pbar w_d; Pbar symmetrised above, so halve) and b.
        grad_visible_precision = (
            0.5 * (grad_precision.flatten(-2) @ outer.mT) + residual * back_projected
        )
        # d/dW: rows' K x K weights contracted with w_d, from P and from the variances; then
        # b's and the deviations' outer products.
        weights = visible_precision.mT @ grad_precision.flatten(-2) + (
            2 * grad_var
        ).mT @ latent_cov.flatten(-2)  # (D, K^2)
        grad_factor = weights.unflatten(-1, latent_cov.shape[-2:]) @ cov_factor.unsqueeze(-1)
        grad_factor = grad_factor.squeeze(-1) + (visible_precision * residual).mT @ grad_projected
        grad_factor = grad_factor - grad_deviation.mT @ latent_mean
        grad_diag = grad_var.sum(0) - (grad_visible_precision * visible_precision / cov_diag).sum(0)
        grad_residual = grad_deviation + visible_precision * back_projected
        return grad_factor, grad_diag, grad_residual, None


def full_rank_conditionals(
    loc: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    *,
    covariance: torch.Tensor | None = None,
    scale_tril: torch.Tensor | None = None,
):
    r"""Per-dimension conditionals for a dense covariance, from one Cholesky factor.

    Everything is computed from the lower Cholesky factor :math:`L` of :math:`\Sigma = LL^\top`
    (``scale_tril``; factorised from ``covariance`` when not given), never from blocks of
    :math:`\Sigma` or of an explicit inverse, so the conditionals are as accurate as
    ``MultivariateNormal.log_prob`` in the same dtype and their variances are sums of squares
    (never negative, float32 included). Give the factor that defines the distribution, e.g. the
    jittered one GPyTorch factorised. Masks are grouped by size; with :math:`r = D - m` visible
    dimensions a mask costs

    * :math:`O(D m^2)` on the **precision route** (:math:`m^2 \le r(r + m)`): with
      :math:`B = (L^{-1})_{:,M} = QR`, :math:`\Lambda_{MM} = R^\top R`, so the conditional
      covariance is :math:`R^{-1}R^{-\top}` and the mean
      :math:`x_M - R^{-1} Q^\top L^{-1}(x - \mu)`;
    * :math:`O(D r (r + m))` on the **conditioning route** otherwise: with
      :math:`L_R^\top = QR` (rows R of L), :math:`x_R - \mu_R = R^\top Q^\top \varepsilon` fixes
      :math:`Q^\top\varepsilon`, so :math:`x_j` has mean
      :math:`\mu_j + \ell_j Q R^{-\top}(x_R - \mu_R)` and variance
      :math:`\lVert \ell_j - \ell_j Q Q^\top \rVert^2` (:math:`\ell_j` row j of L).

    Returns:
        ``(deviation, variance)``: :math:`x_j - \mathbb{E}[x_j \mid x_R]` and
        :math:`\mathrm{Var}[x_j \mid x_R]` at masked positions, zero elsewhere. The deviation
        is returned rather than the mean because the precision route computes it directly, and
        re-forming it from a mean would cancel digits.

    Example:
        >>> cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> deviation, var = full_rank_conditionals(torch.zeros(2), torch.tensor([1.0, 0.0]),
        ...                                         torch.tensor([False, True]), covariance=cov)
        >>> round(deviation[1].item(), 4), round(var[1].item(), 4)  # mean 0.5
        (-0.5, 1.5)
    """
    if scale_tril is None:
        if covariance is None:
            raise TypeError("full_rank_conditionals needs covariance or scale_tril")
        scale_tril = _cholesky(covariance)
    size = scale_tril.shape[-1]
    matrix_batch = scale_tril.shape[:-2]
    residual = value - loc
    batch = torch.broadcast_shapes(mask.shape[:-1], residual.shape[:-1], matrix_batch)
    flat_mask = mask.expand(*batch, size).reshape(-1, size)
    flat_residual = residual.expand(*batch, size).reshape(-1, size)
    # Index of each flattened row into the (unexpanded) batch of factors.
    matrix_index = (
        torch.arange(matrix_batch.numel(), device=mask.device)
        .reshape(matrix_batch)
        .expand(batch)
        .reshape(-1)
    )
    flat_tril = scale_tril.reshape(-1, size, size)
    num_masked = flat_mask.sum(-1)
    # Masked indices first, then visible ones, each in increasing order.
    order = torch.argsort((~flat_mask).to(torch.int8), dim=-1, stable=True)

    deviation = torch.zeros_like(flat_residual)
    var = torch.zeros_like(flat_residual)
    inverse_tril = whitened_residual = None
    for m in num_masked.unique().tolist():
        rows = (num_masked == m).nonzero().squeeze(-1)
        masked, visible = order[rows, :m], order[rows, m:]
        factor = flat_tril[matrix_index[rows]]  # (n, D, D)
        masked_rows = factor.gather(-2, masked.unsqueeze(-1).expand(-1, -1, size))  # (n, m, D)
        r = size - m
        if r == 0:  # nothing visible: the marginals
            group_deviation = flat_residual[rows]
            group_var = masked_rows.pow(2).sum(-1)
        elif m * m <= r * (r + m):
            if inverse_tril is None:
                wide_inverse = _inverse_tril(scale_tril)
                inverse_tril = wide_inverse.to(scale_tril.dtype)
                flat_inverse = inverse_tril.reshape(-1, size, size)
                # u = L^{-1}(x - mu), in float64 too (the float32 product of a rounded inverse
                # cancels digits): with one factor, one matrix product for all rows.
                whitened_residual = (
                    (residual.to(wide_inverse.dtype).unsqueeze(-2) @ wide_inverse.mT)
                    .squeeze(-2)
                    .to(scale_tril.dtype)
                    .expand(*batch, size)
                ).reshape(-1, size)
            columns = flat_inverse[matrix_index[rows]].gather(
                -1, masked.unsqueeze(-2).expand(-1, size, -1)
            )  # (n, D, m): B = columns M of L^{-1}
            q, upper = torch.linalg.qr(columns)
            eye = torch.eye(m, dtype=upper.dtype, device=upper.device)
            upper_inverse = torch.linalg.solve_triangular(upper, eye, upper=True)
            projected = (whitened_residual[rows].unsqueeze(-2) @ q).mT  # Q^T u: (n, m, 1)
            group_deviation = (upper_inverse @ projected).squeeze(-1)
            group_var = upper_inverse.pow(2).sum(-1)
        else:
            visible_rows = factor.gather(-2, visible.unsqueeze(-1).expand(-1, -1, size))
            q, upper = torch.linalg.qr(visible_rows.mT)  # L_R^T = QR: (n, D, r), (n, r, r)
            _check_full_rank(upper)
            whitened = torch.linalg.solve_triangular(
                upper.mT, flat_residual[rows].gather(-1, visible).unsqueeze(-1), upper=False
            )
            projected = masked_rows @ q  # l_j Q: (n, m, r)
            group_deviation = flat_residual[rows].gather(-1, masked) - (
                projected @ whitened
            ).squeeze(-1)
            group_var = (masked_rows - projected @ q.mT).pow(2).sum(-1)
        deviation = deviation.index_put((rows[:, None], masked), group_deviation)
        var = var.index_put((rows[:, None], masked), group_var)
    if not bool(torch.isfinite(var).all() and torch.isfinite(deviation).all()):
        raise ValueError(
            "the masked conditionals are not finite: dist's covariance is singular or too "
            "ill-conditioned for its dtype; use float64 or add jitter to the diagonal"
        )
    return deviation.reshape(*batch, size), var.reshape(*batch, size)


def _inverse_tril(scale_tril: torch.Tensor) -> torch.Tensor:
    """:math:`L^{-1}`, computed and returned in float64 (or wider).

    An explicit inverse loses far more digits than the triangular solve inside ``log_prob``
    (measured on float32 GP kernels: 10-50x the error of ``MultivariateNormal.log_prob``);
    one inverse in float64 per call brings the precision route back to ``log_prob``'s accuracy.
    """
    wide = scale_tril.to(torch.promote_types(scale_tril.dtype, torch.float64))
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    return torch.linalg.solve_triangular(wide, eye, upper=False)


def _check_full_rank(upper: torch.Tensor) -> None:
    diagonal = upper.diagonal(dim1=-2, dim2=-1).abs()
    if bool((diagonal <= diagonal.amax(-1, keepdim=True) * torch.finfo(upper.dtype).eps).any()):
        raise ValueError(
            "dist has a singular (not positive-definite) covariance: some visible dimensions are "
            "linearly dependent; add jitter to the diagonal or check the parameters"
        )


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        raise ValueError(
            "dist has a singular (not positive-definite) covariance: its Cholesky factorisation "
            "failed; add jitter to the diagonal or check the parameters"
        )
    return chol


def as_value(dist, value) -> torch.Tensor:
    """``value`` in the floating dtype of ``dist``: integer and boolean data are promoted (as
    ``log_prob`` does); a different floating dtype is an error rather than a silent cast.

    Example:
        >>> import pyro.distributions as dist
        >>> as_value(dist.Normal(torch.zeros(2), 1.0).to_event(1), torch.tensor([1, 0])).dtype
        torch.float32
    """
    event_size(dist)  # a supported Gaussian, else a TypeError naming it
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    dtype = (dist.base_dist if isinstance(dist, Independent) else dist).loc.dtype
    if not value.is_floating_point():
        return value.to(dtype)
    if value.dtype != dtype:
        raise TypeError(
            f"value has dtype {value.dtype} but the distribution has {dtype}; convert one of them "
            f"(e.g. value.to({dtype}))"
        )
    return value


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


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum (finite only if every term is), and the
    elementwise test only when that sum is not (overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_value(value, size: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(
            f"value must have trailing dimension D={size} (the distribution's event size), "
            f"got shape {tuple(value.shape)}"
        )
    if not _all_finite(value):
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
