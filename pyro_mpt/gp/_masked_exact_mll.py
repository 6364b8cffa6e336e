r"""Shared machinery of the masked objectives for exact GPs.

For an exact GP with a Gaussian likelihood the targets are jointly Gaussian,
:math:`\mathbf y \sim \mathcal N(\boldsymbol\mu, \boldsymbol\Sigma)` with
:math:`\boldsymbol\Sigma = \mathbf K + \boldsymbol\Sigma_\text{noise}`, so each masked observation
has an exact predictive :math:`p(y_j \mid \mathbf y_R)` given the unmasked ones. All masks of a call
share one Cholesky factor :math:`\mathbf L` of the covariance, computed by the likelihood's
``linear_operator`` exactly as :class:`gpytorch.mlls.ExactMarginalLogLikelihood` and
:class:`gpytorch.mlls.LeaveOneOutPseudoLikelihood` compute it. The objectives score the masks
with :func:`~pyro_mpt.gp._masked_gaussian_score.masked_gaussian_log_prob_sums`, whose gradient
with respect to the covariance is in closed form (no backward pass through a Cholesky factor);
:meth:`MaskedExactMLL.conditionals` returns the predictive means and variances through
:func:`pyro_mpt.gaussian.full_rank_conditionals`, the code the Pyro objectives use.

**Jitter.** When the first factorisation fails, ``linear_operator``'s ``psd_safe_cholesky`` retries
with growing jitter on the diagonal (``gpytorch.settings.cholesky_jitter``), so :math:`\mathbf L`
factorises :math:`\boldsymbol\Sigma + \mathbf D`, not :math:`\boldsymbol\Sigma`. GPyTorch's own
objectives then score that matrix, and so do these: they condition on
:math:`\mathbf L \mathbf L^\top`.

**Size.** The factorisation is a dense Cholesky at every n (:math:`O(n^3)` time, :math:`O(n^2)`
memory). Above ``gpytorch.settings.max_cholesky_size`` (800) ``ExactMarginalLogLikelihood``
switches to a CG/Lanczos estimate; these objectives do not, so their reference there is
``ExactMarginalLogLikelihood`` evaluated inside ``gpytorch.settings.max_cholesky_size(n)``.

Multitask targets of shape ``(n, t)`` are flattened in the order of the covariance (interleaved or
not), so the ``n t`` observations are the maskable dimensions and the scale is ``n t``, as in
:class:`gpytorch.mlls.ExactMarginalLogLikelihood`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from gpytorch import settings
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import _GaussianLikelihoodBase
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.models import ExactGP
from linear_operator.operators import MaskedLinearOperator
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor

from ..gaussian import full_rank_conditionals
from ..masks import MaskSample, _check_generator
from ..threads import limit_threads_in_backward, limited_threads
from ._masked_gaussian_score import masked_gaussian_log_prob_sums

__all__ = ["MaskedExactMLL", "Observations"]


class Observations(NamedTuple):
    """The targets as one flat Gaussian vector, ``value ~ N(loc, scale_tril scale_tril^T)``:
    the factor GPyTorch computed, jitter included, and the dense ``covariance`` it factorised."""

    loc: Tensor
    value: Tensor
    scale_tril: Tensor
    covariance: Tensor

    @property
    def size(self) -> int:
        return self.value.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.value.shape[:-1], self.loc.shape[:-1])


class MaskedExactMLL(ExactMarginalLogLikelihood):
    """Base class: a weighted sum of masked conditional log-densities of the targets.

    Subclasses define :meth:`draw_masks`. Not for direct use.
    """

    def __init__(self, likelihood, model, generator: torch.Generator | None = None):
        if not isinstance(likelihood, _GaussianLikelihoodBase):
            raise TypeError(
                "likelihood must be a Gaussian likelihood (gpytorch.likelihoods.GaussianLikelihood,"
                " FixedNoiseGaussianLikelihood, MultitaskGaussianLikelihood, ...) for exact masked "
                f"prediction; got {type(likelihood).__name__}"
            )
        if not isinstance(model, ExactGP):
            raise TypeError(
                "model must be a gpytorch.models.ExactGP: masked prediction of the observations "
                f"needs the exact joint predictive; got {type(model).__name__} (for approximate "
                "GPs use gpytorch.mlls.VariationalELBO or PredictiveLogLikelihood)"
            )
        _check_generator(generator)
        super().__init__(likelihood, model)
        self.generator = generator

    def draw_masks(
        self,
        event_size: int,
        batch_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> MaskSample:
        """Masks ``(S, *batch_shape, D)`` and weights ``(S, *batch_shape)`` for one call, on
        ``device``, the weights of floating ``dtype``."""
        raise NotImplementedError

    def masked_sums(self, observations: Observations, draw: MaskSample) -> Tensor:
        r"""Per-draw :math:`\sum_{j \in M_s} \log p(y_j \mid \mathbf y_{R_s})`, ``(S, *batch)``:
        what ``draw``'s weights sum (override for other per-draw scores)."""
        return masked_gaussian_log_prob_sums(
            observations.covariance,
            observations.scale_tril,
            observations.value - observations.loc,
            draw.masks,
        )

    def num_scored(self, function_dist: MultivariateNormal, observations: Observations) -> int:
        """The divisor of the objective: n, as in ``ExactMarginalLogLikelihood``."""
        return function_dist.event_shape.numel()

    def _draw_and_sum(self, function_dist, target, *params, **kwargs):
        """The flat observations, a draw of masks and its :meth:`masked_sums`."""
        observations = _observations(self.likelihood(function_dist, *params, **kwargs), target)
        value = observations.value
        draw = self.draw_masks(
            observations.size, observations.batch_shape, value.dtype, value.device
        )
        return observations, draw, self.masked_sums(observations, draw)

    def conditionals(
        self, function_dist: MultivariateNormal, target: Tensor, mask: Tensor, *params, **kwargs
    ) -> tuple[Tensor, Tensor]:
        r"""Mean and variance of :math:`y_j \mid \mathbf y_R` for every masked observation j.

        Args:
            function_dist: :math:`p(\mathbf f)`, the output of the exact GP.
            target: :math:`\mathbf y`, without NaN.
            mask: boolean, the shape of ``target`` with optional leading dimensions (one per
                mask); ``True`` marks held-out observations, predicted from the others.

        Returns:
            ``(mean, variance)`` of the broadcast shape of ``mask`` and ``target``, including the
            observation noise; unmasked positions hold the target and zero.

        Example:
            Leave-one-out predictive means and variances of all n observations at once::

                loo = LeavePOutPseudoLikelihood(likelihood, model, rate=1 / n)
                mean, var = loo.conditionals(model(x), y, torch.eye(n, dtype=torch.bool))
                # mean[i, i], var[i, i]: the prediction of y[i] from every other observation
        """
        _check_function_dist(function_dist)
        output = self.likelihood(function_dist, *params, **kwargs)
        _check_target(output, target)
        if bool(torch.isnan(target).any()):
            raise ValueError("target contains NaN; conditionals needs complete observations")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean torch.Tensor (True = held out)")
        if mask.device != target.device:
            raise ValueError(f"mask is on {mask.device}, target on {target.device}")
        if mask.shape[mask.dim() - target.dim() :] != target.shape:
            raise ValueError(
                f"mask must end with the target's shape {tuple(target.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        flat_mask = _flatten(output, mask)
        if not bool(flat_mask.any(-1).all()):
            raise ValueError("mask must hold out at least one observation in every row")
        observations = _observations(output, target)
        deviation, var = _conditionals(observations, flat_mask)
        return _unflatten(output, observations.value - deviation), _unflatten(output, var)

    def forward(self, function_dist: MultivariateNormal, target: Tensor, *params, **kwargs):
        r"""The objective given :math:`p(\mathbf f)` and :math:`\mathbf y`, divided by n.

        Args:
            function_dist: :math:`p(\mathbf f)`, the output of the exact GP on the training inputs.
            target: :math:`\mathbf y`.
            params, kwargs: passed on to the likelihood, as in ``ExactMarginalLogLikelihood``.

        Returns:
            One value per element of the GP's batch shape (a new draw of masks on every call).
        """
        _check_function_dist(function_dist)
        with limited_threads(dense=True):
            observations, draw, sums = self._draw_and_sum(function_dist, target, *params, **kwargs)
            res = draw.weighted_sums(sums, summed=True).sum(0)
            res = self._add_other_terms(res, params)
            res = res.div_(self.num_scored(function_dist, observations))
        return limit_threads_in_backward(res, dense=True)


def _check_function_dist(function_dist) -> None:
    if not isinstance(function_dist, MultivariateNormal):
        raise TypeError(
            "function_dist must be a gpytorch.distributions.MultivariateNormal (the output of "
            f"an ExactGP), got {type(function_dist).__name__}"
        )


def _conditionals(observations: Observations, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Deviations from the conditional means, and conditional variances, of the masked targets.

    Only the Cholesky factor enters: it is the (possibly jittered) covariance GPyTorch
    factorised, so the masked objectives condition on the same matrix as its exact MLL.
    """
    return full_rank_conditionals(
        observations.loc, observations.value, mask, scale_tril=observations.scale_tril
    )


def _observations(output: MultivariateNormal, target: Tensor) -> Observations:
    """Flatten ``likelihood(function_dist)`` and the target, dropping NaN targets if asked to."""
    _check_target(output, target)
    target = target.to(output.loc.dtype)  # integer targets, promoted as log_prob does
    covariance = output.lazy_covariance_matrix
    value = _flatten(output, target)
    loc = output.loc
    if bool(torch.isnan(target).any()):
        policy = settings.observation_nan_policy.value()
        if policy == "ignore":
            raise ValueError(
                "target contains NaN. Drop those observations, or set "
                "gpytorch.settings.observation_nan_policy('mask') to leave them out of the "
                "objective"
            )
        if policy == "fill":
            raise ValueError(
                "NaN observation policy 'fill' is not supported by masked objectives (nor by "
                "ExactMarginalLogLikelihood); use 'mask'"
            )
        # As ExactMarginalLogLikelihood: a NaN in any batch element drops that observation.
        observed = ~torch.isnan(value.reshape(-1, value.shape[-1])).any(0)
        if not bool(observed.any()):
            raise ValueError("target has no observed (non-NaN) entry")
        covariance = MaskedLinearOperator(covariance, observed, observed)
        value, loc = value[..., observed], loc[..., observed]
    # GPyTorch's factorisation (its jitter settings and warnings) of the matrix, evaluated once.
    dense = covariance.to_dense()
    return Observations(loc, value, psd_safe_cholesky(dense), dense)


def _check_target(output: MultivariateNormal, target) -> None:
    """What ``output.log_prob(target)`` needs, as errors that name ``target``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    event_shape = output.event_shape
    if target.shape[target.dim() - len(event_shape) :] != event_shape:
        raise ValueError(
            f"target must end with the output's event shape {tuple(event_shape)}, "
            f"got {tuple(target.shape)}"
        )
    try:
        torch.broadcast_shapes(target.shape, output.batch_shape + event_shape)
    except RuntimeError:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not broadcast against the output's "
            f"batch shape {tuple(output.batch_shape)}"
        ) from None
    loc = output.loc
    if target.is_floating_point() and target.dtype != loc.dtype:
        raise TypeError(f"target must have the model's dtype {loc.dtype}, got {target.dtype}")
    if target.device != loc.device:
        raise ValueError(f"target must be on the model's device {loc.device}, got {target.device}")


def _flatten(output: MultivariateNormal, tensor: Tensor) -> Tensor:
    """``(..., n, t) -> (..., n t)`` in the covariance's order for multitask outputs."""
    if not isinstance(output, MultitaskMultivariateNormal):
        return tensor
    if not output._interleaved:
        tensor = tensor.mT
    return tensor.reshape(*tensor.shape[:-2], -1)


def _unflatten(output: MultivariateNormal, tensor: Tensor) -> Tensor:
    if not isinstance(output, MultitaskMultivariateNormal):
        return tensor
    num_data, num_tasks = output.event_shape
    if output._interleaved:
        return tensor.unflatten(-1, (num_data, num_tasks))
    return tensor.unflatten(-1, (num_tasks, num_data)).mT
