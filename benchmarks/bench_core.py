"""Core: a masked pre-training score over one ``log_prob`` of the same data (N = 1000 rows).

* stratified: one mask per size, i.e. D masks per row, every conditional exact;
* cumulative: a single uniformly random mask per row (what one training step uses).
"""

from __future__ import annotations

import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from pyro_mpt.masks import Cumulative, Stratified
from pyro_mpt.scoring import mpt_score

from .timing import best_time, row

NUM_ROWS = 1000
RANK = 10


def _distributions(size: int, generator: torch.Generator):
    cov_factor = torch.randn(size, RANK, generator=generator)
    cov_diag = torch.full((size,), 0.5)
    low_rank = LowRankMultivariateNormal(torch.zeros(size), cov_factor, cov_diag)
    full = MultivariateNormal(torch.zeros(size), low_rank.covariance_matrix)
    return {f"low-rank K={RANK}": low_rank, "full covariance": full}


def run() -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in (64, 256):
        for name, dist in _distributions(size, generator).items():
            data = dist.sample((NUM_ROWS,))
            anchor = best_time(lambda d=dist, x=data: d.log_prob(x))
            schemes = [(Cumulative(), "cumulative, 1 mask per row", 5)]
            # Full covariance, D = 256, stratified: ~45 GFLOP of small factorisations; skipped.
            if name != "full covariance" or size <= 64:
                schemes.insert(0, (Stratified(), "stratified, D masks per row", 2))
            for scheme, label, repeat in schemes:
                ours = best_time(
                    lambda d=dist, x=data, s=scheme: mpt_score(d, x, s, generator=generator),
                    repeat=repeat,
                )
                case = f"{name}, N={NUM_ROWS}, D={size}: {label}"
                rows.append(row("mpt_score / log_prob", case, ours, anchor, "log_prob"))
    return rows
