"""Intra-op threads for pyro_mpt's own computations, forward and backward.

Masked pre-training runs many small batched factorisations (one per mask). On the CPU, torch
spreads each over its intra-op threads, and when the threads outnumber the free cores they spin
at OpenMP barriers: on a 2-core machine with another job running, an SVI step on PPCA (digits,
K = 10) took 1124 ms with torch's default 2 threads and 132 ms with one. Large dense work (the
n x n factorisations and products of an exact GP) gains from threads on idle cores instead, and
loses less when they are taken.

The default policy, ``"auto"``, therefore runs pyro_mpt's small batched CPU work (the forward
computations and, through the tensors they return, the backward pass that the caller starts) on
one thread, and its large dense work on as many threads as there are cores that *other*
processes left idle since the previous dense call (never more than torch's setting; one on the
first call, or where ``/proc/stat`` cannot be read). The caller's setting is restored afterwards,
and CUDA work is not affected. :func:`set_thread_limit` sets a fixed limit instead.

Example:
    >>> import torch
    >>> from pyro_mpt.threads import limited_threads, set_thread_limit, thread_limit
    >>> thread_limit()
    'auto'
    >>> with limited_threads():
    ...     torch.get_num_threads()
    1
    >>> set_thread_limit(None)  # let torch decide, as without pyro_mpt
    >>> set_thread_limit("auto")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch

__all__ = [
    "CpuReading",
    "free_cores",
    "limited_threads",
    "limit_threads_in_backward",
    "set_thread_limit",
    "thread_limit",
]

Limit = int | None | Literal["auto"]
_limit: Limit = "auto"

# Free cores are measured over intervals of at least this many seconds (shorter ones are noise).
_MIN_INTERVAL_S = 0.2


def thread_limit() -> Limit:
    """The thread policy: ``"auto"`` (default), a fixed limit, or ``None`` (torch's setting)."""
    return _limit


def set_thread_limit(limit: Limit) -> None:
    """Set the most intra-op threads pyro_mpt's CPU computations use.

    ``"auto"`` (default): one thread for small batched work, the cores other processes leave idle
    for large dense work; an integer: at most that many everywhere; ``None``: torch's setting.
    """
    global _limit
    if limit != "auto" and limit is not None and (
        not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
    ):
        raise ValueError(f"limit must be a positive integer, None or 'auto', got {limit!r}")
    _limit = limit


class CpuReading(NamedTuple):
    """Cumulative CPU seconds: all of this process's cores (``busy``, ``total``), and its own.

    Example:
        >>> CpuReading(busy=1.5, total=2.0, own=0.5).own
        0.5
    """

    busy: float
    total: float
    own: float


def free_cores(previous: CpuReading, current: CpuReading, cores: int) -> float:
    """Cores that processes other than this one left idle between two readings.

    Example:
        >>> # 1 s on 2 cores: 1.5 core-seconds busy, 0.5 of them this process's own.
        >>> free_cores(CpuReading(0.0, 0.0, 0.0), CpuReading(1.5, 2.0, 0.5), cores=2)
        1.0
    """
    elapsed = (current.total - previous.total) / cores
    if elapsed <= 0:
        return float(cores)
    others = (current.busy - previous.busy) - (current.own - previous.own)
    return min(float(cores), max(0.0, cores - others / elapsed))


def _read_cpu(cpus: frozenset[int]) -> CpuReading | None:
    """The counters of ``/proc/stat`` for the CPUs this process may run on (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu")]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = total = 0
    for fields in lines:
        if fields[0] == "cpu" or int(fields[0][3:]) not in cpus:
            continue
        counts = [int(value) for value in fields[1:]]
        idle = counts[3] + counts[4]  # idle and iowait
        total += sum(counts[:8])  # guest time is already counted in user time
        busy += sum(counts[:8]) - idle
    own = sum(os.times()[:2])
    return CpuReading(busy / tick, total / tick, own)


class _IdleCores:
    """Free cores measured since the previous call (at least ``_MIN_INTERVAL_S`` apart)."""

    def __init__(self):
        self._cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else frozenset(range(os.cpu_count() or 1))
        self._last: tuple[float, CpuReading] | None = None
        self._free = 1.0

    def __call__(self) -> float:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < _MIN_INTERVAL_S:
            return self._free
        reading = _read_cpu(self._cpus)
        if reading is None:
            return 1.0
        if self._last is not None:
            self._free = free_cores(self._last[1], reading, len(self._cpus))
        self._last = (now, reading)
        return self._free


_idle_cores = _IdleCores()


def _threads(dense: bool) -> int | None:
    """Threads for a block of pyro_mpt's work (None: leave torch's setting)."""
    if _limit is None:
        return None
    if _limit != "auto":
        return _limit
    return max(1, int(_idle_cores() + 0.5)) if dense else 1


@contextmanager
def limited_threads(dense: bool = False) -> Iterator[None]:
    """Run the block with pyro_mpt's thread policy, then restore torch's setting.

    ``dense``: the block is a few large dense operations (an exact GP's n x n factorisations),
    which under ``"auto"`` use the cores that other processes leave idle.
    """
    previous = torch.get_num_threads()
    threads = _threads(dense)
    if threads is None or previous <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _LimitThreadsInBackward(torch.autograd.Function):
    """Identity whose backward lowers the thread count for the rest of the backward pass."""

    @staticmethod
    def forward(ctx, tensor, threads):
        ctx.threads = threads
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        previous = torch.get_num_threads()
        if previous > ctx.threads:
            torch.set_num_threads(ctx.threads)
            # Restored when the engine finishes this backward pass (as DDP schedules its work).
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: torch.set_num_threads(previous)
            )
        return grad, None


def limit_threads_in_backward(tensor: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """``tensor`` itself, but a backward pass through it runs with :func:`limited_threads`.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> limit_threads_in_backward((2 * x).sum()).backward()
        >>> x.grad
        tensor([2., 2., 2.])
    """
    if not tensor.requires_grad or tensor.device.type != "cpu":
        return tensor
    threads = _threads(dense)
    if threads is None:
        return tensor
    return _LimitThreadsInBackward.apply(tensor, threads)
