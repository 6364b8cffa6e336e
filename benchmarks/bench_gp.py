"""Forward + backward time of the GP objectives against GPyTorch's exact ones.

``MaskedPretrainingMLL`` (Cumulative masks, 1/4/16 per call) over ``ExactMarginalLogLikelihood``,
and leave-one-out (``LeavePOutPseudoLikelihood`` with p = 1) over gpytorch's
``LeaveOneOutPseudoLikelihood``, for an ARD RBF GP on n random 3-d inputs, float64 at every n and
float32 at n = 2000. Both sides use a Cholesky factorisation (``max_cholesky_size`` raised above
n; gpytorch would otherwise switch to CG/Lanczos above n = 800). Ours and the anchor alternate
within each repetition, so load on a shared machine hits both alike.
"""

from __future__ import annotations

import gpytorch
import torch

from benchmarks.timing import best_time_pair, row
from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL

CASES = (
    (500, torch.float64),
    (1000, torch.float64),
    (2000, torch.float64),
    (2000, torch.float32),
    (4000, torch.float64),
)
NUM_MASKS = (1, 4, 16)


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
        repeat = 2 if n >= 2000 else 3
        with gpytorch.settings.max_cholesky_size(10**6):
            exact = _step(gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model), model, x, y)
            for num_masks in NUM_MASKS if n == 2000 else (4,):
                mll = MaskedPretrainingMLL(
                    likelihood,
                    model,
                    num_masks=num_masks,
                    generator=torch.Generator().manual_seed(0),
                )
                ours, anchor = best_time_pair(_step(mll, model, x, y), exact, repeat)
                rows.append(
                    row(
                        "gp",
                        f"MPT {num_masks} masks, {name}",
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
