"""Training an ARD GP on diabetes by masked pre-training reaches the exact-MLL optimum."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from sklearn.datasets import load_diabetes

from pyro_mpt.gp import MaskedPretrainingMLL

STEPS = 150
LR = 0.15


class ARDGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1])
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def diabetes(dtype):
    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def train(objective: str, x, y):
    """Adam with a cosine-annealed step size, from gpytorch's default initialisation."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ARDGP(x, y, likelihood).to(x.dtype)
    model.train()
    if objective == "exact":
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    else:
        mll = MaskedPretrainingMLL(
            likelihood, model, num_masks=4, generator=torch.Generator().manual_seed(0)
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS, eta_min=LR * 1e-3)
    for _ in range(STEPS):
        optimizer.zero_grad()
        (-mll(model(x), y)).backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y).item()
    return exact, model


def hyperparameters(model) -> dict[str, list[float]]:
    kernel = model.covar_module
    return {
        "lengthscale": kernel.base_kernel.lengthscale.detach().flatten().tolist(),
        "outputscale": [kernel.outputscale.item()],
        "noise": [model.likelihood.noise.item()],
        "mean": [model.mean_module.constant.item()],
    }


@pytest.mark.slow
def test_diabetes_masked_pretraining_reaches_exact_mll_optimum():
    x, y = diabetes(torch.float32)
    exact_mll, exact_model = train("exact", x, y)
    mpt_mll, mpt_model = train("mpt", x, y)
    print(f"\nexact MLL per datum after training: exact {exact_mll:.5f}, MPT {mpt_mll:.5f}")
    for name, values in hyperparameters(exact_model).items():
        ours = hyperparameters(mpt_model)[name]
        for i, (a, b) in enumerate(zip(values, ours, strict=True)):
            print(f"{name}[{i}]: exact-trained {a:.4f}   MPT-trained {b:.4f}")
    assert exact_mll > -1.2  # the exact training itself converged (-1.0898 when written)
    assert mpt_mll <= exact_mll + 1e-3
    assert (exact_mll - mpt_mll) / abs(exact_mll) < 0.005
