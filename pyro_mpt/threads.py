"""Intra-op threads for pyro_mpt's own computations, forward and backward.

Masked pre-training runs many small batched factorisations (one per mask). On the CPU, torch
spreads each over its intra-op threads, and when the threads outnumber the free cores they spin
at OpenMP barriers: on a 2-core machine with another job running, an SVI step on PPCA (digits,
K = 10) took 1124 ms with torch's default 2 threads and 132 ms with one. pyro_mpt therefore runs
its CPU work (the forward computations and, through the tensors they return, the backward pass
that the caller starts) with at most :func:`thread_limit` threads, one by default, and restores
the caller's setting afterwards. CUDA work is not affected.

Example:
    >>> import torch
    >>> from pyro_mpt.threads import limited_threads, set_thread_limit, thread_limit
    >>> thread_limit()
    1
    >>> with limited_threads():
    ...     torch.get_num_threads()
    1
    >>> set_thread_limit(None)  # let torch decide, as without pyro_mpt
    >>> set_thread_limit(1)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["limited_threads", "limit_threads_in_backward", "set_thread_limit", "thread_limit"]

_limit: int | None = 1


def thread_limit() -> int | None:
    """The most intra-op threads pyro_mpt's computations use (``None``: torch's setting)."""
    return _limit


def set_thread_limit(limit: int | None) -> None:
    """Set the most intra-op threads pyro_mpt's CPU computations use; ``None`` lifts the limit.

    Raise it for large problems on an otherwise idle many-core machine (e.g. an exact GP with
    n in the thousands); keep it at 1 for the small batched work of most models.
    """
    global _limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    _limit = limit


@contextmanager
def limited_threads() -> Iterator[None]:
    """Run the block with at most :func:`thread_limit` intra-op threads, then restore."""
    previous = torch.get_num_threads()
    if _limit is None or previous <= _limit:
        yield
        return
    torch.set_num_threads(_limit)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _LimitThreadsInBackward(torch.autograd.Function):
    """Identity whose backward lowers the thread count for the rest of the backward pass."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        previous = torch.get_num_threads()
        if _limit is not None and previous > _limit:
            torch.set_num_threads(_limit)
            # Restored when the engine finishes this backward pass (as DDP schedules its work).
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: torch.set_num_threads(previous)
            )
        return grad


def limit_threads_in_backward(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, but a backward pass through it runs with :func:`limited_threads`.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> limit_threads_in_backward((2 * x).sum()).backward()
        >>> x.grad
        tensor([2., 2., 2.])
    """
    if not tensor.requires_grad or tensor.device.type != "cpu":
        return tensor
    return _LimitThreadsInBackward.apply(tensor)
