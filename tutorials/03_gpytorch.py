# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Gaussian-process hyperparameters in GPyTorch
#
# For a Gaussian process the maskable dimensions are the $n$ observations. Hiding a set $M$ of them
# and predicting each from the rest is leave-$p$-out cross-validation with $p = |M|$, and the
# identity of tutorial 1 says that averaging over every $p$ gives the log marginal likelihood:
#
# $$
# \log p(\mathbf y \mid X, \theta) = \sum_{p=1}^{n} S(\mathbf y; p), \qquad
# S(\mathbf y; p) = \binom{n}{p}^{-1} \sum_{|M| = p} \frac{1}{p}
#     \sum_{j \in M} \log p(y_j \mid \mathbf y_R, X, \theta).
# $$
#
# `pyro_mpt.gp.MaskedPretrainingMLL` is this objective as a GPyTorch marginal log likelihood, a
# drop-in for `gpytorch.mlls.ExactMarginalLogLikelihood` on the same scale (divided by $n$). Its
# $p = 1$ end is leave-one-out, GPyTorch's `LeaveOneOutPseudoLikelihood`. This tutorial trains the
# hyperparameters of one GP by all three on scikit-learn's diabetes data, and then shows when to
# restrict the masking rates with `RateRange`.

# %%
import gpytorch
import matplotlib.pyplot as plt
import torch

from pyro_mpt.datasets import load_diabetes
from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL
from pyro_mpt.masks import RateRange

torch.set_default_dtype(torch.float64)

inputs, targets = load_diabetes(torch.float64)  # 442 patients x 10 features, standardised
order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
train, test = order[:300], order[300:]
train_x, train_y = inputs[train], targets[train]
test_x, test_y = inputs[test], targets[test]
print(f"{len(train)} training and {len(test)} test patients, {inputs.shape[1]} features")

# %% [markdown]
# ## The model and the usual training loop
#
# An exact GP with a constant mean and a scaled RBF kernel with one lengthscale per feature (ARD):
# twelve hyperparameters and the noise variance. The training loop is GPyTorch's own; the only line
# that differs between objectives is the one that builds `mll`. A stochastic objective needs a
# decaying step size, so every objective gets the same cosine schedule.


# %%
class ARDGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1])
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


OBJECTIVES = {
    "ExactMarginalLogLikelihood": lambda lik, gp: gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp),
    "MaskedPretrainingMLL": lambda lik, gp: MaskedPretrainingMLL(
        lik, gp, num_masks=4, generator=torch.Generator().manual_seed(0)
    ),
    "LeaveOneOutPseudoLikelihood": lambda lik, gp: gpytorch.mlls.LeaveOneOutPseudoLikelihood(
        lik, gp
    ),
}


def train_gp(objective: str, steps: int = 250, lr: float = 0.1):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    gp = ARDGP(train_x, train_y, likelihood)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    mll = OBJECTIVES[objective](likelihood, gp)
    optimizer = torch.optim.Adam(gp.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 1e-3)
    gp.train()
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        output = gp(train_x)
        loss = -mll(output, train_y)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            with torch.no_grad():
                history.append(exact(output, train_y).item())
    return gp, likelihood, history


results = {name: train_gp(name) for name in OBJECTIVES}

# %% [markdown]
# Score every trained GP the same way: the exact log marginal likelihood per training point, the
# log predictive density of the held-out patients and the test RMSE (targets are standardised, so
# an RMSE of 1 is no better than the mean).

# %%
print(f"{'objective':28} {'exact MLL':>9} {'test LPD':>9} {'RMSE':>6} {'noise':>6} {'scale':>6}")
for name, (gp, likelihood, _) in results.items():
    with torch.no_grad():
        gp.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)(gp(train_x), train_y).item()
        gp.eval()
        likelihood.eval()
        predictive = likelihood(gp(test_x))
        lpd = torch.distributions.Normal(predictive.mean, predictive.stddev).log_prob(test_y)
        rmse = (predictive.mean - test_y).pow(2).mean().sqrt()
    print(
        f"{name:28} {mll:9.4f} {lpd.mean():9.4f} {rmse:6.3f} "
        f"{likelihood.noise.item():6.3f} {gp.covar_module.outputscale.item():6.3f}"
    )

fig, ax = plt.subplots(figsize=(7, 4))
for name, (_, _, history) in results.items():
    ax.plot(range(0, 10 * len(history), 10), history, label=name)
ax.set_ylim(-1.25, -1.1)
ax.set_xlabel("Adam step")
ax.set_ylabel("exact MLL per training point")
ax.set_title("ARD GP on diabetes: the exact MLL while training by each objective")
ax.legend()
fig.tight_layout()

# %% [markdown]
# Masked pre-training climbs the exact MLL almost as fast as the exact objective and ends at the
# same hyperparameters, up to its Monte-Carlo noise: it is an unbiased estimate of the same
# function. Leave-one-out optimises a different criterion (it never predicts with less than
# $n - 1$ points of context), and settles elsewhere; on this data the held-out scores are close.
#
# Each `MaskedPretrainingMLL` call factorises $K + \sigma^2 I$ once and then conditions every mask
# on it ($O(\min(p, n-p)^3)$ per mask), so with `num_masks=4` a step costs a few exact steps.
#
# ## Leave-one-out is the $p = 1$ end
#
# `LeavePOutPseudoLikelihood(rate)` holds out $p = \mathrm{round}(\text{rate} \cdot n)$ points at a
# time. With $p = 1$ it is GPyTorch's leave-one-out to float precision: the same formula,
# $\sigma_i^2 = 1/\Lambda_{ii}$ and $\mu_i = y_i - [\Lambda(\mathbf y - \mu)]_i / \Lambda_{ii}$,
# from the same Cholesky factor.

# %%
gp, likelihood, _ = results["ExactMarginalLogLikelihood"]
gp.train()
likelihood.train()
with torch.no_grad():
    output = gp(train_x)
    ours = LeavePOutPseudoLikelihood(likelihood, gp, rate=1 / len(train))(output, train_y)
    theirs = gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, gp)(output, train_y)
print(f"pyro_mpt leave-one-out: {ours.item():.12f}")
print(f"gpytorch leave-one-out: {theirs.item():.12f}")

# %% [markdown]
# ## When to use `RateRange`
#
# The terms of the identity with large $p$ predict a point from almost no data: they are the GP
# *prior*, barely updated. That is why the marginal likelihood punishes a vague prior, even when
# the posterior after a handful of points is the same (Lindley's paradox). Fong & Holmes (2020)
# propose *cumulative cross-validation* with a preparatory phase: drop the terms that use less than
# a fraction of the data as context. `MaskedPretrainingMLL(masks=RateRange(0.0, 0.9))` scores only
# predictions made from at least 10% of the data.
#
# To see the difference, compare Bayesian linear regressions that differ only in the prior
# variance $s^2$ of their weights (a GP with a `LinearKernel` of variance $s^2$), the noise fixed:


# %%
class LinearGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, prior_variance: float):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.LinearKernel()
        self.covar_module.variance = prior_variance

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


prior_variances = [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6]
scores: dict[str, list[float]] = {"exact MLL": [], "RateRange(0, 0.9)": [], "leave-one-out": []}
for prior_variance in prior_variances:
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.5
    gp = LinearGP(train_x, train_y, likelihood, prior_variance)
    gp.train()
    with torch.no_grad():
        output = gp(train_x)
        rate_range = MaskedPretrainingMLL(
            likelihood,
            gp,
            masks=RateRange(0.0, 0.9),
            num_masks=64,
            generator=torch.Generator().manual_seed(0),
        )
        scores["exact MLL"].append(
            gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)(output, train_y).item()
        )
        scores["RateRange(0, 0.9)"].append(rate_range(output, train_y).item())
        scores["leave-one-out"].append(
            gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, gp)(output, train_y).item()
        )

fig, ax = plt.subplots(figsize=(7, 4))
for name, values in scores.items():
    values = torch.tensor(values)
    ax.plot(prior_variances, values - values.max(), "o-", label=name)
ax.set_xscale("log")
ax.set_xlabel("prior variance $s^2$ of the regression weights")
ax.set_ylabel("score minus its maximum (per point)")
ax.set_title("A vaguer prior: the MLL keeps falling, cumulative CV does not")
ax.legend()
fig.tight_layout()

# %% [markdown]
# Once the prior is wide enough not to constrain the fit ($s^2 \gtrsim 1$), every extra factor of
# ten in $s^2$ costs the exact MLL the same amount: only the first few predictions, made from the
# prior, get worse. The rate-range score and leave-one-out do not notice.
#
# So:
#
# * to **fit** hyperparameters by type-II maximum likelihood, or when the prior is part of the model
#   you believe, use `MaskedPretrainingMLL()` (cumulative masks, an unbiased estimate of the MLL);
# * to **compare models** whose priors are vague or arbitrary (a flat prior on weights, a
#   hyperparameter prior picked for convenience), use `RateRange(0, b)` with $b < 1$, which keeps
#   the cross-validation spirit of the MLL without its sensitivity to the prior;
# * leave-one-out is the extreme $b = 1/n$: robust to the prior, but it sees only one context size.
#
# Tutorial 4 compares models with whole MPT curves and with ArviZ.
