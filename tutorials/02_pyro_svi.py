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
# # 2. Masked pre-training in Pyro
#
# `pyro_mpt.infer.MaskedPretrainingELBO` is a `pyro.infer.ELBO`. It keeps everything that
# `Trace_ELBO` does with the latent variables covered by the guide, and replaces each observed
# log-likelihood $\log p(x_n \mid \theta)$ by a masked pre-training estimate: hide a random set of
# the dimensions of $x_n$, predict each hidden one from the visible ones, and weight the sum so that
# its expectation is $\log p(x_n \mid \theta)$ (tutorial 1). So the swap is one line, and the
# expected loss does not change; what changes is how the loss is computed, what it costs and
# which latent variables the guide must cover.
#
# We train probabilistic PCA on scikit-learn's breast-cancer features (569 tumours × 30
# measurements, standardised), first written by hand in its *collapsed* form (the latent $z_n$
# integrated out), then with explicit latents, and finish with a regression model where the masked
# dimension is the data points themselves.

# %%
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from sklearn.decomposition import PCA

from pyro_mpt.datasets import load_breast_cancer, load_diabetes
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import FixedRate
from pyro_mpt.models import PPCA, BayesianLinearRegression, fit

x = load_breast_cancer()  # 569 x 30, standardised
N, D = x.shape
K = 2
optimum = PCA(K).fit(x.double().numpy()).score(x.double().numpy())
print(f"N = {N}, D = {D}, K = {K}; closed-form maximum LML per datum: {optimum:.4f}")

# %% [markdown]
# ## An existing SVI loop
#
# Here is PPCA as you would write it in Pyro: the loading matrix $W$ and the noise scale $\sigma$
# are parameters, each row is observed from its marginal
# $\mathcal{N}(0, WW^\top + \sigma^2 I)$, and the guide is empty because there is no latent
# variable left. With `Trace_ELBO` this is type-II maximum likelihood: the loss is exactly
# $-\sum_n \log p(x_n)$.


# %%
def model(x):
    W = pyro.param("W", lambda: 0.1 * torch.randn(D, K, generator=torch.Generator().manual_seed(0)))
    noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
    marginal = dist.LowRankMultivariateNormal(torch.zeros(D), W, noise.pow(2).expand(D))
    with pyro.plate("data", len(x)):
        pyro.sample("x", marginal, obs=x)


def guide(x):
    pass


def exact_lml_per_datum() -> float:
    W, noise = pyro.param("W"), pyro.param("noise")
    marginal = dist.LowRankMultivariateNormal(torch.zeros(D), W, noise.pow(2).expand(D))
    return marginal.log_prob(x).mean().item()


def train(elbo, steps: int = 600) -> list[float]:
    """The SVI loop, unchanged whatever the objective; returns the exact LML every 20 steps."""
    pyro.clear_param_store()
    optimizer = pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "T_max": steps, "eta_min": 1e-4}
    )
    svi = SVI(model, guide, optimizer, loss=elbo)
    history = []
    for step in range(steps):
        svi.step(x)
        optimizer.step()  # advance the learning-rate schedule
        if step % 20 == 0 or step == steps - 1:
            history.append(exact_lml_per_datum())
    return history


# %% [markdown]
# Now the swap. `MaskedPretrainingELBO()` draws, for every row and step, a mask size
# $m \sim \mathcal{U}\{1..D\}$ and a uniform mask of that size (the cumulative scheme), scores each
# hidden measurement by its exact Gaussian conditional given the visible ones, and weights the sum
# by $D/m$. We also train with BERT's fixed 15% masking rate, `masks=FixedRate(0.15)`, which
# estimates something else (tutorial 1).

# %%
histories = {
    "Trace_ELBO (exact LML)": train(Trace_ELBO()),
    "MaskedPretrainingELBO()": train(
        MaskedPretrainingELBO(generator=torch.Generator().manual_seed(0))
    ),
    "MaskedPretrainingELBO(FixedRate(0.15))": train(
        MaskedPretrainingELBO(masks=FixedRate(0.15), generator=torch.Generator().manual_seed(0))
    ),
}
for name, history in histories.items():
    gap = max(0.0, 100 * (optimum - history[-1]) / abs(optimum))
    print(f"{name:40} final LML per datum {history[-1]:.4f}  ({gap:.2f}% below the optimum)")

fig, ax = plt.subplots(figsize=(7, 4))
for name, history in histories.items():
    steps = [min(20 * i, 599) for i in range(len(history))]
    ax.plot(steps, history, label=name)
ax.axhline(optimum, color="k", ls="--", lw=1, label="closed-form optimum")
ax.set_ylim(optimum - 1.5, optimum + 0.2)
ax.set_xlabel("SVI step")
ax.set_ylabel("exact LML per datum")
ax.set_title("Collapsed PPCA on breast-cancer features")
ax.legend()
fig.tight_layout()

# %% [markdown]
# Cumulative masked pre-training reaches the maximum-likelihood solution: its loss is a noisy but
# unbiased estimate of the same objective. The fixed-rate objective settles on a different model,
# below the optimum.
#
# Two practical points. The MPT loss is *stochastic* even when the model has no latent variables,
# so it needs a decaying step size to settle (here a cosine schedule from 0.05 to 1e-4; with a
# constant rate it would hover around the optimum at a gradient-noise floor). And each step
# factorises a small $K \times K$ matrix per row and mask, so it costs more than a `Trace_ELBO` step
# on the same collapsed model.
#
# ## Latent variables: what the guide must cover
#
# Write the same model with its latents explicit, $z_n \sim \mathcal{N}(0, I_K)$ and
# $x_n \mid z_n \sim \mathcal{N}(Wz_n, \sigma^2 I)$: `PPCA(..., collapsed=False)` from
# `pyro_mpt.models` does. `Trace_ELBO` now needs a guide for every $z_n$ (here `AutoNormal`, one
# Gaussian per row) and optimises a lower bound.
#
# `MaskedPretrainingELBO` treats latents that live in the data plate, such as $z_n$, differently:
# the prediction of a hidden dimension must integrate $z_n$ under its posterior given the *visible*
# dimensions, $p(x_j \mid x_R) = \int p(x_j \mid z)\, p(z \mid x_R)\, dz$. It does so itself, by
# self-normalised importance sampling, with proposals from the Laplace approximations of
# $p(z \mid x_R)$ and $p(z \mid x)$ (Newton's method, derivatives by autograd). The guide covers
# only the global latents, of which there are none here. The estimate is consistent in the
# number of particles K; its first-order bias is estimated and removed, and K doubles from
# `num_importance_samples` while the estimated bias or the effective sample size asks for it
# (`elbo.importance_samples` and `elbo.effective_sample_size` report both). It is also more
# expensive, so we train on mini-batches of 128 rows (`num_data=N` tells the model's plate to
# rescale).


# %%
def train_latent(elbo, guide, steps: int = 400, batch_size: int | None = None) -> float:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    latent_model = PPCA(D, K, collapsed=False, generator=torch.Generator().manual_seed(0))
    guide = guide(latent_model)
    optimizer = pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "T_max": steps, "eta_min": 1e-4}
    )
    svi = SVI(latent_model, guide, optimizer, loss=elbo)
    rows = torch.Generator().manual_seed(1)
    for _ in range(steps):
        if batch_size is None:
            svi.step(x)
        else:
            svi.step(x[torch.randperm(N, generator=rows)[:batch_size]], num_data=N)
        optimizer.step()
    with torch.no_grad():
        return latent_model.log_marginal(x).mean().item()  # exact, whatever the form


def no_guide(latent_model):
    return lambda *args, **kwargs: None


latent_results = {
    "Trace_ELBO + AutoNormal guide for z": train_latent(Trace_ELBO(), AutoNormal),
    "MaskedPretrainingELBO, z integrated": train_latent(
        MaskedPretrainingELBO(generator=torch.Generator().manual_seed(0)),
        no_guide,
        batch_size=128,
    ),
}
for name, value in latent_results.items():
    gap = 100 * (optimum - value) / abs(optimum)
    print(f"{name:52} final LML per datum {value:.4f}  ({gap:.2f}% below the optimum)")

# %% [markdown]
# Both land near the optimum; masked pre-training without any guide for $z_n$. Its remaining gap
# comes from the mini-batch noise and what is left of the importance-sampling bias. A trained
# encoder can serve as the proposal too: `proposal="guide"` uses the guide, provided it reads
# only the visible part of $x_n$ through `pyro_mpt.infer.observed_view`, and trains it in the
# same step (reweighted wake-sleep).
#
# ## What changes and what does not
#
# | | `Trace_ELBO` | `MaskedPretrainingELBO` |
# |---|---|---|
# | model, guide, `SVI`, optimiser code | unchanged | unchanged |
# | `loss`, `loss_and_grads`, `differentiable_loss` | yes | yes, and they agree |
# | global latents (e.g. a prior on $W$) | guide; $\log p - \log q$ | the same |
# | local latents $z_n$ in the data plate | need a guide | integrated given the visible part |
# | observed site $x_n$ | $\log p(x_n \mid \theta)$ | unbiased masked estimate of it |
# | what is masked | — | the rightmost event dimension of the observed site |
# | loss value | exact (collapsed) or a bound | a noisy estimate of the same quantity |
# | step size | constant is fine when exact | decay it |
#
# ## The masked dimension is the rightmost event dimension
#
# In PPCA each row is an event of $D$ measurements, so a mask hides measurements within a row. In
# Bayesian linear regression written in collapsed form,
# $y \sim \mathcal{N}(0, \alpha^2 XX^\top + \sigma^2 I_N)$, the event is the whole vector of $N$
# targets: masking hides *data points* and predicts them from the others, as in leave-$p$-out
# cross-validation, and the cumulative score is the log evidence $\log p(y \mid X)$. The fit helper
# `pyro_mpt.models.fit` runs the same SVI loop for any model of the library, by the exact
# evidence or by masked pre-training; both learn the prior scale $\alpha$ and the noise $\sigma$ by
# type-II maximum likelihood on scikit-learn's diabetes data.

# %%
inputs, targets = load_diabetes()  # 442 x 10 standardised features, standardised targets
for objective in ["exact", "mpt"]:
    pyro.clear_param_store()
    regression = BayesianLinearRegression(inputs.shape[1])
    result = fit(regression, inputs, targets, objective=objective, steps=300, progress=False)
    print(
        f"{objective:5}: log evidence per datum {result.tracked[-1]:.4f}, "
        f"alpha = {regression.prior_scale.item():.3f}, sigma = {regression.noise_scale.item():.3f}"
    )

# %% [markdown]
# The two objectives find the same hyperparameters. Tutorial 3 does the same for Gaussian
# processes in GPyTorch, where the masked dimension is again the data points.
