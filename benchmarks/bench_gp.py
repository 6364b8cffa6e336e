"""Forward + backward time of the GP objectives against GPyTorch's exact ones.

``MaskedPretrainingMLL`` (Cumulative masks, 1/4/16 per call) over ``ExactMarginalLogLikelihood``,
and leave-one-out (``LeavePOutPseudoLikelihood`` with p = 1) over gpytorch's
``LeaveOneOutPseudoLikelihood``, for an RBF GP on n random 3-d inputs, float32. Both sides use a
Cholesky factorisation (``max_cholesky_size`` raised above n; gpytorch would otherwise switch to
CG/Lanczos above n = 800). Timed on one thread: the per-mask factorisations are small, and with
two threads on a shared, busy machine OpenMP barriers dominate and the ratios become noise.
"""

from __future__ import annotations

import gpytorch
import torch

from benchmarks.timing import best_time, row
from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL

SIZES = (500, 1000, 2000)
NUM_MASKS = (1, 4, 16)


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _step(mll, model, x, y):
    def step():
        model.zero_grad()
        (-mll(model(x), y)).backward()

    return step


def run() -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in SIZES:
        x = torch.rand(n, 3, generator=gen)
        y = torch.sin(4 * x.sum(-1)) + 0.1 * torch.randn(n, generator=gen)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = _GP(x, y, likelihood)
        model.train()
        with gpytorch.settings.max_cholesky_size(10**6):
            exact = best_time(
                _step(gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model), model, x, y),
                repeat=2,
            )
            for num_masks in NUM_MASKS:
                mll = MaskedPretrainingMLL(
                    likelihood,
                    model,
                    num_masks=num_masks,
                    generator=torch.Generator().manual_seed(0),
                )
                ours = best_time(_step(mll, model, x, y), repeat=2)
                rows.append(
                    row(
                        "gp",
                        f"MPT {num_masks} masks, n={n}",
                        ours,
                        exact,
                        "ExactMarginalLogLikelihood",
                    )
                )
            loo = best_time(
                _step(gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, model), model, x, y),
                repeat=2,
            )
            ours = best_time(
                _step(LeavePOutPseudoLikelihood(likelihood, model, rate=1 / n), model, x, y),
                repeat=2,
            )
            rows.append(
                row("gp", f"leave-one-out, n={n}", ours, loo, "LeaveOneOutPseudoLikelihood")
            )
    return rows
