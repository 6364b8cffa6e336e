r"""Masked conditional log-densities of one dense Gaussian, with their gradient in closed form.

For :math:`\mathbf y \sim \mathcal N(\boldsymbol\mu, \boldsymbol\Sigma)` and masks
:math:`M_1, \dots, M_S` (visible sets :math:`R_s`) this computes

.. math::

    F_s = \sum_{j \in M_s} \log \mathcal N(y_j;\ \mathbb E[y_j \mid \mathbf y_{R_s}],\
    \mathrm{Var}[y_j \mid \mathbf y_{R_s}])

and, in the backward pass, :math:`\partial F / \partial \boldsymbol\Sigma` and
:math:`\partial F / \partial \mathbf e` (:math:`\mathbf e = \mathbf y - \boldsymbol\mu`) directly,
never differentiating through a Cholesky factorisation. With :math:`\ell_j` a masked term,
:math:`g^v_j = \partial \ell_j / \partial v_j` and :math:`g^d_j = \partial \ell_j / \partial d_j`
(:math:`v` the conditional variance, :math:`d` the deviation from the conditional mean), a mask
is scored by the cheaper of two exact routes:

* **precision** (small :math:`M`): :math:`C = (\boldsymbol\Lambda_{MM})^{-1}` with
  :math:`\boldsymbol\Lambda = \boldsymbol\Sigma^{-1}` shared by all masks,
  :math:`v = \mathrm{diag}\,C`, :math:`d = C \boldsymbol\alpha_M`
  (:math:`\boldsymbol\alpha = \boldsymbol\Lambda \mathbf e`).
  The masks' gradients with respect to :math:`(\boldsymbol\Lambda, \boldsymbol\alpha)`,
  :math:`H = -C\,\mathrm{diag}(g^v)\,C - (C g^d) d^\top` and :math:`\gamma = C g^d`, are
  accumulated into one :math:`n \times n` matrix and pulled back once:
  :math:`\partial F/\partial\boldsymbol\Sigma = -\boldsymbol\Lambda (H + \gamma \mathbf e^\top)
  \boldsymbol\Lambda`, :math:`\partial F/\partial \mathbf e = \boldsymbol\Lambda\gamma`.
* **conditioning** (small :math:`R`): with :math:`A = \boldsymbol\Sigma_{MR}
  \boldsymbol\Sigma_{RR}^{-1}`, :math:`P = [I_M, -A]` and :math:`\mathbf b = [0_M;
  \boldsymbol\Sigma_{RR}^{-1}\mathbf e_R]`, the conditional covariance is
  :math:`P\boldsymbol\Sigma P^\top` and :math:`d = P\mathbf e`, so
  :math:`\partial F/\partial\boldsymbol\Sigma = P^\top \mathrm{diag}(g^v) P -
  \mathrm{sym}(P^\top g^d\,\mathbf b^\top)` and :math:`\partial F/\partial\mathbf e = P^\top g^d`,
  all within the rows and columns of the mask's own blocks.

Both routes condition on :math:`\mathbf L \mathbf L^\top` for the given Cholesky factor
:math:`\mathbf L` (GPyTorch's, jitter included): the precision route through :math:`\mathbf L`, the
conditioning route through the blocks of :math:`\boldsymbol\Sigma` with the diagonal of
:math:`\mathbf L \mathbf L^\top`. The gradient flows to :math:`\boldsymbol\Sigma`, not to
:math:`\mathbf L` (jitter is constant).

**Accuracy.** The blocks of :math:`\boldsymbol\Sigma` agree with those of
:math:`\mathbf L \mathbf L^\top` only to rounding, which conditioning amplifies by
:math:`\kappa = \mathrm{cond}(\boldsymbol\Sigma)`. When power iteration shows
:math:`\kappa\,\epsilon \ge 10^{-3}` in the input's dtype (a near-noiseless float32 GP), every
mask takes the precision route, through :math:`\mathbf L` alone, in float64; otherwise the
input's dtype is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["masked_gaussian_log_prob_sums"]


def masked_gaussian_log_prob_sums(
    covariance: Tensor, scale_tril: Tensor, residual: Tensor, masks: Tensor
) -> Tensor:
    r"""Per-mask :math:`\sum_{j \in M_s} \log p(y_j \mid \mathbf y_{R_s})`, shape ``(S, *batch)``.

    Args:
        covariance: :math:`\boldsymbol\Sigma`, ``(*batch, n, n)``, differentiable.
        scale_tril: a lower Cholesky factor of ``covariance`` (plus any jitter on the diagonal),
            ``(*batch, n, n)``; not differentiated.
        residual: :math:`\mathbf y - \boldsymbol\mu`, ``(*batch, n)``, differentiable.
        masks: boolean ``(S, *batch, n)``, ``True`` = held out (predicted from the others).

    Example:
        >>> cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> masks = torch.tensor([[False, True]])
        >>> value = torch.tensor([1.0, 0.0], dtype=cov.dtype)
        >>> sums = masked_gaussian_log_prob_sums(cov, torch.linalg.cholesky(cov), value, masks)
        >>> expected = torch.distributions.Normal(0.5, 1.5**0.5).log_prob(torch.tensor(0.0))
        >>> bool(torch.isclose(sums[0], expected.double()))
        True
    """
    batch = torch.broadcast_shapes(covariance.shape[:-2], residual.shape[:-1], masks.shape[1:-1])
    size = covariance.shape[-1]
    covariance = covariance.expand(*batch, size, size).reshape(-1, size, size)
    scale_tril = scale_tril.detach().expand(*batch, size, size).reshape(-1, size, size)
    residual = residual.expand(*batch, size).reshape(-1, size)
    masks = masks.expand(masks.shape[0], *batch, size).reshape(masks.shape[0], -1, size)
    sums = []
    for b in range(covariance.shape[0]):
        factor = scale_tril[b]
        well_conditioned = _condition_estimate(factor) * torch.finfo(factor.dtype).eps < 1e-3
        wide = factor.dtype if well_conditioned else torch.float64
        sums.append(
            _MaskedGaussianScore.apply(
                covariance[b].to(wide),
                factor.to(wide),
                residual[b].to(wide),
                masks[:, b],
                well_conditioned,
            ).to(covariance.dtype)
        )
    return torch.stack(sums, -1).reshape(masks.shape[0], *batch)


def _condition_estimate(factor: Tensor, iterations: int = 4) -> float:
    r""":math:`\mathrm{cond}(\mathbf L \mathbf L^\top)` by power iteration on the matrix and its
    inverse (triangular products and solves, :math:`O(n^2)` each). An under-estimate: 0.77-0.98
    of the true value on RBF kernel matrices (n = 12-2000, noise 1e-5-1), enough to tell
    :math:`\kappa\epsilon` from the threshold; each iteration reads the factor four times, which
    at n = 500 costs as much as a Cholesky."""
    start = torch.randn(
        factor.shape[-1], 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    ).to(factor)
    largest = smallest_inverse = start
    for _ in range(iterations):
        largest = factor @ (factor.mT @ largest)
        largest = largest / largest.norm()
        smallest_inverse = _solve(factor, smallest_inverse)
        smallest_inverse = smallest_inverse / smallest_inverse.norm()
    top = (factor.mT @ largest).square().sum()
    bottom = torch.linalg.solve_triangular(factor, smallest_inverse, upper=False).square().sum()
    return float(top * bottom)


def _solve(factor: Tensor, vectors: Tensor) -> Tensor:
    """``(L L^T)^{-1} vectors`` by two triangular solves (``cholesky_solve`` costs ~10x more on a
    few right-hand sides)."""
    inner = torch.linalg.solve_triangular(factor, vectors, upper=False)
    return torch.linalg.solve_triangular(factor.mT, inner, upper=True)


def _log_normal(deviation: Tensor, variance: Tensor) -> Tensor:
    return -0.5 * (math.log(2 * math.pi) + variance.log() + deviation.square() / variance)


def _prefers_precision(num_masked: int, num_visible: int) -> bool:
    """Forward + backward flops of the two routes: ~2 m^3 against ~r^3/3 + 3 r^2 m."""
    return 2 * num_masked**3 <= num_visible**3 / 3 + 3 * num_visible**2 * num_masked


def _cholesky(matrix: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool(info.any()):
        raise ValueError(
            "a block of the covariance is not positive definite in "
            f"{matrix.dtype}: the covariance is too ill-conditioned; use float64 or raise the "
            "noise (or gpytorch.settings.cholesky_jitter)"
        )
    return factor


class _MaskedGaussianScore(torch.autograd.Function):
    """``(covariance, scale_tril (n, n), residual (n,), masks (S, n)) -> (S,)``; see the module
    docstring."""

    @staticmethod
    def forward(
        ctx,
        covariance: Tensor,
        factor: Tensor,
        residual: Tensor,
        masks: Tensor,
        condition_on_blocks: bool,
    ) -> Tensor:
        size = covariance.shape[-1]
        diagonal = factor.square().sum(-1)  # of factor @ factor.T: jitter included
        num_masked = masks.sum(-1)
        order = torch.argsort((~masks).to(torch.int8), dim=-1, stable=True)
        sums = residual.new_zeros(masks.shape[0])
        precision = alpha = None
        groups = []
        for m in num_masked.unique().tolist():
            if m == 0:
                continue
            rows = (num_masked == m).nonzero().squeeze(-1)
            masked, visible = order[rows, :m], order[rows, m:]
            if m < size and (not condition_on_blocks or _prefers_precision(m, size - m)):
                if precision is None:
                    precision = torch.cholesky_inverse(factor)
                    alpha = _solve(factor, residual.unsqueeze(-1)).squeeze(-1)
                block = _block(precision, masked)
                # Leave-one-out (m = 1) needs no factorisation: one batched LAPACK call per row
                # costs more than the division.
                inverse = block.reciprocal() if m == 1 else torch.cholesky_inverse(_cholesky(block))
                variance = inverse.diagonal(dim1=-2, dim2=-1)
                deviation = (inverse @ alpha[masked].unsqueeze(-1)).squeeze(-1)
                saved = (inverse,)
            else:
                visible_block = _block(covariance, visible)
                visible_block.diagonal(dim1=-2, dim2=-1).copy_(diagonal[visible])
                visible_factor = _cholesky(visible_block)
                cross = covariance[visible.unsqueeze(-1), masked.unsqueeze(-2)]  # (k, r, m)
                whitened = torch.linalg.solve_triangular(visible_factor, cross, upper=False)
                whitened_residual = torch.linalg.solve_triangular(
                    visible_factor, residual[visible].unsqueeze(-1), upper=False
                )
                variance = diagonal[masked] - whitened.square().sum(-2)
                deviation = residual[masked] - (whitened.mT @ whitened_residual).squeeze(-1)
                saved = (visible, visible_factor, whitened, whitened_residual)
            if not bool((variance > 0).all() and torch.isfinite(deviation).all()):
                raise ValueError(
                    "the masked conditionals are not finite or have non-positive variance: the "
                    f"covariance is too ill-conditioned for {covariance.dtype}; use float64 or "
                    "raise the noise"
                )
            sums[rows] = _log_normal(deviation, variance).sum(-1)
            groups.append((rows, masked, saved, deviation, variance))
        ctx.groups = groups
        ctx.save_for_backward(residual, precision, alpha)
        return sums

    @staticmethod
    def backward(ctx, grad_sums: Tensor):
        residual, precision, alpha = ctx.saved_tensors
        size = residual.shape[-1]
        grad_covariance = residual.new_zeros(size, size)
        grad_residual = torch.zeros_like(residual)
        precision_columns, precision_blocks = [], []
        grad_alpha = torch.zeros_like(residual)
        for rows, masked, saved, deviation, variance in ctx.groups:
            grad = grad_sums[rows].unsqueeze(-1)
            grad_variance = grad * 0.5 * (deviation.square() / variance - 1) / variance
            grad_deviation = -grad * deviation / variance
            if len(saved) == 1:  # precision route: H_s and gamma_s
                (inverse,) = saved
                inverse_grad_deviation = inverse @ grad_deviation.unsqueeze(-1)  # (k, m, 1)
                block = -(inverse * grad_variance.unsqueeze(-2)) @ inverse
                precision_blocks.append(block - inverse_grad_deviation @ deviation.unsqueeze(-2))
                precision_columns.append(masked)
                grad_alpha.index_put_(
                    (masked,), inverse_grad_deviation.squeeze(-1), accumulate=True
                )
            else:
                _add_conditioning_grads(
                    grad_covariance, grad_residual, masked, saved, grad_variance, grad_deviation
                )
        if precision_columns:
            # dF/dSigma = -Lambda (H + gamma e^T) Lambda, dF/de = Lambda gamma.
            pulled = _sandwich(precision, precision_columns, precision_blocks)
            precision_grad_alpha = precision @ grad_alpha
            grad_covariance -= pulled + torch.outer(precision_grad_alpha, alpha)
            grad_residual += precision_grad_alpha
        grad_covariance = 0.5 * (grad_covariance + grad_covariance.mT)
        return grad_covariance, None, grad_residual, None, None


def _add_conditioning_grads(
    grad_covariance: Tensor,
    grad_residual: Tensor,
    masked: Tensor,
    saved: tuple[Tensor, ...],
    grad_variance: Tensor,
    grad_deviation: Tensor,
) -> None:
    r"""Add :math:`P^\top \mathrm{diag}(g^v) P - \mathrm{sym}(P^\top g^d \mathbf b^\top)` and
    :math:`P^\top g^d` of a group of conditioning-route masks, block by block."""
    visible, visible_factor, whitened, whitened_residual = saved
    # A^T = Sigma_RR^{-1} Sigma_RM and beta = Sigma_RR^{-1} e_R, both (k, r, .).
    regression = torch.linalg.solve_triangular(visible_factor.mT, whitened, upper=True)
    beta = torch.linalg.solve_triangular(visible_factor.mT, whitened_residual, upper=True)
    regressed_grad = regression @ grad_deviation.unsqueeze(-1)  # A^T g^d: (k, r, 1)
    cross = -grad_variance.unsqueeze(-1) * regression.mT - 0.5 * (
        grad_deviation.unsqueeze(-1) * beta.mT
    )  # (k, m, r)
    visible_block = (regression * grad_variance.unsqueeze(-2)) @ regression.mT
    visible_block = visible_block + 0.5 * (regressed_grad @ beta.mT + beta @ regressed_grad.mT)
    rows_m, rows_r = masked.unsqueeze(-1), visible.unsqueeze(-1)
    for index, block in (
        ((masked, masked), grad_variance),  # the diagonal of the (M, M) block
        ((rows_m, rows_r.mT), cross),
        ((rows_r, rows_m.mT), cross.mT),
        ((rows_r, rows_r.mT), visible_block),
    ):
        grad_covariance.index_put_(index, block, accumulate=True)
    grad_residual.index_put_((masked,), grad_deviation, accumulate=True)
    grad_residual.index_put_((visible,), -regressed_grad.squeeze(-1), accumulate=True)


def _sandwich(precision: Tensor, columns: list[Tensor], blocks: list[Tensor]) -> Tensor:
    r""":math:`\boldsymbol\Lambda H \boldsymbol\Lambda` for :math:`H = \sum_s E_s H_s E_s^\top`:
    :math:`\sum_s (\boldsymbol\Lambda_{:,M_s} H_s) \boldsymbol\Lambda_{M_s,:}`, one
    :math:`n \times T` by :math:`T \times n` product (:math:`T = \sum_s |M_s|`), or two
    :math:`n \times n` products when T is large."""
    size = precision.shape[-1]
    if sum(c.numel() for c in columns) >= 2 * size:
        dense = torch.zeros_like(precision)
        for c, h in zip(columns, blocks, strict=True):
            dense.index_put_((c.unsqueeze(-1), c.unsqueeze(-2)), h, accumulate=True)
        return precision @ dense @ precision
    left = torch.cat(
        [
            (precision[:, c.flatten()].unflatten(-1, c.shape).movedim(-2, 0) @ h)  # (k, n, m)
            .movedim(0, -2)
            .flatten(-2)
            for c, h in zip(columns, blocks, strict=True)
        ],
        -1,
    )
    return left @ precision[torch.cat([c.flatten() for c in columns])]


def _block(matrix: Tensor, index: Tensor) -> Tensor:
    """The principal blocks ``matrix[index, index]``, ``(k, m, m)`` for ``index`` ``(k, m)``."""
    return matrix[index.unsqueeze(-1), index.unsqueeze(-2)]
