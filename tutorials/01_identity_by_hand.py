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
# # 1. The identity by hand
#
# Masked pre-training hides some dimensions of a data point and predicts them from the rest. This
# tutorial checks, with numbers you can inspect, the identity that makes it a Bayesian objective:
#
# $$
# \log p(x) = \sum_{m=1}^{D} S(x; m), \qquad
# S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_R).
# $$
#
# $S(x; m)$ is the average log-density of one hidden dimension when $m$ of the $D$ dimensions are
# hidden: a *masked-prediction score at masking rate* $m / D$. The identity says that the whole
# curve of these scores, summed, is the log marginal likelihood (LML). We will
#
# 1. prove it by brute force on five pixels, using nothing but the chain rule;
# 2. draw the curve $S(x; m)$ for a real model on real data, and check that its area is the LML;
# 3. estimate the LML with random masks, and see what a *fixed* masking rate (BERT's 15%)
#    estimates instead.
#
# The model is probabilistic PCA (Tipping & Bishop, 1999) on scikit-learn's 8×8 digits: the one
# non-trivial model whose LML has a closed form, so every number below can be checked exactly.

# %%
import functools
import itertools
import math

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from torch.distributions import LowRankMultivariateNormal

from pyro_mpt.gaussian import masked_conditional_log_prob
from pyro_mpt.masks import Cumulative, Exhaustive, FixedRate, Stratified
from pyro_mpt.scoring import mpt_curve, mpt_score

torch.set_default_dtype(torch.float64)

# %% [markdown]
# ## A model with a known marginal likelihood
#
# PPCA says each row is $x = Wz + \mu + \varepsilon$ with $z \sim \mathcal{N}(0, I_K)$ and
# $\varepsilon \sim \mathcal{N}(0, \sigma^2 I_D)$, so its marginal is
# $\mathcal{N}(\mu, WW^\top + \sigma^2 I)$: low rank plus a diagonal. The maximum-likelihood
# $W$ and $\sigma^2$ come from an eigendecomposition; scikit-learn's `PCA` computes them, and
# `PCA.score` is the average LML per row. We rebuild the same model as a
# `torch.distributions.LowRankMultivariateNormal`, which is the form `pyro_mpt` scores.
#
# The pixels are scaled to $[0, 1]$ and centred. (Standardising each pixel instead, as
# `pyro_mpt.datasets.load_digits` does, turns the rare ink in the corner pixels into values forty
# standard deviations out; they would dominate every log-density below.)

# %%
x = torch.as_tensor(load_digits().data / 16.0)  # 1797 images x 64 pixels
x = x - x.mean(0)
num_data, D = x.shape
K = 10

pca = PCA(K).fit(x.numpy())
components = torch.as_tensor(pca.components_)  # (K, D), orthonormal rows
spectrum = torch.as_tensor(pca.explained_variance_)
noise = float(pca.noise_variance_)  # mean of the discarded eigenvalues
W = components.T * (spectrum - noise).sqrt()  # Tipping & Bishop's W (up to a rotation)
model = LowRankMultivariateNormal(torch.as_tensor(pca.mean_), W, torch.full((D,), noise))

exact_lml = model.log_prob(x).mean().item()
print(f"D = {D}, K = {K}, noise variance = {noise:.4f}")
print(f"exact LML per datum:  {exact_lml:.4f}")
print(f"PCA.score (sklearn):  {pca.score(x.numpy()):.4f}")

# %% [markdown]
# ## The identity on five pixels, by brute force
#
# Take five pixels, so that everything can be enumerated. Their marginal is Gaussian too (the
# corresponding rows of $W$ and of the diagonal). For any ordering $\sigma$ of the five
# dimensions the chain rule says
#
# $$
# \log p(x) = \sum_{k=1}^{5} \log p(x_{\sigma(k)} \mid x_{\sigma(1)}, \dots, x_{\sigma(k-1)}),
# $$
#
# and each term is a difference of two *marginal* log-densities,
# $\log p(x_{\sigma(1..k)}) - \log p(x_{\sigma(1..k-1)})$, so we need no conditioning formula at
# all. Average the $k$-th term over all $5! = 120$ orderings: it conditions on a random set of
# $k - 1$ pixels and predicts one of the remaining $m = 5 - k + 1$. That average is $S(x; m)$.

# %%
pixels = [19, 26, 36, 43, 52]  # five pixels in the middle of the image
row = x[0, pixels]
d = len(pixels)


@functools.cache
def log_marginal(subset: frozenset[int]) -> float:
    """log p(x_subset) under the PPCA marginal restricted to those pixels."""
    subset = sorted(subset)
    if not subset:
        return 0.0
    index = [pixels[i] for i in subset]
    sub = LowRankMultivariateNormal(model.loc[index], W[index], model.cov_diag[index])
    return sub.log_prob(row[subset]).item()


chain_terms = torch.zeros(d)  # chain_terms[k]: average k-th chain-rule term over orderings
for order in itertools.permutations(range(d)):
    for k in range(d):
        seen, before = frozenset(order[: k + 1]), frozenset(order[:k])
        chain_terms[k] += log_marginal(seen) - log_marginal(before)
chain_terms /= math.factorial(d)
by_size_chain = chain_terms.flip(0)  # position k conditions on k pixels: mask size m = d - k

# %% [markdown]
# Now the same scores the way `pyro_mpt` computes them: every one of the $2^5 - 1 = 31$ masks
# (`Exhaustive`), each masked pixel scored on its own against the visible ones by
# `masked_conditional_log_prob`, then averaged within each mask size.

# %%
small = LowRankMultivariateNormal(model.loc[pixels], W[pixels], model.cov_diag[pixels])
masks = Exhaustive().sample(d).masks  # (31, 5), True = hidden
per_pixel = masked_conditional_log_prob(small, row, masks)  # log p(x_j | x_R) at hidden j
sizes = masks.sum(-1)
by_size_masks = torch.stack([(per_pixel[sizes == m].sum(-1) / m).mean() for m in range(1, d + 1)])

print(" m   chain rule   masked conditionals")
for m in range(1, d + 1):
    print(f" {m}   {by_size_chain[m - 1]:10.5f}   {by_size_masks[m - 1]:10.5f}")
print(f"sum of S(x; m): {by_size_masks.sum():.6f}")
print(f"log p(x):       {small.log_prob(row):.6f}")

# %% [markdown]
# The two columns agree to rounding, and their sum is the log-density of the five pixels. Two
# details matter. Each hidden pixel is scored **alone**, $\log p(x_j \mid x_R)$; the joint density
# of the hidden block, $\log p(x_M \mid x_R)$, would give a different number. And the scores fall
# as $m$ grows: with less context, each prediction is worse.
#
# ## The masked-prediction curve on 64 pixels
#
# With $D = 64$ there are $2^{64}$ masks, so `mpt_curve` estimates each $S(x; m)$ from a few random
# masks of size $m$ per image and reports a Monte-Carlo standard error. Averaged over the 1797
# images (`reduction="mean"`), the estimates are tight.

# %%
generator = torch.Generator().manual_seed(0)
curve = mpt_curve(model, x, masks_per_rate=2, generator=generator, reduction="mean")
area = curve.area()
print(f"area under the curve: {area.mean.item():.3f} ± {area.stderr.item():.3f}")
print(f"exact LML per datum:  {exact_lml:.3f}")

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(100 * curve.rates, curve.mean, lw=1.8, label="$S(x; m)$, mean over images")
ax.fill_between(
    100 * curve.rates,
    curve.mean - 2 * curve.stderr,
    curve.mean + 2 * curve.stderr,
    alpha=0.3,
    label="± 2 standard errors",
)
ax.axhline(exact_lml / D, color="k", ls="--", lw=1, label="exact LML / D")
ax.set_xlabel("masking rate m / D (%)")
ax.set_ylabel("log-density per hidden pixel")
ax.set_title("PPCA (K = 10) on digits: masked prediction gets harder with less context")
ax.legend()
fig.tight_layout()

# %% [markdown]
# The left end, $m = 1$, is leave-one-out: $D \cdot S(x; 1)$ is the pseudo-log-likelihood. The
# right end, $m = D$, predicts every pixel from nothing: the prior marginals. The LML is the area
# under the whole curve, which is $D$ times its average height (the dashed line).
#
# ## Estimating the LML with random masks
#
# Training needs a cheap, unbiased estimate of $\log p(x)$ at every step. The cumulative scheme
# draws $m$ uniformly from $1..D$, then one mask of that size, and weights the masked sum by
# $D / m$; the stratified scheme draws masks of every size. Both are unbiased; their noise shrinks
# with the number of masks.

# %%
print(" scheme                 masks/row   estimate ± s.e.     exact")
for scheme, num_masks in [
    (Cumulative(), 2),
    (Cumulative(), 32),
    (Stratified(masks_per_size=2), 1),
]:
    estimate = mpt_score(model, x, scheme, num_masks, generator=generator, reduction="mean")
    draws = num_masks * (2 * D if isinstance(scheme, Stratified) else 1)
    print(
        f" {scheme!r:22} {draws:6d}     {estimate.mean.item():8.3f} ± {estimate.stderr.item():.3f}"
        f"   {exact_lml:8.3f}"
    )

# %% [markdown]
# ## What a fixed masking rate estimates
#
# BERT masks 15% of the tokens. With a fixed rate $\rho$ every mask has size $m = \rho D$, and the
# weighted sum estimates $D \cdot S(x; \rho D)$: one point of the curve, scaled up to the whole
# area. Unless the curve is flat, that is not the LML.

# %%
rates = [0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95]
fixed = [
    mpt_score(model, x, FixedRate(rate), 4, generator=generator, reduction="mean").mean.item()
    for rate in rates
]
for rate, value in zip(rates, fixed, strict=True):
    print(f"fixed {100 * rate:4.0f}%: {value:9.3f}   (exact LML {exact_lml:.3f})")

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([100 * r for r in rates], fixed, "o-", label="fixed-rate score $D\\,S(x; \\rho D)$")
ax.axhline(exact_lml, color="k", ls="--", lw=1, label="exact LML")
ax.set_xlabel("masking rate ρ (%)")
ax.set_ylabel("per datum")
ax.set_title("A fixed masking rate over-estimates the LML at low rates, under-estimates at high")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Does the bias matter for training?
#
# A biased *value* would be harmless if the objective still peaked at the same model. It does not.
# For every noise variance $\sigma^2$ the best $W$ has a closed form
# ($W = U_K (\Lambda_K - \sigma^2 I)^{1/2}$), which gives a one-parameter family of PPCA models.
# Score each member by the exact LML, the stratified (unbiased) MPT estimate, and the fixed-rate
# score at 15% and at 85%, using the same masks for every member (common random numbers, so the
# curves are smooth), and see where each objective puts its maximum.

# %%
subset = x[:300]  # a sixth of the images keeps this cell fast
variances = noise * torch.logspace(-1.25, 0.5, 17, base=2)
objectives = {
    "stratified MPT": (Stratified(), 1),
    "fixed 15% MPT": (FixedRate(0.15), 4),
    "fixed 85% MPT": (FixedRate(0.85), 4),
}
scores: dict[str, list[float]] = {"exact LML": [], **{name: [] for name in objectives}}
for variance in variances:
    member = LowRankMultivariateNormal(
        model.loc, components.T * (spectrum - variance).sqrt(), torch.full((D,), variance.item())
    )
    scores["exact LML"].append(member.log_prob(subset).mean().item())
    for name, (scheme, num_masks) in objectives.items():
        common = torch.Generator().manual_seed(1)  # the same masks for every member
        estimate = mpt_score(member, subset, scheme, num_masks, generator=common, reduction="mean")
        scores[name].append(estimate.mean.item())

fig, ax = plt.subplots(figsize=(7, 4))
for name, values in scores.items():
    values = torch.tensor(values)
    best = variances[values.argmax()].item()
    print(f"{name:15} prefers noise variance {best:.4f}")
    line = ax.plot(variances, values - values.max(), label=f"{name}: best σ² = {best:.4f}")
    ax.axvline(best, color=line[0].get_color(), ls=":", lw=1)
ax.set_xscale("log")
ax.set_xlabel("noise variance σ² (W at its best for each σ²)")
ax.set_ylabel("score minus its maximum (per datum)")
ax.set_title("Which PPCA does each objective prefer?")
ax.legend()
fig.tight_layout()

# %% [markdown]
# The stratified MPT estimate peaks where the exact LML does (up to Monte-Carlo noise). The
# fixed-rate scores do not: with 85% of the pixels visible (15% masked) the model can afford to
# explain more of each pixel as noise, while with only 15% visible it does best by trusting its
# low-rank structure more and shrinking the noise. The sign of the training bias depends on the
# rate, just like the bias of the value. The cumulative and stratified schemes remove it.
#
# **Next:** tutorial 2 trains models with these objectives inside Pyro's `SVI`.
