"""Forward + backward time of the GP objectives against GPyTorch's exact ones.

``MaskedPretrainingMLL`` (Cumulative masks, 1/4/16 per call) over ``ExactMarginalLogLikelihood``,
and leave-one-out (``LeavePOutPseudoLikelihood`` with p = 1) over gpytorch's
``LeaveOneOutPseudoLikelihood``, for an ARD RBF GP on n random 3-d inputs, float64 at every n and
float32 at n = 2000. Both sides use a Cholesky factorisation (``max_cholesky_size`` raised above
n; gpytorch would otherwise switch to CG/Lanczos above n = 800). Ours and the anchor alternate
call by call, so load on a shared machine hits both alike.

A masked step's cost depends on the sizes of the masks it draws (each mask factorises a block of
min(m, n - m) rows), so one call can cost three times another: the MPT rows are the *mean* over
a seeded sequence of calls (``CALLS``), the expected cost per training step, where a best of a
few calls would time the luckiest draw. Leave-one-out is deterministic and timed as a best of
``repeat``. The *floor* rows time the same arithmetic without GPyTorch's objective machinery: the
dense kernel matrix, one Cholesky factor (not differentiated) and the masked score with its
closed-form backward, on the same sequence of masks as the objective beside it, under pyro_mpt's
thread limit like the objectives. One pair at n = 2000 runs beside a real process that spins on
one core (another job on a shared machine), where torch's default threads would contend for it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import gpytorch
import torch

from benchmarks.timing import best_time_pair, mean_time_pair, row
from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL
from pyro_mpt.gp._masked_gaussian_score import masked_gaussian_log_prob_sums
from pyro_mpt.masks import Cumulative
from pyro_mpt.threads import limited_threads

CASES = (
    (500, torch.float64),
    (1000, torch.float64),
    (2000, torch.float64),
    (2000, torch.float32),
    (4000, torch.float64),
)
NUM_MASKS = (1, 4, 16)
CALLS = {500: 40, 1000: 20, 2000: 8, 4000: 5}  # mean over this many masked steps, ~4 masks each


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=3))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _step(mll, model, x, y):
    def step():
        model.zero_grad()
        (-mll(model(x), y)).backward()

    return step


def _masked_step(model, x, y, num_masks):
    """MaskedPretrainingMLL's step, its masks drawn from a generator seeded 0."""
    generator = torch.Generator().manual_seed(0)
    mll = MaskedPretrainingMLL(model.likelihood, model, num_masks=num_masks, generator=generator)
    return _step(mll, model, x, y)


def _floor(model, x, y, num_masks):
    """Kernel matrix, factor and masked score (forward and backward), nothing else."""
    gen = torch.Generator().manual_seed(0)

    def step():
        with limited_threads(dense=True):  # pyro_mpt's thread policy, as in the objectives
            _floor_step()

    def _floor_step():
        model.zero_grad()
        covariance = model.covar_module(x).to_dense()
        covariance = covariance + model.likelihood.noise * torch.eye(len(x), dtype=x.dtype)
        factor = torch.linalg.cholesky(covariance.detach())
        draw = Cumulative().sample(len(x), num_masks=num_masks, generator=gen, dtype=x.dtype)
        residual = y - model.mean_module(x)
        sums = masked_gaussian_log_prob_sums(covariance, factor, residual, draw.masks)
        (-(draw.weights * sums).sum() / len(x)).backward()

    return step


@contextmanager
def _another_job():
    """A real process spinning on one core for the duration, as on a shared machine."""
    job = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # started and spinning, and seen by pyro_mpt's idle-core reading
        yield
    finally:
        job.kill()
        job.wait()


def run() -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n, dtype in CASES:
        x = torch.rand(n, 3, generator=gen, dtype=dtype)
        y = torch.sin(4 * x.sum(-1)) + 0.1 * torch.randn(n, generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = _GP(x, y, likelihood).to(dtype)
        model.train()
        name = f"n={n}, {str(dtype).removeprefix('torch.')}"
        repeat = 2 if n >= 2000 else 7  # small n: milliseconds, noisier
        with gpytorch.settings.max_cholesky_size(10**6):
            exact = _step(gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model), model, x, y)
            for num_masks in NUM_MASKS if n == 2000 else (4,):
                ours_step = _masked_step(model, x, y, num_masks)
                ours, anchor = mean_time_pair(ours_step, exact, CALLS[n])
                rows.append(
                    row(
                        "gp",
                        f"MPT {num_masks} masks, {name}",
                        ours,
                        anchor,
                        "ExactMarginalLogLikelihood",
                    )
                )
                if num_masks == 4:
                    ours_step = _masked_step(model, x, y, 4)  # the floor's sequence of masks
                    ours, floor = mean_time_pair(ours_step, _floor(model, x, y, 4), CALLS[n])
                    rows.append(
                        row(
                            "gp",
                            f"MPT 4 masks, {name}",
                            ours,
                            floor,
                            "floor: kernel + factor + masked score, no GPyTorch objective",
                        )
                    )
                    if n == 2000 and dtype == torch.float64:
                        with _another_job():  # the same masks as the quiet pair above
                            ours_step = _masked_step(model, x, y, 4)
                            ours, anchor = mean_time_pair(ours_step, exact, CALLS[n])
                        rows.append(
                            row(
                                "gp",
                                f"MPT 4 masks, {name}, another process spinning one core",
                                ours,
                                anchor,
                                "ExactMarginalLogLikelihood",
                            )
                        )
            loo = _step(gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, model), model, x, y)
            ours_loo = _step(LeavePOutPseudoLikelihood(likelihood, model, rate=1 / n), model, x, y)
            ours, anchor = best_time_pair(ours_loo, loo, repeat)
            rows.append(
                row("gp", f"leave-one-out, {name}", ours, anchor, "LeaveOneOutPseudoLikelihood")
            )
    return rows
