"""MaskedPretrainingMLL and LeavePOutPseudoLikelihood: estimates, folds and arguments.

Agreement with gpytorch.mlls (exact MLL, leave-one-out, jitter, large n, bad input) is checked in
tests/conformance/test_gpytorch.py.
"""

from __future__ import annotations

import itertools
import math

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior, NormalPrior

from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL
from pyro_mpt.gp.leave_p_out_pseudo_likelihood import fold_masks
from pyro_mpt.masks import Cumulative, Exhaustive, FixedRate, RateRange

DTYPE = torch.float64


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, priors=False):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(
            constant_prior=NormalPrior(0.0, 1.0) if priors else None
        )
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(lengthscale_prior=GammaPrior(3.0, 6.0) if priors else None),
            outputscale_prior=GammaPrior(2.0, 0.5) if priors else None,
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_gp(n=8, priors=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen, dtype=DTYPE)
    y = torch.sin(6 * x[..., 0]) + 0.3 * torch.randn(n, generator=gen, dtype=DTYPE)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, lik, priors).to(DTYPE)
    # Hyperparameters away from their defaults.
    with torch.no_grad():
        kernel = model.covar_module
        kernel.base_kernel.lengthscale = 0.2 + 0.3 * torch.rand(1, 1, generator=gen, dtype=DTYPE)
        kernel.outputscale = 0.5 + torch.rand((), generator=gen, dtype=DTYPE)
        model.mean_module.constant.fill_(0.1)
        lik.noise = 0.05 + 0.1 * torch.rand(1, generator=gen, dtype=DTYPE)
    model.train()
    return x, y, lik, model


# --- Cumulative and RateRange estimates are unbiased for their targets ------------------------


def brute_force_scores(lik, model, x, y) -> torch.Tensor:
    """S(y; m) for m = 1..n by enumerating every mask and solving each conditional directly."""
    with torch.no_grad():
        output = lik(model(x))
        mean, cov = output.mean, output.covariance_matrix
    n = len(y)
    scores = torch.zeros(n, dtype=DTYPE)
    for m in range(1, n + 1):
        for masked in itertools.combinations(range(n), m):
            rest = [i for i in range(n) if i not in masked]
            for j in masked:
                if rest:
                    gain = torch.linalg.solve(cov[rest][:, rest], cov[rest, j])
                    mu = mean[j] + gain @ (y[rest] - mean[rest])
                    var = cov[j, j] - gain @ cov[rest, j]
                else:
                    mu, var = mean[j], cov[j, j]
                log_prob = torch.distributions.Normal(mu, var.sqrt()).log_prob(y[j])
                scores[m - 1] += log_prob / (m * math.comb(n, m))
    return scores


@pytest.mark.parametrize(
    "masks, sizes", [(Cumulative(), range(1, 7)), (RateRange(0.0, 0.5), range(1, 4))]
)
def test_random_masks_are_unbiased(masks, sizes):
    n = 6
    x, y, lik, model = make_gp(n)
    scores = brute_force_scores(lik, model, x, y)
    # The cumulative score is the log marginal likelihood.
    with torch.no_grad():
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y)
    torch.testing.assert_close(scores.sum() / n, exact, atol=1e-10, rtol=0)

    target = scores[[m - 1 for m in sizes]].sum() / n
    mll = MaskedPretrainingMLL(
        lik, model, masks=masks, num_masks=500, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        draws = torch.stack([mll(model(x), y) for _ in range(20)])
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - target) < 4 * stderr
    assert stderr < 0.01


def test_seeded_generator_is_deterministic():
    x, y, lik, model = make_gp(20)
    values = []
    for _ in range(2):
        mll = MaskedPretrainingMLL(lik, model, generator=torch.Generator().manual_seed(3))
        values.append(torch.stack([mll(model(x), y) for _ in range(3)]))
    assert torch.equal(values[0], values[1])
    assert len(set(values[0].tolist())) == 3  # but masks change from call to call


# --- Must show 2: leave-p-out ------------------------------------------------------------------


def refit_predictive(lik, model, x, y, masked):
    """gpytorch's own prediction at x[masked] from a fresh GP conditioned on the other points."""
    rest = ~masked
    fresh_lik = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    fresh = GP(x[rest], y[rest], fresh_lik, priors=True).to(DTYPE)
    fresh.load_state_dict(model.state_dict())
    fresh_lik.load_state_dict(lik.state_dict())
    fresh.eval()
    fresh_lik.eval()
    with torch.no_grad():
        pred = fresh_lik(fresh(x[masked]))
    return pred.mean, pred.variance


@pytest.mark.parametrize("p", [2, 3])
def test_leave_p_out_matches_naive_refit(p):
    n = 12
    x, y, lik, model = make_gp(n, priors=True)
    mll = LeavePOutPseudoLikelihood(
        lik, model, rate=p / n, generator=torch.Generator().manual_seed(7)
    )
    value = mll(model(x), y).detach()

    folds = fold_masks(p, n, generator=torch.Generator().manual_seed(7)).masks
    assert folds.shape == (n // p, n) and torch.equal(folds.sum(0), torch.ones(n, dtype=torch.long))
    with torch.no_grad():
        mean, var = mll.conditionals(model(x), y, folds)
    expected = 0.0
    for fold, fold_mean, fold_var in zip(folds, mean, var, strict=True):
        refit_mean, refit_var = refit_predictive(lik, model, x, y, fold)
        torch.testing.assert_close(fold_mean[fold], refit_mean, atol=1e-8, rtol=0)
        torch.testing.assert_close(fold_var[fold], refit_var, atol=1e-8, rtol=0)
        expected += torch.distributions.Normal(refit_mean, refit_var.sqrt()).log_prob(y[fold]).sum()
    # Same folds from the same seed: the objective is the refit's mean log predictive density.
    priors = sum(
        prior.log_prob(closure(module)).sum()
        for _, module, prior, closure, _ in model.named_priors()
    )
    torch.testing.assert_close(value, (expected + priors) / n, atol=1e-8, rtol=0)


def test_fold_masks_cover_each_point_at_most_once():
    draw = fold_masks(3, 10, batch_shape=(4,), generator=torch.Generator().manual_seed(0))
    assert draw.masks.shape == (3, 4, 10)
    assert bool((draw.masks.sum(-1) == 3).all()) and bool((draw.masks.sum(0) <= 1).all())
    torch.testing.assert_close(draw.weights, torch.full((3, 4), 10 / 9))


def test_fixed_rate_masks_estimate_the_leave_p_out_score():
    n = 6
    x, y, lik, model = make_gp(n)
    scores = brute_force_scores(lik, model, x, y)
    lpo = LeavePOutPseudoLikelihood(
        lik, model, rate=0.5, generator=torch.Generator().manual_seed(0)
    )
    mpt = MaskedPretrainingMLL(
        lik, model, masks=FixedRate(0.5), num_masks=200, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for mll in (lpo, mpt):
            draws = torch.stack([mll(model(x), y) for _ in range(30)])
            stderr = draws.std() / math.sqrt(len(draws))
            assert abs(draws.mean() - scores[2]) < 4 * stderr


# --- Must show 4: bad input --------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_rejects_rate_outside_unit_interval(rate):
    _, _, lik, model = make_gp(5)
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\]"):
        LeavePOutPseudoLikelihood(lik, model, rate=rate)


def test_rejects_bad_arguments():
    x, y, lik, model = make_gp(5)
    with pytest.raises(TypeError, match="masks must be a pyro_mpt.masks.MaskScheme"):
        MaskedPretrainingMLL(lik, model, masks="cumulative")
    with pytest.raises(ValueError, match="num_masks must be a positive integer"):
        MaskedPretrainingMLL(lik, model, num_masks=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        MaskedPretrainingMLL(lik, model, generator=0)


def test_mask_weights_are_exact_in_the_requested_dtype():
    # A float64 model needs float64 weights even under a float32 default dtype (Exhaustive's
    # 1 / (C(n, m) m) is not a float32 number).
    draw = Exhaustive().sample(10, dtype=torch.float64)
    assert draw.weights.dtype == torch.float64
    sizes = draw.masks.sum(-1)
    expected = torch.tensor([1 / (math.comb(10, m) * m) for m in sizes.tolist()], dtype=DTYPE)
    assert torch.equal(draw.weights, expected)
    assert Exhaustive().sample(3).weights.dtype == torch.get_default_dtype()
    assert isinstance(MaskedPretrainingMLL(*make_gp(5)[2:]), gpytorch.mlls.MarginalLogLikelihood)


@pytest.mark.parametrize("rate", [None, 1 / 6, 0.5])
def test_masks_are_drawn_for_the_targets_device(rate):
    # CUDA targets need CUDA masks and weights; the meta device checks the plumbing on any machine.
    _, _, lik, model = make_gp(6)
    generator = torch.Generator().manual_seed(0)
    if rate is None:
        mll = MaskedPretrainingMLL(lik, model, generator=generator)
    else:
        mll = LeavePOutPseudoLikelihood(lik, model, rate=rate, generator=generator)
    meta = torch.device("meta")
    draw = mll.draw_masks(6, torch.Size([2]), torch.float32, meta)
    assert [t.device for t in draw[:3]] == [meta] * 3
    assert draw.masks.shape[1:] == (2, 6) and draw.weights.dtype == torch.float32
