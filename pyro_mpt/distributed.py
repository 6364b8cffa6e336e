r"""Estimates over rows spread across processes (``torch.distributed``: Lightning DDP, torchrun).

In data-parallel training every process holds a shard of the rows. A masked pre-training
estimate of the mean log-likelihood per datum and its standard error must be those of all the
rows: averaging each process's standard error instead is wrong (for a mean over P equal shards it
is :math:`\sqrt{P}` times too large, and with unequal shards not even that). The per-row
contributions are therefore gathered first, and the estimate computed once from them, in the one
place estimates are computed (:meth:`pyro_mpt.masks.MaskSample.estimate`, ``gather=True``;
:func:`pyro_mpt.scoring.mpt_score` and :func:`pyro_mpt.evaluate.evaluate_model` pass it on).
With masks keyed by global row index (``keys=``, :func:`pyro_mpt.masks.fold_in`) the gathered
estimate equals, to float rounding, the one a single process computes on the union of the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "gather_rows"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (by Lightning, torchrun, ...).

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def gather_rows(tensor: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along ``dim``, in rank order; the same everywhere.

    The processes may hold different numbers of rows (the size along ``dim``); every other
    dimension must agree. Without a process group the tensor is returned as it is. The result
    is detached (for reporting: estimates, standard errors, tables).

    Args:
        tensor: this process's rows.
        dim: the row dimension.
        group: the process group (default: the world).

    Example:
        >>> gather_rows(torch.arange(6.0).reshape(2, 3), dim=1).shape  # one process: unchanged
        torch.Size([2, 3])
    """
    if not is_distributed():
        return tensor.detach()
    rows = tensor.detach().movedim(dim, 0).contiguous()
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros(max(counts), *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
    return gathered.movedim(0, dim)
