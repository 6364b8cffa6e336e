r"""Mask schemes: how masks and their weights are drawn.

Every scheme turns per-dimension masked conditional log-probabilities into an estimate of a sum of
masked-prediction scores. For one row :math:`x \in \mathbb{R}^D` write

.. math::

    S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_{R}),
    \qquad R = \{1..D\} \setminus M,

so that :math:`\log p(x) = \sum_{m=1}^{D} S(x; m)` (Moreno-Muñoz et al., 2023, after Fong & Holmes,
2020). A scheme draws masks :math:`M_s` and weights :math:`w_s` such that

.. math::

    \hat{L}(x) = \sum_s w_s \sum_{j \in M_s} \log p(x_j \mid x_{R_s})

estimates its target:

* :class:`Cumulative`: :math:`m \sim U\{1..D\}`, then M uniform of size m; weight :math:`D/m`;
  target :math:`\log p(x)` (unbiased).
* :class:`Stratified`: P masks for every :math:`m = 1..D`; weight :math:`1/(Pm)`; target
  :math:`\log p(x)` (unbiased, lower variance, :math:`DP` masks).
* :class:`FixedRate` (ρ): :math:`m = \mathrm{round}(\rho D)`; weight :math:`D/m`; target
  :math:`D\,S(x; \rho D)` (biased for :math:`\log p(x)`).
* :class:`RateRange` (a, b): :math:`m \sim U\{\lceil aD \rceil..\lfloor bD \rfloor\}` (L sizes);
  weight :math:`L/m`; target :math:`\sum_{m=\lceil aD \rceil}^{\lfloor bD \rfloor} S(x; m)`.
* :class:`Exhaustive`: all :math:`2^D - 1` masks; weight :math:`1/(\binom{D}{m} m)`; target
  :math:`\log p(x)`, exactly.

(weights as listed are for one draw; with ``num_masks`` draws they are divided by ``num_masks``).

Masks are drawn independently for every row of ``batch_shape`` unless the scheme is built with
``shared=True``, in which case one mask per draw is broadcast over all rows (what the paper's code
did; it is cheaper per step but has higher variance).

Masks come from a ``torch.Generator`` (one stream for the whole batch) or, with ``keys=``, from a
counter-based hash: each row's masks are then a pure function of its 64-bit key (see
:func:`fold_in`), so they do not depend on which other rows share the batch, on the batch order
or on the number of processes the rows are spread over.

References:
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
    E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 107(2), 2020.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

__all__ = [
    "MPTEstimate",
    "MaskSample",
    "MaskScheme",
    "Cumulative",
    "Stratified",
    "FixedRate",
    "RateRange",
    "Exhaustive",
    "size_for_rate",
    "stratified_estimate",
    "fold_in",
    "keyed_uniform",
    "keyed_normal",
]

EXHAUSTIVE_MAX_SIZE = 20

Reduction = Literal["none", "mean", "sum"]


class MPTEstimate(NamedTuple):
    """A Monte-Carlo estimate, its standard error and the error's degrees of freedom.

    Attributes:
        mean: the estimate (differentiable where the inputs were).
        stderr: its Monte-Carlo standard error (detached; zero for exact schemes, NaN where it
            cannot be estimated: a single draw per stratum).
        dof: degrees of freedom of ``stderr`` (``inf`` for exact schemes). Few masks give few
            degrees of freedom: use :meth:`interval`, not ``mean ± 1.96 stderr``.

    Example:
        >>> est = MPTEstimate(torch.tensor(-3.0), torch.tensor(0.1), torch.tensor(1.0))
        >>> [round(v.item(), 3) for v in est.interval(0.95)]  # Student-t with 1 dof: ± 12.7 s.e.
        [-4.271, -1.729]
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    dof: torch.Tensor | float = math.inf

    def interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Student-t confidence interval ``(low, high)`` at ``level`` (two-sided)."""
        from scipy.stats import t  # local: scipy is only needed for intervals

        if not (isinstance(level, float) and 0.0 < level < 1.0):
            raise ValueError(f"level must be a float in (0, 1), got {level!r}")
        dof = torch.as_tensor(self.dof, dtype=torch.float64).cpu().numpy()
        quantile = torch.as_tensor(t.ppf(0.5 + level / 2, dof)).to(self.stderr)
        half_width = quantile * self.stderr
        return self.mean.detach() - half_width, self.mean.detach() + half_width


def stratified_estimate(
    contributions: torch.Tensor, strata: torch.Tensor, exact: bool = False
) -> MPTEstimate:
    r"""Sum of per-draw contributions over draws (dimension 0) and its stratified standard error.

    Draws within a stratum are i.i.d., so :math:`\widehat{\mathrm{Var}} = \sum_h n_h s_h^2`
    with :math:`s_h^2` the sample variance in stratum h, on :math:`\sum_h (n_h - 1)` degrees of
    freedom. A stratum with a single draw has no variance estimate: the standard error is then
    NaN and the degrees of freedom zero (unless ``exact``).

    Example:
        >>> est = stratified_estimate(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]))
        >>> est.mean.item(), round(est.stderr.item(), 4), est.dof.item()
        (4.0, 2.0, 1.0)
    """
    mean = contributions.sum(0)
    detached = contributions.detach()
    if exact:
        return MPTEstimate(mean, torch.zeros_like(detached[0]), math.inf)
    strata = strata.to(detached.device)
    counts = torch.bincount(strata).to(detached)
    shape = (len(counts),) + detached.shape[1:]
    counts = counts.reshape(-1, *[1] * (detached.dim() - 1))
    zeros = torch.zeros(shape, dtype=detached.dtype, device=detached.device)
    stratum_mean = zeros.index_add(0, strata, detached) / counts
    squares = zeros.index_add(0, strata, (detached - stratum_mean[strata]).pow(2))
    # n_h s_h^2 = n_h / (n_h - 1) * sum of squares; NaN where n_h = 1 (no variance estimate).
    variance = torch.where(counts > 0, counts * squares / (counts - 1), zeros)
    dof = (counts - 1).clamp(min=0).sum()
    return MPTEstimate(mean, variance.sum(0).sqrt(), dof)


def _reduce(tensor: torch.Tensor, reduction: Reduction, keep: int) -> torch.Tensor:
    """Reduce all dimensions after the first ``keep`` ones."""
    dims = tuple(range(keep, tensor.dim()))
    if reduction == "none" or not dims:
        return tensor
    if reduction == "mean":
        return tensor.mean(dims)
    if reduction == "sum":
        return tensor.sum(dims)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"({generator!r}); seed one with torch.Generator().manual_seed(seed)"
        )


class MaskSample(NamedTuple):
    """Masks drawn by a :class:`MaskScheme`.

    Attributes:
        masks: boolean tensor of shape ``(num_masks, *batch_shape, D)``; ``True`` marks a masked
            (hidden, to be predicted) dimension.
        weights: tensor of shape ``(num_masks, *batch_shape)``; the estimate is
            ``(weights * masked_sum).sum(0)``.
        strata: long tensor of shape ``(num_masks,)`` naming the stratum of each draw; draws within
            a stratum are exchangeable, which is what the standard error needs.
        exact: ``True`` when the masks enumerate every term (no Monte-Carlo error).
        shared: ``True`` when every row got the same masks (rows are then not independent).
    """

    masks: torch.Tensor
    weights: torch.Tensor
    strata: torch.Tensor
    exact: bool = False
    shared: bool = False

    def weighted_sums(self, log_prob: torch.Tensor, summed: bool = False) -> torch.Tensor:
        r"""Per-draw contributions :math:`w_s \sum_{j \in M_s} \ell_{sj}`, shape ``(S, *batch)``.

        Args:
            log_prob: per-dimension (conditional) log-densities :math:`\ell`, broadcastable to
                the masks' shape ``(S, *batch, D)``; entries at unmasked positions are ignored.
            summed: ``log_prob`` already holds the masked sums :math:`\sum_{j \in M_s}
                \ell_{sj}`, shape ``(S, *batch)`` (e.g. computed by a language model).

        Their sum over draws (``.sum(0)``) is the scheme's estimate; :meth:`estimate` adds the
        standard error. This is the one place the weighted masked sum is written.

        Example:
            >>> draw = Exhaustive().sample(2)
            >>> draw.weighted_sums(torch.ones(3, 2)).sum(0)  # two dimensions of log-density 1
            tensor(2.)
        """
        if not log_prob.is_floating_point():
            raise TypeError(f"log_prob must be a floating tensor, got {log_prob.dtype}")
        if summed:
            masked_sum = log_prob
        else:
            masked_sum = torch.where(self.masks, log_prob, torch.zeros_like(log_prob)).sum(-1)
        return self.weights.to(masked_sum) * masked_sum

    def estimate(
        self,
        log_prob: torch.Tensor,
        reduction: Reduction = "none",
        summed: bool = False,
        gather: bool = False,
    ) -> MPTEstimate:
        r"""The scheme's estimate from per-dimension log-densities, with its standard error.

        Args:
            log_prob, summed: as in :meth:`weighted_sums`.
            reduction: ``"none"`` (one estimate per row), ``"mean"`` or ``"sum"`` over rows. With
                independent masks per row the rows' variances are pooled (many degrees of
                freedom); with shared masks the rows are reduced first, then the draws compared.
            gather: in a distributed run (``torch.distributed`` initialised, several processes),
                first gather every process's per-row contributions along the first batch
                dimension (:func:`pyro_mpt.distributed.gather_rows`, rank order), so that the
                estimate and its standard error are those of all the rows, never an average of
                per-process standard errors. The result is detached and the same on every
                process. With shared masks every process must have drawn the same masks (pass
                the same ``keys``, not a per-row key). Without a process group it changes
                nothing.

        Example:
            >>> draw = Cumulative().sample(3, (100,), num_masks=2,
            ...                            generator=torch.Generator().manual_seed(0))
            >>> est = draw.estimate(torch.full((3,), -1.0), reduction="mean")
            >>> round(est.mean.item(), 4), est.stderr.item(), est.dof.item()
            (-3.0, 0.0, 100.0)
        """
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        contributions = self.weighted_sums(log_prob, summed)
        if gather:
            from .distributed import gather_rows  # local: torch.distributed only when asked

            contributions = gather_rows(contributions.detach(), dim=1)
        num_rows = contributions[0].numel()
        if num_rows == 0:
            raise ValueError("there are no rows to score (the batch shape has a zero dimension)")
        if reduction == "none" or contributions.dim() == 1 or self.shared or self.exact:
            reduced = _reduce(contributions, reduction, 1)
            return stratified_estimate(reduced, self.strata, self.exact)
        # Independent masks per row: pool the rows' own variances.
        rows = stratified_estimate(contributions, self.strata)
        variance = rows.stderr.pow(2)
        mean = _reduce(rows.mean.unsqueeze(0), reduction, 1).squeeze(0)
        stderr = variance.sum().sqrt() / (num_rows if reduction == "mean" else 1)
        # Welch-Satterthwaite: rows share the scheme, so their degrees of freedom are equal.
        dof = variance.sum().pow(2) / (variance.pow(2).sum() / rows.dof)
        return MPTEstimate(mean, stderr, torch.where(variance.sum() > 0, dof, rows.dof * num_rows))


def size_for_rate(rate: float, event_size: int) -> int:
    """Masked dimensions for a masking ``rate`` in (0, 1]: ``round(rate * D)``, at least 1.

    Example:
        >>> size_for_rate(0.15, 64)
        10
    """
    _check_rate("rate", rate)
    return min(event_size, max(1, round(rate * event_size)))


def _check_rate(name: str, rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0.0 < rate <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def masks_of_sizes(
    sizes: torch.Tensor, event_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random masks with the given number of masked dimensions.

    Args:
        sizes: integer tensor of any shape, entries in ``1..event_size``.
        event_size: D.
        generator: random source.

    Returns:
        Boolean tensor of shape ``(*sizes.shape, D)`` with exactly ``sizes[...]`` entries ``True``,
        the set uniform among sets of that size.

    Example:
        >>> masks_of_sizes(torch.tensor([1, 3]), 5).sum(-1)
        tensor([1, 3])
    """
    device = sizes.device if generator is None else generator.device
    noise = torch.rand(*sizes.shape, event_size, generator=generator, device=device)
    return _masks_from_noise(sizes, noise)


def _masks_from_noise(sizes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Masks of the given sizes from i.i.d. uniforms ``noise`` of shape ``(*sizes.shape, D)``."""
    event_size = noise.shape[-1]
    if sizes.numel() > 0 and bool((sizes == sizes.flatten()[0]).all()):
        # One size: the m largest of i.i.d. uniforms form a uniform m-subset (no full sort).
        chosen = noise.topk(int(sizes.flatten()[0]), dim=-1).indices.to(sizes.device)
        masks = torch.zeros(*sizes.shape, event_size, dtype=torch.bool, device=sizes.device)
        return masks.scatter_(-1, chosen, True)
    # The first m entries of a uniformly random permutation form a uniform m-subset.
    permutation = noise.argsort(-1).to(sizes.device)
    leading = torch.arange(event_size, device=sizes.device) < sizes.unsqueeze(-1)
    return torch.zeros_like(leading).scatter_(-1, permutation, leading)


class MaskScheme(ABC):
    """Base class: draws masks and weights whose weighted masked sum estimates a target.

    Args:
        shared: draw one mask per draw and broadcast it over every row of the batch (the paper's
            choice) instead of an independent mask per row (the default, lower variance).
    """

    def __init__(self, shared: bool = False):
        self.shared = bool(shared)

    def sample(
        self,
        event_size: int,
        batch_shape: Sequence[int] = (),
        num_masks: int = 1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        keys: torch.Tensor | None = None,
    ) -> MaskSample:
        """Draw ``num_masks`` independent replicates of this scheme's basic draw.

        Args:
            event_size: D, the number of maskable dimensions (>= 1).
            batch_shape: shape of the rows the masks apply to.
            num_masks: number of replicates; weights are divided by it so the estimate stays on the
                same scale.
            generator: a ``torch.Generator`` for reproducible masks.
            dtype: floating dtype of the weights (default: ``torch.get_default_dtype()``); they
                are computed in float64 and rounded once, so a float64 model gets exact weights
                whatever the default dtype.
            device: where the masks and weights are returned (default: the generator's device,
                else the CPU). Masks are drawn on the generator's device, so a CPU generator gives
                the same masks whatever ``device`` is.
            keys: instead of a generator, an int64 tensor of shape ``batch_shape`` with one key
                per row (e.g. ``fold_in(fold_in(seed, step), rows)`` for global row indices
                ``rows``; see :func:`fold_in`); with ``shared=True``, one key (shape ``()``) for
                the whole batch. A row's masks are then a pure function of its key: the same
                whichever other rows are in the batch and on whichever process it is scored.
                Keyed masks have the same distribution as generator-drawn ones, not the same
                values.

        Returns:
            A :class:`MaskSample` with masks of shape ``(S, *batch_shape, D)``.
        """
        _check_positive_int("event_size", event_size)
        _check_positive_int("num_masks", num_masks)
        _check_generator(generator)
        if keys is not None and generator is not None:
            raise ValueError("pass a generator or keys, not both")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype of the weights must be a floating dtype, got {dtype!r}")
        batch_shape = torch.Size(batch_shape)
        row_shape = torch.Size() if self.shared else batch_shape
        if keys is None:
            source = _GeneratorSource(generator)
        else:
            source = _KeyedSource(_check_keys(keys, row_shape, self.shared))
        masks, weights, strata = self._draw(event_size, row_shape, num_masks, source)
        if self.shared:
            ones = (1,) * len(batch_shape)
            masks = masks.reshape(len(masks), *ones, event_size)
            weights = weights.reshape(len(weights), *ones)
        shape = masks.shape[:1] + batch_shape
        return MaskSample(
            masks.to(device).expand(*shape, event_size),
            (weights.expand(shape) / num_masks).to(device=device, dtype=dtype),
            strata.to(device),
            self.exact,
            self.shared,
        )

    exact = False

    @abstractmethod
    def _draw(
        self, event_size: int, row_shape: torch.Size, num_masks: int, source: _RandomSource
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return masks ``(S, *row_shape, D)``, weights ``(S, *row_shape)`` for one replicate
        each (the caller divides by ``num_masks``) and strata ``(S,)``, with uniforms from
        ``source.draws(S)``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "shared" or v)
        return f"{type(self).__name__}({args})"


class _UniformSizes(MaskScheme):
    """Mask size uniform on ``low..high``; weight ``(high - low + 1) / m``."""

    def _size_range(self, event_size: int) -> tuple[int, int]:
        raise NotImplementedError

    def _draw(self, event_size, row_shape, num_masks, source):
        low, high = self._size_range(event_size)
        source = source.draws(num_masks)
        sizes = source.randint(low, high + 1, (num_masks, *row_shape))
        weights = (high - low + 1) / sizes.to(torch.float64)
        masks = _masks_from_noise(sizes, source.rand(*sizes.shape, event_size))
        return masks, weights, torch.zeros(num_masks, dtype=torch.long)


class Cumulative(_UniformSizes):
    r"""Cumulative masked pre-training: an unbiased estimate of :math:`\log p(x)`.

    Draw :math:`m \sim U\{1..D\}`, then a uniform mask of size m, and weight the masked sum by
    :math:`D/m`.

    Example:
        >>> draw = Cumulative().sample(5, batch_shape=(3,), num_masks=2,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> draw.masks.shape, draw.weights.shape
        (torch.Size([2, 3, 5]), torch.Size([2, 3]))
    """

    def _size_range(self, event_size):
        return 1, event_size

    def _draw(self, event_size, row_shape, num_masks, source):
        # Masking each dimension with probability t, t ~ U(0, 1), gives a size uniform on 0..D
        # (Beta-Binomial(1, 1)) and, given the size, a uniform subset: redrawing the rows that
        # mask nothing leaves exactly this scheme's distribution, without sorting (5 of the
        # 49 ms of an SVI step on digits went to the argsort of masks_of_sizes).
        source = source.draws(num_masks)
        shape = (num_masks, *row_shape)
        masks = torch.empty(*shape, event_size, dtype=torch.bool, device=source.device)
        todo = torch.ones(shape, dtype=torch.bool, device=source.device)
        while bool(todo.any()):
            count = int(todo.sum())
            redrawn = source.subset(todo)
            rates = redrawn.rand(count, 1)
            masks[todo] = redrawn.rand(count, event_size) < rates
            todo = ~masks.any(-1)
        weights = event_size / masks.sum(-1).to(torch.float64)
        return masks, weights, torch.zeros(num_masks, dtype=torch.long)


class RateRange(_UniformSizes):
    r"""Masking rates restricted to ``[low, high]``: Fong & Holmes' cumulative cross-validation.

    Mask sizes are uniform on :math:`\lceil aD \rceil .. \lfloor bD \rfloor` (clamped to ``1..D``)
    and the estimate targets :math:`\sum_{m} S(x; m)` over that range. With ``high < 1`` the
    scores with almost no context (dominated by the prior) are left out: the "preparatory phase"
    that makes the score robust to a vague prior. ``RateRange(0, 1)`` is :class:`Cumulative`.

    Example:
        >>> RateRange(0.5, 1.0).sample(10, num_masks=4).masks.sum(-1).min() >= 5
        tensor(True)
    """

    def __init__(self, low: float, high: float, shared: bool = False):
        super().__init__(shared)
        if not (isinstance(low, (int, float)) and math.isfinite(low) and 0.0 <= low < 1.0):
            raise ValueError(f"low must be a number in [0, 1), got {low!r}")
        _check_rate("high", high)
        if low >= high:
            raise ValueError(f"low must be below high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def _size_range(self, event_size):
        low = max(1, math.ceil(self.low * event_size - 1e-9))
        high = min(event_size, math.floor(self.high * event_size + 1e-9))
        if low > high:
            raise ValueError(
                f"RateRange({self.low}, {self.high}) contains no mask size for D={event_size}"
            )
        return low, high


class FixedRate(MaskScheme):
    r"""A fixed masking rate (BERT's 15%): estimates :math:`D\,S(x; \mathrm{round}(\rho D))`.

    This is *not* an estimate of :math:`\log p(x)`: it over-estimates at low rates and
    under-estimates at high ones. Measured with the true PPCA (``synthetic_ppca(1000, 50, 2,
    noise_precision=5)``, seed 0, float64, 20 masks per row), where :math:`\log p(x) = -36.69`
    per datum: 15% gives -31.99 ± 0.11, 50% gives -33.02 ± 0.03, 85% gives -37.66 ± 0.04.

    Example:
        >>> FixedRate(0.15).sample(64).masks.sum(-1)
        tensor([10])
    """

    def __init__(self, rate: float, shared: bool = False):
        super().__init__(shared)
        _check_rate("rate", rate)
        self.rate = float(rate)

    def _draw(self, event_size, row_shape, num_masks, source):
        size = size_for_rate(self.rate, event_size)
        sizes = torch.full((num_masks, *row_shape), size)
        weights = torch.full(sizes.shape, event_size / size, dtype=torch.float64)
        noise = source.draws(num_masks).rand(*sizes.shape, event_size)
        masks = _masks_from_noise(sizes, noise)
        return masks, weights, torch.zeros(num_masks, dtype=torch.long)


class Stratified(MaskScheme):
    r"""``masks_per_size`` masks of every size ``m = 1..D``, each weighted :math:`1/(P m)`.

    Unbiased for :math:`\log p(x)` with lower variance than :class:`Cumulative` at the same number
    of masks, at the cost of ``D * masks_per_size`` masks per replicate. A standard error needs at
    least two masks per size (``masks_per_size >= 2`` or ``num_masks >= 2``).

    Example:
        >>> Stratified(masks_per_size=2).sample(4).masks.sum(-1).flatten().tolist()
        [1, 1, 2, 2, 3, 3, 4, 4]
    """

    def __init__(self, masks_per_size: int = 1, shared: bool = False):
        super().__init__(shared)
        _check_positive_int("masks_per_size", masks_per_size)
        self.masks_per_size = masks_per_size

    def _draw(self, event_size, row_shape, num_masks, source):
        per_size = self.masks_per_size * num_masks
        strata = torch.arange(event_size).repeat_interleave(per_size)
        sizes = (strata + 1).reshape(-1, *[1] * len(row_shape)).expand(len(strata), *row_shape)
        weights = 1.0 / (self.masks_per_size * sizes.to(torch.float64))
        noise = source.draws(len(strata)).rand(*sizes.shape, event_size)
        return _masks_from_noise(sizes, noise), weights, strata


class Exhaustive(MaskScheme):
    r"""Every non-empty mask, weighted :math:`1/(\binom{D}{m} m)`: exactly :math:`\log p(x)`.

    There are :math:`2^D - 1` masks, so this is for tests and small D (refuses D > 20).

    Example:
        >>> Exhaustive().sample(3).masks.shape
        torch.Size([7, 3])
    """

    def __init__(self):
        super().__init__(shared=True)

    exact = True

    def _draw(self, event_size, row_shape, num_masks, source):
        if event_size > EXHAUSTIVE_MAX_SIZE:
            raise ValueError(
                f"Exhaustive masks need 2^D - 1 masks; event_size={event_size} exceeds the limit "
                f"of {EXHAUSTIVE_MAX_SIZE}. Use Stratified or Cumulative instead."
            )
        codes = torch.arange(1, 2**event_size).repeat(num_masks)
        masks = ((codes.unsqueeze(-1) >> torch.arange(event_size)) & 1).bool()
        sizes = masks.sum(-1)
        binom = torch.tensor(
            [math.comb(event_size, m) for m in range(event_size + 1)],
            dtype=torch.float64,
        )
        weights = 1.0 / (binom[sizes] * sizes)
        return masks, weights, torch.arange(len(codes))

    def __repr__(self) -> str:
        return "Exhaustive()"


# ------------------------------------------------------------------------------- keyed draws
# Counter-based random numbers (splitmix64, Steele, Lea & Flood 2014; the finaliser is Stafford's
# "Mix13"), written in int64 torch ops: multiplication wraps modulo 2^64 and right shifts are
# made logical by masking, so the bit patterns are those of the uint64 reference on every device.
def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


_GAMMA = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _as_keys(value, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"keys and data must be integer tensors or ints, got {value.dtype}")
        return value.to(device=device, dtype=torch.int64)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"keys and data must be integer tensors or ints, got {value!r}")
    return torch.tensor(_signed64(value), dtype=torch.int64, device=device)


def fold_in(keys: torch.Tensor | int, data: torch.Tensor | int) -> torch.Tensor:
    r"""New 64-bit keys from ``keys`` and integer ``data``, element-wise with broadcasting.

    ``fold_in(k, d) = mix(k XOR mix(d + γ))`` with splitmix64's finaliser ``mix`` (a bijection
    of 64-bit words) and its increment γ: for a fixed key, distinct data give distinct keys, and
    keys that differ in one input look unrelated. Chain it to key anything by integers, as
    ``jax.random.fold_in`` does: ``fold_in(fold_in(seed, step), rows)`` gives each row of a step
    its own key, which :meth:`MaskScheme.sample` (``keys=``), :func:`keyed_uniform` and
    :func:`keyed_normal` turn into random numbers. Keys are int64 tensors holding the bit
    patterns of unsigned 64-bit words; ints are taken modulo :math:`2^{64}`.

    Example:
        >>> rows = torch.tensor([7, 3])
        >>> keys = fold_in(fold_in(0, 12), rows)  # seed 0, step 12, global rows 7 and 3
        >>> bool(keys[0] == fold_in(fold_in(0, 12), 7))  # a row's key ignores the other rows
        True
    """
    device = keys.device if isinstance(keys, torch.Tensor) else None
    if device is None and isinstance(data, torch.Tensor):
        device = data.device
    keys, data = _as_keys(keys, device), _as_keys(data, device)
    return _mix64(keys ^ _mix64(data + _GAMMA))


def keyed_uniform(keys: torch.Tensor | int, size: int, offset: int = 0) -> torch.Tensor:
    r"""``size`` uniforms on (0, 1) per key, float64, shape ``(*keys.shape, size)``.

    Entry ``j`` is output number ``offset + j + 1`` of splitmix64 seeded with the key, top 53
    bits: :math:`(\lfloor b / 2^{11} \rfloor + \tfrac12)\, 2^{-53}`, never 0 or 1. Each key's
    numbers depend on that key alone (and the first ``n`` do not depend on ``size``); disjoint
    ranges ``offset .. offset + size - 1`` read disjoint parts of the key's stream.

    Example:
        >>> u = keyed_uniform(fold_in(0, torch.arange(3)), 4)
        >>> u.shape, u.dtype, bool(((u > 0) & (u < 1)).all())
        (torch.Size([3, 4]), torch.float64, True)
        >>> torch.equal(keyed_uniform(fold_in(0, 1), 2), u[1, :2])
        True
    """
    _check_positive_int("size", size)
    keys = _as_keys(keys, keys.device if isinstance(keys, torch.Tensor) else None)
    steps = torch.arange(1, size + 1, dtype=torch.int64, device=keys.device)
    steps = (steps + _signed64(offset)) * _GAMMA
    bits = _mix64(keys.unsqueeze(-1) + steps)
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53


def keyed_normal(keys: torch.Tensor | int, size: int) -> torch.Tensor:
    """``size`` standard normals per key (the normal quantiles of :func:`keyed_uniform`), float64.

    Example:
        >>> z = keyed_normal(fold_in(1, torch.arange(20000)), 2)
        >>> abs(z.mean().item()) < 0.02, abs(z.std().item() - 1) < 0.02
        (True, True)
    """
    return torch.special.ndtri(keyed_uniform(keys, size))


def _check_keys(keys, row_shape: torch.Size, shared: bool) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor):
        keys = _as_keys(keys)
    if keys.is_floating_point() or keys.dtype == torch.bool:
        raise TypeError(f"keys must be an integer tensor (see fold_in), got {keys.dtype}")
    if keys.shape != row_shape:
        expected = "one key, shape ()" if shared else f"one key per row, shape {tuple(row_shape)}"
        raise ValueError(
            f"keys must hold {expected}, got shape {tuple(keys.shape)}"
            + (" (shared masks are the same on every row: pass one key)" if shared else "")
        )
    return keys.long()


class _RandomSource(ABC):
    """Uniforms for :meth:`MaskScheme._draw`: from a generator, or keyed per draw and row."""

    device: torch.device | str

    def draws(self, num: int) -> _RandomSource:
        """The source for ``num`` draws of every row (shapes then start with ``(num, *rows)``)."""
        return self

    def subset(self, where: torch.Tensor) -> _RandomSource:
        """The source for the (draw, row) pairs where ``where`` holds (shapes ``(count, ...)``)."""
        return self

    @abstractmethod
    def rand(self, *shape: int) -> torch.Tensor:
        """Uniforms on [0, 1) of ``shape``."""

    @abstractmethod
    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Integers uniform on ``low..high - 1`` of ``shape``."""


class _GeneratorSource(_RandomSource):
    """``torch.rand``/``torch.randint`` on one generator: the draws this module always made."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.device = "cpu" if generator is None else generator.device

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def randint(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.generator)


class _KeyedSource(_RandomSource):
    """Keyed uniforms: the k-th request of a source reads outputs ``k 2^32 + 1, ...`` of the
    splitmix64 stream of each (draw, row) key, so a row's numbers depend only on its key and the
    order of requests."""

    def __init__(self, keys: torch.Tensor, requests: list[int] | None = None):
        self.keys = keys
        self.device = keys.device
        self._requests = [0] if requests is None else requests  # shared with subsets

    def draws(self, num):
        index = torch.arange(num, device=self.device).reshape(num, *[1] * self.keys.dim())
        return _KeyedSource(fold_in(self.keys.unsqueeze(0), index), self._requests)

    def subset(self, where):
        return _KeyedSource(self.keys[where.to(self.device)], self._requests)

    def _stream(self, shape) -> tuple[torch.Tensor, tuple[int, ...]]:
        lead = tuple(self.keys.shape)
        if tuple(shape[: len(lead)]) != lead:
            raise RuntimeError(f"requested shape {tuple(shape)} does not start with {lead}")
        extra = tuple(shape[len(lead) :])
        if math.prod(extra) >= 2**32:
            raise RuntimeError(f"a keyed request draws < 2^32 numbers per key, got {extra}")
        request = self._requests[0]
        self._requests[0] += 1
        return request << 32, extra

    def rand(self, *shape):
        offset, extra = self._stream(shape)
        return keyed_uniform(self.keys, math.prod(extra), offset).reshape(shape)

    def randint(self, low, high, shape):
        offset, extra = self._stream(shape)
        if extra:
            raise RuntimeError("keyed randint draws one integer per (draw, row)")
        uniform = keyed_uniform(self.keys, 1, offset).squeeze(-1)
        return (low + (uniform * (high - low)).long()).clamp(max=high - 1)
