"""MaskedPretrainingMLL and LeavePOutPseudoLikelihood against GPyTorch's own exact computations."""

from __future__ import annotations

import copy
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
    def __init__(self, x, y, likelihood, batch_shape=(), priors=False):
        super().__init__(x, y, likelihood)
        batch_shape = torch.Size(batch_shape)
        self.mean_module = gpytorch.means.ConstantMean(
            batch_shape=batch_shape, constant_prior=NormalPrior(0.0, 1.0) if priors else None
        )
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(
                batch_shape=batch_shape,
                lengthscale_prior=GammaPrior(3.0, 6.0) if priors else None,
            ),
            batch_shape=batch_shape,
            outputscale_prior=GammaPrior(2.0, 0.5) if priors else None,
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MultitaskGP(gpytorch.models.ExactGP):
    """Two tasks, either a coregionalised (interleaved) or an independent (blocked) covariance."""

    def __init__(self, x, y, likelihood, interleaved: bool):
        super().__init__(x, y, likelihood)
        self.interleaved = interleaved
        if interleaved:
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), 2)
            self.covar_module = gpytorch.kernels.MultitaskKernel(
                gpytorch.kernels.RBFKernel(), num_tasks=2, rank=1
            )
        else:
            batch = torch.Size([2])
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
            self.covar_module = gpytorch.kernels.RBFKernel(batch_shape=batch)

    def forward(self, x):
        if self.interleaved:
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(
            gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        )


def make_gp(n=8, batch_shape=(), likelihood="gaussian", priors=False, dtype=DTYPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch_shape = torch.Size(batch_shape)
    x = torch.rand(*batch_shape, n, 1, generator=gen, dtype=dtype)
    y = torch.sin(6 * x[..., 0]) + 0.3 * torch.randn(*batch_shape, n, generator=gen, dtype=dtype)
    if likelihood == "gaussian":
        lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch_shape)
    else:
        noise = 0.05 + 0.1 * torch.rand(*batch_shape, n, generator=gen, dtype=dtype)
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    model = GP(x, y, lik, batch_shape, priors).to(dtype)
    # Hyperparameters away from their defaults, different per batch element.
    with torch.no_grad():
        model.covar_module.base_kernel.lengthscale = 0.2 + 0.3 * torch.rand(
            model.covar_module.base_kernel.lengthscale.shape, generator=gen, dtype=dtype
        )
        model.covar_module.outputscale = 0.5 + torch.rand(
            model.covar_module.outputscale.shape, generator=gen, dtype=dtype
        )
        model.mean_module.constant.fill_(0.1)
        if likelihood == "gaussian":
            lik.noise = 0.05 + 0.1 * torch.rand(lik.noise.shape, generator=gen, dtype=dtype)
    lik.to(dtype)
    model.train()
    lik.train()
    return x, y, lik, model


def value_and_grads(mll, model, x, y):
    model.zero_grad()
    value = mll(model(x), y)
    value.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return value.detach(), grads


def assert_close_with_grads(ours, theirs, model, x, y, atol=1e-8):
    value, grads = value_and_grads(ours, model, x, y)
    expected, expected_grads = value_and_grads(theirs, model, x, y)
    torch.testing.assert_close(value, expected, atol=atol, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)


# --- Must show 1: exhaustive masks give the exact MLL ------------------------------------------


@pytest.mark.parametrize("priors", [False, True])
@pytest.mark.parametrize("likelihood", ["gaussian", "fixed_noise"])
@pytest.mark.parametrize("batch_shape", [(), (3,)])
def test_exhaustive_equals_exact_mll(priors, likelihood, batch_shape):
    x, y, lik, model = make_gp(8, batch_shape, likelihood, priors)
    ours = MaskedPretrainingMLL(lik, model, masks=Exhaustive(), num_masks=1)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    assert_close_with_grads(ours, exact, model, x, y)


def test_exhaustive_equals_exact_mll_at_n_10():
    x, y, lik, model = make_gp(10, priors=True)
    ours = MaskedPretrainingMLL(lik, model, masks=Exhaustive())
    assert_close_with_grads(ours, gpytorch.mlls.ExactMarginalLogLikelihood(lik, model), model, x, y)


@pytest.mark.parametrize("interleaved", [True, False])
def test_multitask_exhaustive_equals_exact_mll(interleaved):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, generator=gen, dtype=DTYPE)
    y = torch.randn(4, 2, generator=gen, dtype=DTYPE)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(
        num_tasks=2, rank=0 if not interleaved else 1
    )
    model = MultitaskGP(x, y, lik, interleaved).to(DTYPE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=gen, dtype=DTYPE))
    ours = MaskedPretrainingMLL(lik, model, masks=Exhaustive())
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    assert_close_with_grads(ours, exact, model, x, y)


def test_nan_targets_follow_observation_nan_policy():
    x, y, lik, model = make_gp(8)
    y = y.clone()
    y[[1, 5]] = float("nan")
    ours = MaskedPretrainingMLL(lik, model, masks=Exhaustive())
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    with gpytorch.settings.observation_nan_policy("mask"):
        assert_close_with_grads(ours, exact, model, x, y)
    with pytest.raises(ValueError, match="target contains NaN.*observation_nan_policy"):
        ours(model(x), y)
    with gpytorch.settings.observation_nan_policy("fill"), pytest.raises(ValueError, match="fill"):
        ours(model(x), y)


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


def test_float32_matches_float64():
    x, y, lik, model = make_gp(8)
    model32 = copy.deepcopy(model).float()
    with torch.no_grad():
        ours = MaskedPretrainingMLL(model32.likelihood, model32, masks=Exhaustive())(
            model32(x.float()), y.float()
        )
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - exact.item()) < 1e-5


# --- Must show 2: leave-p-out ------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (2,)])
@pytest.mark.parametrize("priors", [False, True])
def test_leave_one_out_equals_gpytorch(batch_shape, priors):
    x, y, lik, model = make_gp(15, batch_shape, priors=priors)
    ours = LeavePOutPseudoLikelihood(lik, model, rate=1 / 15)
    loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(lik, model)
    assert_close_with_grads(ours, loo, model, x, y)


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


def test_rejects_non_gaussian_likelihood():
    x, y, _, model = make_gp(5)
    with pytest.raises(TypeError, match="likelihood must be a Gaussian"):
        MaskedPretrainingMLL(gpytorch.likelihoods.BernoulliLikelihood(), model)
    with pytest.raises(TypeError, match="likelihood must be a Gaussian"):
        LeavePOutPseudoLikelihood(gpytorch.likelihoods.BernoulliLikelihood(), model, rate=0.2)


def test_rejects_approximate_gp():
    class VariationalGP(gpytorch.models.ApproximateGP):
        def __init__(self, inducing):
            dist = gpytorch.variational.CholeskyVariationalDistribution(len(inducing))
            strategy = gpytorch.variational.VariationalStrategy(self, inducing, dist)
            super().__init__(strategy)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                torch.zeros(len(x)), gpytorch.kernels.RBFKernel()(x)
            )

    model = VariationalGP(torch.rand(4, 1))
    lik = gpytorch.likelihoods.GaussianLikelihood()
    with pytest.raises(TypeError, match="model must be a gpytorch.models.ExactGP"):
        MaskedPretrainingMLL(lik, model)
    with pytest.raises(TypeError, match="model must be a gpytorch.models.ExactGP"):
        LeavePOutPseudoLikelihood(lik, model, rate=0.1)


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
    mll = MaskedPretrainingMLL(lik, model)
    with pytest.raises(TypeError, match="function_dist must be a gpytorch"):
        mll(torch.distributions.Normal(torch.zeros(5), 1.0), y)
    with pytest.raises(ValueError, match="target must end with"):
        mll(model(x), y[:4])
    with pytest.raises(ValueError, match="at least one observation"):
        mll.conditionals(model(x), y, torch.zeros(5, dtype=torch.bool))


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
