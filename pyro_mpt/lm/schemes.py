r"""Two mask schemes for sequences: stratified over size bins, and masked diffusion's time sampling.

Both are :class:`~pyro_mpt.masks.MaskScheme` subclasses, so their draws go through
:meth:`~pyro_mpt.masks.MaskSample.estimate` like every other scheme's, and both estimate
:math:`\log p(x) = \sum_{m=1}^{D} S(x; m)`:

* :class:`StratifiedBins` (the default of :func:`~pyro_mpt.lm.score_texts`) splits the sizes
  :math:`1..D` into at most ``max_strata`` contiguous bins and draws a size uniformly inside every
  bin. With one size per bin it is :class:`~pyro_mpt.masks.Stratified`; with one bin,
  :class:`~pyro_mpt.masks.Cumulative`. Bins keep a long text's minimum cost (two masks per
  stratum for a standard error) at ``2 * max_strata`` forward passes instead of ``2 * D``, and
  still remove the variance *between* masking rates, which dominates the cumulative scheme's.
* :class:`DiffusionTime` is how a masked diffusion LM estimates its NELBO (MDLM, Sahoo et al.
  2024, with the linear schedule): :math:`t \sim U(0, 1)`, each token masked with probability t,
  the masked sum weighted by :math:`1/t`. Because
  :math:`\int_0^1 \binom{D}{k} t^{k-1} (1-t)^{D-k}\,dt = 1/k`, its expectation is
  :math:`\sum_k S(x; k)`, the same target. It is unbiased but its variance is infinite (a
  single masked token at small t contributes :math:`\ell / t`, and :math:`\int dt / t` diverges
  logarithmically); the sample standard error still behaves in practice, but converges slowly.
  It is here as the baseline a diffusion-LM user knows, not as a recommendation.
"""

from __future__ import annotations

import torch

from ..masks import MaskScheme, _check_positive_int, _masks_from_noise

__all__ = ["DiffusionTime", "StratifiedBins"]


class StratifiedBins(MaskScheme):
    r"""Masks stratified over at most ``max_strata`` contiguous bins of mask sizes.

    The sizes :math:`1..D` are split into :math:`K = \min(\text{max\_strata}, D)` bins of (nearly)
    equal width, bin h holding the :math:`n_h` sizes :math:`\lfloor hD/K \rfloor + 1 ..
    \lfloor (h+1)D/K \rfloor`. Each draw picks a size m uniformly in its bin and a uniform mask of
    that size, weighted :math:`n_h / (P m)` (P = ``masks_per_stratum``), so that

    .. math::

        \mathbb{E}\Big[\sum_s w_s \sum_{j \in M_s} \log p(x_j \mid x_{R_s})\Big]
        = \sum_h \sum_{m \in \text{bin } h} S(x; m) = \log p(x).

    A standard error needs two draws per bin (``masks_per_stratum >= 2`` or ``num_masks >= 2``).
    With ``K = D`` no size is drawn (each bin is one size) and the masks are exactly those
    :class:`~pyro_mpt.masks.Stratified` draws from the same generator.

    Args:
        max_strata: the most bins; texts with at most this many tokens get one bin per size.
        masks_per_stratum: masks per bin in one replicate.
        shared: one mask per draw for every row of a batch (see
            :class:`~pyro_mpt.masks.MaskScheme`).

    Example:
        >>> draw = StratifiedBins(max_strata=3).sample(
        ...     7, num_masks=2, generator=torch.Generator().manual_seed(0))
        >>> StratifiedBins(max_strata=3).bins(7)
        (tensor([1, 3, 5]), tensor([2, 4, 7]))
        >>> draw.strata.tolist()
        [0, 0, 1, 1, 2, 2]
    """

    def __init__(self, max_strata: int = 32, masks_per_stratum: int = 1, shared: bool = False):
        super().__init__(shared)
        _check_positive_int("max_strata", max_strata)
        _check_positive_int("masks_per_stratum", masks_per_stratum)
        self.max_strata = max_strata
        self.masks_per_stratum = masks_per_stratum

    def bins(self, event_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and largest mask size of every bin, two long tensors ``(K,)``."""
        _check_positive_int("event_size", event_size)
        count = min(self.max_strata, event_size)
        edges = torch.arange(count + 1) * event_size // count
        return edges[:-1] + 1, edges[1:]

    def _draw(self, event_size, row_shape, num_masks, source):
        low, high = self.bins(event_size)
        per_stratum = self.masks_per_stratum * num_masks
        strata = torch.arange(len(low)).repeat_interleave(per_stratum)
        source = source.draws(len(strata))
        shape = (len(strata), *row_shape)
        widths = (high - low + 1)[strata].reshape(-1, *[1] * len(row_shape)).expand(shape)
        sizes = low[strata].reshape(-1, *[1] * len(row_shape)).expand(shape)
        if bool((widths > 1).any()):  # one size per bin draws nothing here: Stratified's masks
            uniform = source.rand(*shape).to(torch.float64).cpu()
            sizes = sizes + (uniform * widths).floor().long()
        weights = widths.to(torch.float64) / (self.masks_per_stratum * sizes.to(torch.float64))
        return _masks_from_noise(sizes, source.rand(*shape, event_size).cpu()), weights, strata


class DiffusionTime(MaskScheme):
    r"""Masked diffusion's NELBO estimator: :math:`t \sim U(0, 1]`, mask each token with
    probability t, weight :math:`1/t`.

    With a time-independent denoiser and the linear schedule, the continuous-time NELBO of MDLM
    (Sahoo et al., 2024) and MD4 (Shi et al., 2024) is minus this scheme's target,
    :math:`\sum_{k=1}^{D} S(x; k)`. A draw that masks nothing contributes 0 (and costs no forward
    pass in :func:`~pyro_mpt.lm.score_texts`). The estimator is unbiased with infinite variance
    (see the module notes); MDLM's training code also spreads t over a batch and clips it at
    :math:`10^{-3}`, which this plain version does not.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> draw = DiffusionTime().sample(1000, num_masks=1, generator=generator)
        >>> rate = draw.masks.double().mean()      # the drawn t
        >>> bool(abs(draw.weights[0] * rate - 1) < 0.1)  # weight 1/t
        True
    """

    def _draw(self, event_size, row_shape, num_masks, source):
        source = source.draws(num_masks)
        shape = (num_masks, *row_shape)
        times = 1.0 - source.rand(*shape).to(torch.float64)
        masks = source.rand(*shape, event_size) < times.unsqueeze(-1)
        return masks, 1.0 / times, torch.zeros(num_masks, dtype=torch.long, device=masks.device)
