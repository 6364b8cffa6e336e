r"""Masked pre-training objective for exact GPs: cumulative leave-p-out, an estimate of the MLL.

For an exact GP the n observations are the maskable dimensions. Hiding a set :math:`M` of them and
predicting each from the rest :math:`R` is leave-p-out cross-validation (:math:`p = |M|`); averaged
over every mask size it is the log marginal likelihood (chain rule over all orderings):

.. math::

    \log p(\mathbf y \mid \mathbf X, \theta) = \sum_{p=1}^{n} S(\mathbf y; p), \qquad
    S(\mathbf y; p) = \binom{n}{p}^{-1} \sum_{|M| = p} \frac{1}{p}
        \sum_{j \in M} \log p(y_j \mid \mathbf y_R, \mathbf X, \theta).

:class:`MaskedPretrainingMLL` returns :math:`\frac{1}{n}\big(\hat L + \log p(\theta)\big)`, where
:math:`\hat L = \sum_s w_s \sum_{j \in M_s} \log p(y_j \mid \mathbf y_{R_s})` is a mask scheme's
estimate (unbiased for the LML with :class:`~pyro_mpt.masks.Cumulative`, exact with
:class:`~pyro_mpt.masks.Exhaustive`) and priors and added loss terms enter as in
:class:`gpytorch.mlls.ExactMarginalLogLikelihood`.

References:
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
    E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 107(2), 2020.
"""

from __future__ import annotations

import torch

from ..masks import Cumulative, MaskSample, MaskScheme, _check_positive_int
from ._masked_exact_mll import MaskedExactMLL

__all__ = ["MaskedPretrainingMLL"]


class MaskedPretrainingMLL(MaskedExactMLL):
    r"""The masked pre-training (cumulative cross-validation) objective of an exact GP.

    A drop-in replacement for :class:`gpytorch.mlls.ExactMarginalLogLikelihood`, on the same scale
    (divided by the number of observations). Each call factorises :math:`\mathbf K + \sigma^2
    \mathbf I` once; a mask of p held-out points then costs :math:`O(p^3)` from the precision
    matrix, or :math:`O((n - p)^3)` by conditioning when few points are visible, and the gradient
    is pulled back to the kernel in closed form: forward and backward cost about 1.1-1.5x
    ``ExactMarginalLogLikelihood`` with 4 masks (see ``benchmarks/results``).

    With the default :class:`~pyro_mpt.masks.Cumulative` masks the value is an unbiased,
    stochastic estimate of the exact MLL: train with a decaying step size (e.g. a cosine schedule).
    With :class:`~pyro_mpt.masks.RateRange` masks it is Fong & Holmes' cumulative
    cross-validation after a preparatory phase: ``RateRange(0.0, 0.9)`` only scores predictions
    made from at least 10% of the data, dropping the terms with almost no context, which are
    dominated by the prior. Use it when the hyperparameter priors (or the GP prior itself) are
    vague or doubtful and you want a model-selection score that does not reward or punish them
    through the first few predictions. :class:`~pyro_mpt.masks.FixedRate` gives a single
    leave-p-out rate (a biased score: see :class:`LeavePOutPseudoLikelihood`).

    Like ``ExactMarginalLogLikelihood`` it works from GPyTorch's Cholesky factor of
    :math:`\mathbf K + \sigma^2 \mathbf I` and conditions on the matrix that was factorised,
    jitter included, so it succeeds wherever that does and, with
    :class:`~pyro_mpt.masks.Exhaustive` masks, equals it. Unlike it, it factorises at every n: above
    ``gpytorch.settings.max_cholesky_size`` (800), where ``ExactMarginalLogLikelihood`` returns a
    CG/Lanczos estimate, this estimates the Cholesky-exact MLL (``ExactMarginalLogLikelihood``
    inside ``gpytorch.settings.max_cholesky_size(n)``), at :math:`O(n^3)` per call.

    Args:
        likelihood: a Gaussian likelihood (``GaussianLikelihood``, ``FixedNoiseGaussianLikelihood``,
            ``MultitaskGaussianLikelihood``).
        model: the ``gpytorch.models.ExactGP``.
        masks: a :class:`~pyro_mpt.masks.MaskScheme`; default :class:`~pyro_mpt.masks.Cumulative`.
        num_masks: replicates of the scheme's draw per call and batch element (more masks, lower
            variance).
        generator: ``torch.Generator`` for reproducible masks.

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
        >>> mll = MaskedPretrainingMLL(likelihood, model, num_masks=4,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> loss = -mll(model(train_x), train_y)
        >>> loss.backward()
    """

    def __init__(
        self,
        likelihood,
        model,
        masks: MaskScheme | None = None,
        num_masks: int = 4,
        generator: torch.Generator | None = None,
    ):
        masks = Cumulative() if masks is None else masks
        if not isinstance(masks, MaskScheme):
            raise TypeError(
                f"masks must be a pyro_mpt.masks.MaskScheme, got {type(masks).__name__}"
            )
        _check_positive_int("num_masks", num_masks)
        super().__init__(likelihood, model, generator)
        self.masks = masks
        self.num_masks = num_masks

    def draw_masks(
        self,
        event_size: int,
        batch_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> MaskSample:
        return self.masks.sample(
            event_size, batch_shape, self.num_masks, self.generator, dtype, device
        )
