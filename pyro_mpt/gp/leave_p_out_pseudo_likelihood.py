r"""Leave-p-out pseudo-likelihood of an exact GP: one masking rate, every point predicted once.

With :math:`p = \mathrm{round}(\rho n)` and :math:`S(\mathbf y; p)` the average over held-out sets
of size p of the mean log predictive density of a held-out point given the others,

.. math::

    \mathcal L_p(\theta) = S(\mathbf y; p) + \tfrac{1}{n} \log p(\theta), \qquad
    S(\mathbf y; p) = \binom{n}{p}^{-1} \sum_{|M| = p} \frac{1}{p}
        \sum_{j \in M} \log p(y_j \mid \mathbf y_{R}, \mathbf X, \theta).

Each call estimates :math:`S(\mathbf y; p)` without bias by splitting a random permutation of the
data into :math:`F = \lfloor n/p \rfloor` folds of size p and predicting each fold from the rest
(when p divides n, every observation is predicted exactly once). With :math:`p = 1` the folds are
all the singletons and :math:`\mathcal L_1` is exactly
:class:`gpytorch.mlls.LeaveOneOutPseudoLikelihood` (Rasmussen & Williams, 2006, §5.4.2).

Unlike :class:`~pyro_mpt.gp.MaskedPretrainingMLL` this is not an estimate of the marginal
likelihood: :math:`n\,S(\mathbf y; p)` over-estimates it at small p and under-estimates it at
large p (Moreno-Muñoz et al., 2023).

References:
    C. E. Rasmussen, C. K. I. Williams, "Gaussian Processes for Machine Learning", MIT Press, 2006.
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks import MaskSample, _check_rate, size_for_rate
from ._masked_exact_mll import MaskedExactMLL

__all__ = ["LeavePOutPseudoLikelihood", "fold_masks"]


class LeavePOutPseudoLikelihood(MaskedExactMLL):
    r"""Leave-p-out cross-validation objective of an exact GP, p = round(rate n).

    Shares one Cholesky factor of :math:`\mathbf K + \sigma^2 \mathbf I` across the
    :math:`\lfloor n/p \rfloor` folds of a call; each fold then costs
    :math:`O(\min(p, n - p)^3)`. With ``rate`` at most ``1/n`` this is leave-one-out and
    deterministic and equals :class:`gpytorch.mlls.LeaveOneOutPseudoLikelihood` at every n: both
    use GPyTorch's Cholesky factor, jitter included, and neither switches to CG/Lanczos above
    ``gpytorch.settings.max_cholesky_size``. Otherwise the folds are random (seed them with
    ``generator``).

    Args:
        likelihood: a Gaussian likelihood.
        model: the ``gpytorch.models.ExactGP``.
        rate: fraction of the data held out at a time, in (0, 1].
        generator: ``torch.Generator`` for reproducible folds.

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
        >>> l5po = LeavePOutPseudoLikelihood(likelihood, model, rate=0.25)  # p = 5, 4 folds
        >>> loss = -l5po(model(train_x), train_y)
        >>> loss.backward()
    """

    def __init__(self, likelihood, model, rate: float, generator: torch.Generator | None = None):
        _check_rate("rate", rate)
        super().__init__(likelihood, model, generator)
        self.rate = float(rate)

    def draw_masks(
        self,
        event_size: int,
        batch_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> MaskSample:
        size = size_for_rate(self.rate, event_size)
        return fold_masks(size, event_size, batch_shape, self.generator, dtype, device)


def fold_masks(
    size: int,
    event_size: int,
    batch_shape: Sequence[int] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> MaskSample:
    r"""Disjoint random masks of ``size`` dimensions each, covering all but ``D mod size`` of them.

    Each mask is marginally a uniform ``size``-subset, so with weight :math:`D / (F\,\text{size})`
    (F folds) the weighted masked sum is unbiased for :math:`D\,S(x; \text{size})`. Independent
    permutations per batch element; ``size == 1`` needs no randomness (every singleton).

    The permutations are drawn on the generator's device (so a seeded CPU generator gives the same
    folds whatever the target device), the result is built on ``device`` (default: the
    generator's, else the CPU).

    Example:
        >>> fold_masks(2, 5).masks.sum(-1).tolist()
        [2, 2]
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    num_folds = event_size // size
    if size == 1:
        ranks = torch.arange(event_size, device=device).expand(*batch_shape, event_size)
    else:
        draw_device = generator.device if generator is not None else device
        noise = torch.rand(*batch_shape, event_size, generator=generator, device=draw_device)
        ranks = noise.argsort(-1).argsort(-1).to(device)
    folds = torch.arange(num_folds, device=device).reshape(-1, *[1] * (len(batch_shape) + 1))
    masks = ranks.div(size, rounding_mode="floor") == folds
    weight = event_size / (num_folds * size)
    dtype = dtype or torch.get_default_dtype()
    weights = torch.full(masks.shape[:-1], weight, dtype=dtype, device=device)
    # Folds of one permutation are exchangeable: one stratum.
    return MaskSample(masks, weights, torch.zeros(num_folds, dtype=torch.long, device=device))
