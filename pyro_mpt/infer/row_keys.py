r"""Randomness keyed by seed, step and global row index, for :class:`MaskedPretrainingELBO`.

Data-parallel training (PyTorch Lightning DDP, one process per device, a ``DistributedSampler``
sharding the rows) runs the same ELBO on every process over that process's rows. Drawn from one
``torch.Generator`` (or Pyro's global RNG) seeded alike on every process, the masks and
importance particles of a row would depend on its position in the local batch, hence on the
number of processes. With ``MaskedPretrainingELBO(seed=...)`` they are drawn instead from keys

.. math::

    k = \mathrm{fold\_in}(\ldots\mathrm{fold\_in}(\mathrm{fold\_in}(\mathrm{seed},
        \mathrm{step}), \mathrm{particle}) \ldots, \mathrm{row})

(:func:`pyro_mpt.masks.fold_in`), where a row is its **global index**: the ``subsample``
indices the model passes to its plate, ``pyro.plate("data", N, subsample=indices)``, read from
the trace's subsample site (a plate that is not subsampled indexes its rows ``0..N-1``). A run on
two processes then draws, for every row, exactly what a run on one process draws over the union
of their batches. A plate subsampled at random (``subsample_size=`` without ``subsample=``) has
no row identity: its sites fall back to the generator, and the ELBO says so once.

This module holds the pieces: the global indices of a trace's plates, the keys of a site's batch
dimensions, and a messenger that draws local latents from keyed normals.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from pyro.distributions import Independent, MultivariateNormal, Normal
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..masks import fold_in, keyed_normal

__all__ = ["plate_indices", "batch_keys", "name_code", "SiteKeys", "KeyedLatents", "keyed_sample"]


def name_code(name: str) -> int:
    """A stable integer for a site name (CRC-32; Python's ``hash`` differs between processes)."""
    return zlib.crc32(name.encode())


def plate_indices(*traces) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Global row indices of the traces' plates, and the names of plates subsampled at random.

    A plate's indices are global when the model chose them (``subsample=``) or when the plate is
    not subsampled (``0..N-1``); with ``subsample_size=`` alone Pyro draws them at random. A plate
    counts as random when any trace (model or guide) drew its indices.

    Example:
        >>> import pyro
        >>> def model():
        ...     pyro.plate("rows", 10, subsample=torch.tensor([4, 2]))
        ...     pyro.plate("shuffled", 10, subsample_size=3)
        >>> indices, random = plate_indices(pyro.poutine.trace(model).get_trace())
        >>> indices["rows"].tolist(), sorted(random)
        ([4, 2], ['shuffled'])
    """
    indices: dict[str, torch.Tensor] = {}
    random: set[str] = set()
    for trace in traces:
        for name, site in trace.nodes.items():
            if not site_is_subsample(site):
                continue
            fn = site["fn"]
            if fn.subsample_size is not None and fn.subsample_size < fn.size:
                random.add(name)
            elif name not in indices:
                indices[name] = site["value"]
    return {k: v for k, v in indices.items() if k not in random}, frozenset(random)


def batch_keys(
    key: torch.Tensor,
    batch_shape: torch.Size,
    frames: Iterable,
    indices: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Keys of shape ``batch_shape``: ``key`` folded with each batch dimension's index.

    A dimension that a plate with global indices occupies contributes the global index of the
    row; any other dimension (importance particles, mask draws, vectorized particles, batch
    dimensions of the distribution) its position.

    Example:
        >>> from pyro.poutine.indep_messenger import CondIndepStackFrame
        >>> frame = CondIndepStackFrame("data", -1, 2, 0)
        >>> keys = batch_keys(torch.tensor(0), torch.Size([3, 2]), [frame],
        ...                   {"data": torch.tensor([8, 5])})
        >>> bool(keys[1, 0] == fold_in(fold_in(torch.tensor(0), 1), 8))
        True
    """
    by_dim = {frame.dim: frame.name for frame in frames if frame.vectorized}
    keys = key
    for position, size in enumerate(batch_shape):
        rows = indices.get(by_dim.get(position - len(batch_shape)))
        if rows is None or rows.shape != (size,):
            rows = torch.arange(size)
        keys = fold_in(keys.unsqueeze(-1), rows.to(keys.device))
    return keys


class SiteKeys:
    """Keys for the draws of one observed site in one trace; every call gets a fresh stream.

    Args:
        key: the site's key (seed, step, particle and site name folded in).
        frames: the site's ``cond_indep_stack``.
        indices: global row indices of the plates (:func:`plate_indices`).
    """

    def __init__(self, key: torch.Tensor, frames: Iterable, indices: Mapping[str, torch.Tensor]):
        self.key, self.frames, self.indices = key, tuple(frames), indices
        self._calls = 0

    def next(self, batch_shape: torch.Size, per_row: bool = True) -> torch.Tensor:
        """Keys of shape ``batch_shape`` (``per_row=False``: one key, shape ``()``)."""
        key = fold_in(self.key, self._calls)
        self._calls += 1
        return batch_keys(key, batch_shape, self.frames, self.indices) if per_row else key


def keyed_sample(fn, keys: torch.Tensor) -> torch.Tensor | None:
    """A reparameterised draw of ``fn`` from keyed standard normals, or ``None`` when ``fn`` is
    not a Normal or MultivariateNormal (possibly expanded, masked or made ``Independent``).

    ``keys`` has shape ``fn.batch_shape``; the value is ``loc + scale * eps`` (``loc +
    scale_tril @ eps``), what ``fn.rsample()`` computes, with ``eps`` from :func:`keyed_normal`.

    Example:
        >>> fn = Normal(torch.zeros(3, 2), 1.0).to_event(1)
        >>> keyed_sample(fn, torch.arange(3)).shape
        torch.Size([3, 2])
    """
    base = fn
    while isinstance(base, (Independent, MaskedDistribution, ExpandedDistribution)):
        base = base.base_dist
    shape = fn.batch_shape + fn.event_shape
    if not isinstance(base, (Normal, MultivariateNormal)):
        return None
    noise = keyed_normal(keys, max(1, fn.event_shape.numel())).reshape(shape)
    noise = noise.to(dtype=base.loc.dtype, device=base.loc.device)
    if isinstance(base, Normal):
        return base.loc + base.scale * noise
    return base.loc + (base.scale_tril @ noise.unsqueeze(-1)).squeeze(-1)


class KeyedLatents(Messenger):
    """Draws the named latent sites from keyed normals (see :func:`keyed_sample`).

    Each draw of a site reads its own stream: ``fold_in(fold_in(key, name_code(name)), call)``,
    then the site's batch dimensions (:func:`batch_keys`). Sites that already have a value
    (replayed, conditioned, observed) are left alone, and so are sites in a randomly subsampled
    plate or with another distribution; their names are collected in :attr:`unkeyed`.

    Args:
        key: the trace's key.
        names: latent sites to key (the local latents of the observed sites).
        indices: global row indices of the plates (:func:`plate_indices`).
        random_plates: plates subsampled at random (no row identity).

    Example:
        >>> import pyro
        >>> def model():
        ...     with pyro.plate("data", 4, subsample=torch.tensor([3, 1])):
        ...         return pyro.sample("z", Normal(0.0, 1.0))
        >>> def draw():
        ...     with KeyedLatents(torch.tensor(0), {"z"}, {"data": torch.tensor([3, 1])}):
        ...         return model()
        >>> torch.equal(draw(), draw())
        True
    """

    def __init__(
        self,
        key: torch.Tensor,
        names: Iterable[str] = (),
        indices: Mapping[str, torch.Tensor] | None = None,
        random_plates: Iterable[str] = (),
    ):
        super().__init__()
        self.key = key
        self._calls: Counter[str] = Counter()
        #: latent sites drawn from Pyro's global RNG instead (see the class docstring).
        self.unkeyed: set[str] = set()
        self.bind(names, {} if indices is None else indices, random_plates)

    def bind(
        self, names: Iterable[str], indices: Mapping[str, torch.Tensor],
        random_plates: Iterable[str] = (),
    ) -> None:
        """Set the sites to key and the plates' indices (known once the first traces ran)."""
        self.names = frozenset(names)
        self.indices, self.random_plates = indices, frozenset(random_plates)

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name not in self.names or msg["is_observed"] or msg["value"] is not None:
            return
        frames = msg["cond_indep_stack"]
        if any(frame.name in self.random_plates for frame in frames):
            self.unkeyed.add(name)
            return
        key = fold_in(fold_in(self.key, name_code(name)), self._calls[name])
        self._calls[name] += 1
        value = keyed_sample(msg["fn"], batch_keys(key, msg["fn"].batch_shape, frames,
                                                   self.indices))
        if value is None:
            self.unkeyed.add(name)
            return
        msg["value"] = value
