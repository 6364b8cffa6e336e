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
# # 4. Comparing models: MPT curves, ArviZ, LOO
#
# The masked-prediction curve $S(x; m)$ of a model says how well it predicts hidden data from
# visible data, at every amount of context. Its area is the log marginal likelihood (LML); its
# $m = 1$ end is leave-one-out cross-validation (LOO). Those are the two scores Bayesian model
# comparison usually rests on, so one curve shows both and everything in between.
#
# This tutorial compares models in two settings:
#
# 1. latent-factor models of the breast-cancer features, with `pyro_mpt.evaluate.compare_models`
#    and their MPT curves;
# 2. Bayesian linear regressions of diabetes progression, fitted in Pyro, compared with PSIS-LOO by
#    ArviZ through `pyro_mpt.inference_data.from_pyro`, and checked against their exact LOO and
#    MPT curves.

# %%
import arviz_stats
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from sklearn.decomposition import PCA, FactorAnalysis
from torch.distributions import LowRankMultivariateNormal

from pyro_mpt.datasets import load_breast_cancer, load_diabetes
from pyro_mpt.evaluate import compare_models, format_table, pseudo_log_likelihood
from pyro_mpt.inference_data import from_pyro, guide_samples
from pyro_mpt.models import BayesianLinearRegression
from pyro_mpt.scoring import mpt_curve

torch.set_default_dtype(torch.float64)

# %% [markdown]
# ## Latent-factor models of the breast-cancer features
#
# Fit probabilistic PCA with 1, 3 and 8 factors and factor analysis (a separate noise variance per
# feature) with 3 and 8, each by maximum likelihood on 400 tumours (scikit-learn does it in closed
# form or by EM), and score them on the other 169. Every model is a
# `LowRankMultivariateNormal`, the form `pyro_mpt` scores exactly.

# %%
x = load_breast_cancer(torch.float64)  # 569 x 30, standardised
order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = x[order[:400]], x[order[400:]]
D = x.shape[1]


def ppca(k: int) -> LowRankMultivariateNormal:
    fit = PCA(k).fit(train.numpy())
    spectrum = torch.as_tensor(fit.explained_variance_) - fit.noise_variance_
    loading = torch.as_tensor(fit.components_).T * spectrum.sqrt()
    noise = torch.full((D,), float(fit.noise_variance_))
    return LowRankMultivariateNormal(torch.as_tensor(fit.mean_), loading, noise)


def factor_analysis(k: int) -> LowRankMultivariateNormal:
    fit = FactorAnalysis(k, random_state=0).fit(train.numpy())
    loading = torch.as_tensor(fit.components_).T
    return LowRankMultivariateNormal(
        torch.as_tensor(fit.mean_), loading, torch.as_tensor(fit.noise_variance_)
    )


models = {
    "PPCA, K=1": ppca(1),
    "PPCA, K=3": ppca(3),
    "PPCA, K=8": ppca(8),
    "FA, K=3": factor_analysis(3),
    "FA, K=8": factor_analysis(8),
}
rows = compare_models(models, test, generator=torch.Generator().manual_seed(0))
print(format_table(rows))

# %% [markdown]
# Every column is per held-out tumour. The cumulative MPT estimate agrees with the exact LML
# within its standard error, for every model: the identity at work. The $m = 1$ column (the
# pseudo-log-likelihood, leave-one-*feature*-out) and the fixed-rate columns are single points of
# the curve scaled by $D$: they rank these models the same way here, but they exaggerate the
# differences between them (with 29 of 30 features visible, a model with more factors predicts
# the last one much better) and say nothing about predictions from little context.
#
# The curves show where the models differ:

# %%
rates = [i / D for i in range(1, D + 1)]
fig, ax = plt.subplots(figsize=(7, 4))
for name, model in models.items():
    curve = mpt_curve(
        model, test, masks_per_rate=16, generator=torch.Generator().manual_seed(1), reduction="mean"
    )
    area = curve.area()
    ax.plot(
        100 * curve.rates,
        curve.mean,
        label=f"{name}: area {area.mean.item():.2f} ± {area.stderr.item():.2f}",
    )
ax.set_xlabel("% of the features masked")
ax.set_ylabel("$S(x; m)$: log-density per hidden feature")
ax.set_title("Held-out masked prediction, breast-cancer features")
ax.legend(loc="lower left", fontsize=8)
fig.tight_layout()

# %% [markdown]
# With most features visible (left), the models with more factors predict the hidden ones far
# better; with almost everything hidden (right) every model falls back on its marginal variances
# and they nearly agree. The LML weighs every masking rate equally.
#
# ## Bayesian linear regression, PSIS-LOO and the ArviZ bridge
#
# ArviZ 1.x (`arviz-base`, `arviz-stats`) estimates LOO by Pareto-smoothed importance sampling
# from posterior draws and their pointwise log-likelihoods, but it has no `from_pyro`, and Pyro has
# no helper for pointwise log-likelihoods. `pyro_mpt.inference_data.from_pyro` fills both gaps: it
# replays the model on every posterior draw and builds an `xarray.DataTree` with `posterior`,
# `log_likelihood` and `observed_data` groups, plus an optional `mpt` group for an MPT curve.
#
# The model: diabetes progression (442 patients, standardised) regressed on a subset of the ten
# baseline features, with the prior scale and noise fixed at their type-II maximum-likelihood
# values from tutorial 2. The posterior is fitted by SVI with a full-covariance Gaussian guide.

# %%
inputs, targets = load_diabetes(torch.float64)
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
PRIOR_SCALE, NOISE_SCALE = 0.2, 0.7


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, PRIOR_SCALE).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("patients", len(y)):
        pyro.sample("y", dist.Normal(x @ w, NOISE_SCALE), obs=y)


def fit_posterior(x, y, steps: int = 1000):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(regression)
    optimizer = pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "T_max": steps, "eta_min": 1e-4}
    )
    svi = SVI(regression, guide, optimizer, Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
        optimizer.step()
    return guide


candidates = {
    "all ten features": FEATURES,
    "bmi, bp, s5": ["bmi", "bp", "s5"],
    "bmi only": ["bmi"],
}
trees, curves, exact = {}, {}, {}
for name, features in candidates.items():
    x_subset = inputs[:, [FEATURES.index(f) for f in features]]
    guide = fit_posterior(x_subset, targets)
    draws = guide_samples(guide, 1000, x_subset, targets, generator_seed=0)
    # The same model, collapsed: y ~ N(0, a^2 X X^T + s^2 I), for the exact scores.
    marginal = BayesianLinearRegression(
        len(features), prior_scale=PRIOR_SCALE, noise_scale=NOISE_SCALE
    ).marginal(x_subset)
    with torch.no_grad():
        curves[name] = mpt_curve(
            marginal, targets, masks_per_rate=8, generator=torch.Generator().manual_seed(0)
        )
        exact[name] = {
            "exact LOO": pseudo_log_likelihood(marginal, targets).item(),
            "exact LML": marginal.log_prob(targets).item(),
        }
    trees[name] = from_pyro(
        draws,
        regression,
        (x_subset, targets),
        num_chains=4,
        dims={"y": ["patient"]},
        mpt=curves[name],
    )

print(trees["bmi, bp, s5"])

# %% [markdown]
# The `DataTree` is ready for ArviZ. `arviz_stats.loo` estimates the expected log pointwise
# predictive density (elpd) by PSIS-LOO; `arviz_stats.compare` ranks the models, with the standard
# error of each difference (`dse`).

# %%
for name, tree in trees.items():
    loo = arviz_stats.loo(tree)
    area = curves[name].area()
    print(
        f"{name:17} PSIS-LOO elpd {loo.elpd:8.2f} ± {loo.se:5.2f}   exact LOO "
        f"{exact[name]['exact LOO']:8.2f}   exact LML {exact[name]['exact LML']:8.2f}   "
        f"MPT area {area.mean.item():8.2f} ± {area.stderr.item():.2f}"
    )

comparison = arviz_stats.compare(trees)
print(comparison[["rank", "elpd", "p", "elpd_diff", "dse", "weight"]])

# %% [markdown]
# Three scores of the same models agree on the ranking:
#
# * **PSIS-LOO** from 1000 posterior draws matches the **exact LOO**, which `pyro_mpt` computes
#   from the collapsed model as $n \cdot S(y; 1)$ (every patient predicted from the other 441);
# * the **exact LML** is lower than the LOO score for every model: it also counts predictions made
#   from few patients, where every model is worse;
# * the **MPT area**, estimated from random masks, matches the exact LML within its Monte-Carlo
#   error.
#
# Here the masked dimension is the patients, so the curve is leave-$p$-out cross-validation for
# every $p$:

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for name, curve in curves.items():
    window = 25  # a running mean over mask sizes smooths the single-row Monte-Carlo noise
    smooth = torch.nn.functional.avg_pool1d(
        curve.mean[None, None], window, stride=1, padding=window // 2, count_include_pad=False
    )[0, 0]
    ax.plot(100 * curve.rates, smooth, label=name)
ax.set_xlabel("% of the patients held out")
ax.set_ylabel("$S(y; p)$: log-density per held-out patient")
ax.set_title("Leave-p-out for every p: diabetes regressions")
ax.legend()
fig.tight_layout()

# %% [markdown]
# LOO reads off the left end of these curves; the marginal likelihood is their area. The full
# model predicts best from many patients, but with almost everyone held out (the right end) the
# three-feature model does slightly better: ten weights learned from a handful of patients are
# poorly determined. The curves cross, yet the full model wins on the area, as on LOO. When a
# flexible model's lead at low rates is smaller than its deficit at high ones, LOO and the marginal
# likelihood disagree, and the curve shows why. To discount the right end, where predictions come
# from the prior alone, score a restricted range of rates (`RateRange`, tutorial 3).
