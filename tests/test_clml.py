"""ConditionalMarginalLogLikelihood: the split (Lotfi et al.) and masked estimators of one CLML.

Checked against independent computations: joint Gaussian conditionals by direct solves, every
conditioning set enumerated, and per-dimension scores S(y; t) by brute force.
"""

from __future__ import annotations

import itertools
import math

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior, NormalPrior

from pyro_mpt.gp import ConditionalMarginalLogLikelihood, MaskedPretrainingMLL
from pyro_mpt.gp._masked_exact_mll import _observations
from pyro_mpt.gp.conditional_marginal_log_likelihood import (
    clml_rate_range,
    held_out_size,
    split_log_prob,
    stratified_clml_masks,
)
from pyro_mpt.masks import Exhaustive, MaskSample, RateRange

DTYPE = torch.float64


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, priors=False, batch_shape=()):
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


def make_gp(n=9, priors=False, seed=0, batch_shape=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch_shape, n, 1, generator=gen, dtype=DTYPE)
    y = torch.sin(6 * x[..., 0]) + 0.3 * torch.randn(x.shape[:-1], generator=gen, dtype=DTYPE)
    lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size(batch_shape))
    model = GP(x, y, lik, priors, batch_shape).to(DTYPE)
    with torch.no_grad():
        model.covar_module.base_kernel.lengthscale = 0.3
        model.covar_module.outputscale = 1.2
        model.mean_module.constant.fill_(0.1)
        lik.noise = 0.1
    model.train()
    return x, y, lik, model


def naive_joint(mean, cov, y, held):
    """log p(y_H | y_C) by direct solves on the covariance blocks."""
    rest = [i for i in range(len(y)) if i not in held]
    held = list(held)
    if not rest:
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)
    gain = torch.linalg.solve(cov[rest][:, rest], cov[rest][:, held]).mT
    mu = mean[held] + gain @ (y[rest] - mean[rest])
    sigma = cov[held][:, held] - gain @ cov[rest][:, held]
    return torch.distributions.MultivariateNormal(mu, sigma).log_prob(y[held])


def naive_scores(mean, cov, y):
    """S(y; t) for t = 1..n, every mask enumerated, each conditional by a direct solve."""
    n = len(y)
    scores = torch.zeros(n, dtype=DTYPE)
    for t in range(1, n + 1):
        for masked in itertools.combinations(range(n), t):
            for j in masked:
                rest = [i for i in range(n) if i not in masked]
                if rest:
                    gain = torch.linalg.solve(cov[rest][:, rest], cov[rest, j])
                    mu = mean[j] + gain @ (y[rest] - mean[rest])
                    var = cov[j, j] - gain @ cov[rest, j]
                else:
                    mu, var = mean[j], cov[j, j]
                log_prob = torch.distributions.Normal(mu, var.sqrt()).log_prob(y[j])
                scores[t - 1] += log_prob / (t * math.comb(n, t))
    return scores


def moments(lik, model, x):
    with torch.no_grad():
        output = lik(model(x))
    return output.mean, output.covariance_matrix


# --- the fraction convention -------------------------------------------------------------------


def test_held_out_size_is_the_complement_of_the_fraction_conditioned_on():
    assert held_out_size(0.9, 100) == 10  # Lotfi et al.: condition on 90%, predict 10%
    assert held_out_size(0.75, 12) == 3
    assert held_out_size(0.9, 9) == 1  # at least one point
    assert held_out_size(0.0, 9) == 9  # nothing conditioned on: the LML
    for c in (0.9, 0.75, 0.5):
        masks = clml_rate_range(c).sample(40, num_masks=500, generator=torch.Generator()
                                          .manual_seed(0)).masks.sum(-1)
        assert masks.min() == 1 and masks.max() == held_out_size(c, 40)
    with pytest.raises(ValueError, match="condition_fraction"):
        held_out_size(1.0, 10)


# --- the split estimator: the joint conditional, by the chain rule ----------------------------


def test_split_log_prob_is_the_joint_conditional():
    x, y, lik, model = make_gp(n=10)
    mean, cov = moments(lik, model, x)
    gen = torch.Generator().manual_seed(1)
    held = torch.stack([torch.randperm(10, generator=gen) < p for p in (1, 3, 3, 7, 10)])
    with torch.no_grad():
        observations = _observations(lik(model(x)), y)
    for row in held:
        value = split_log_prob(observations, row.unsqueeze(0))
        expected = naive_joint(mean, cov, y, row.nonzero().squeeze(-1).tolist())
        assert value.item() == pytest.approx(expected.item(), abs=1e-10)


def test_nothing_conditioned_on_is_exact_marginal_log_likelihood_with_priors():
    x, y, lik, model = make_gp(n=9, priors=True)
    clml = ConditionalMarginalLogLikelihood(lik, model, condition_fraction=0.0,
                                            generator=torch.Generator().manual_seed(0))
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    value, reference = clml(model(x), y), exact(model(x), y)
    assert value.item() == pytest.approx(reference.item(), abs=1e-12)
    (grad,) = torch.autograd.grad(value, model.covar_module.raw_outputscale)
    (ref_grad,) = torch.autograd.grad(exact(model(x), y), model.covar_module.raw_outputscale)
    assert grad.item() == pytest.approx(ref_grad.item(), abs=1e-12)


# --- Must-show 1: exhaustive equality and unbiasedness ------------------------------------------


@pytest.mark.parametrize("n,condition_fraction", [(8, 0.75), (9, 0.5), (12, 0.75)])
def test_exhaustive_split_average_is_the_exhaustive_rate_range_target(n, condition_fraction):
    x, y, lik, model = make_gp(n=n, seed=n)
    p = held_out_size(condition_fraction, n)
    with torch.no_grad():
        observations = _observations(lik(model(x)), y)
        # Every conditioning set of size n - p, each held-out block scored jointly.
        sets = torch.tensor(list(itertools.combinations(range(n), p)))
        held = torch.zeros(len(sets), n, dtype=torch.bool).scatter_(-1, sets, True)
        split = split_log_prob(observations, held).mean()
        # Exhaustive masks restricted to the RateRange(0, p/n) sizes: the masked target.
        draw = Exhaustive().sample(n, dtype=DTYPE)
        keep = draw.masks.sum(-1) <= p
        restricted = MaskSample(draw.masks[keep], draw.weights[keep], draw.strata[keep], True)
        masked = MaskedPretrainingMLL(lik, model, masks=Exhaustive())
        mean, var = masked.conditionals(model(x), y, restricted.masks)
        log_prob = torch.distributions.Normal(mean, var.clamp(min=1e-300).sqrt()).log_prob(y)
        target = restricted.estimate(log_prob).mean
    assert split.item() == pytest.approx(target.item(), abs=1e-8)
    if n <= 9:  # every mask by direct solves: independent of the Cholesky-based core
        naive = naive_scores(*moments(lik, model, x), y)[:p].sum()
        assert target.item() == pytest.approx(naive.item(), abs=1e-8)


@pytest.mark.parametrize("estimator", ["split", "masked"])
def test_monte_carlo_estimators_average_to_the_target(estimator):
    n, c = 12, 0.75
    x, y, lik, model = make_gp(n=n, seed=3)
    p = held_out_size(c, n)
    with torch.no_grad():
        observations = _observations(lik(model(x)), y)
        sets = torch.tensor(list(itertools.combinations(range(n), p)))
        held = torch.zeros(len(sets), n, dtype=torch.bool).scatter_(-1, sets, True)
        target = split_log_prob(observations, held).mean().item()
        clml = ConditionalMarginalLogLikelihood(lik, model, c, estimator, num_draws=400,
                                                generator=torch.Generator().manual_seed(7))
        est = clml.estimate(model(x), y)
    assert est.stderr > 0
    assert abs(est.mean.item() - target) < 4 * est.stderr.item()


def test_masked_estimator_has_lower_variance_than_split_at_equal_cost():
    """Both draw p masks (sizes p..1 nested for a split, 1..p independent for the masked one)
    from the same factor; measured variance ratio on this GP, n = 40, c = 0.75: see the report."""
    n, c = 40, 0.75
    x, y, lik, model = make_gp(n=n, seed=5)
    variances = {}
    with torch.no_grad():
        for estimator in ("split", "masked"):
            clml = ConditionalMarginalLogLikelihood(lik, model, c, estimator, num_draws=1,
                                                    generator=torch.Generator().manual_seed(11))
            draws = torch.stack([clml.estimate(model(x), y).mean for _ in range(200)])
            variances[estimator] = draws.var().item()
    assert variances["masked"] < variances["split"] / 2, variances


# --- drop-in behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["split", "masked"])
def test_objective_is_per_held_out_point_with_priors_and_gradients(estimator):
    x, y, lik, model = make_gp(n=20, priors=True)
    clml = ConditionalMarginalLogLikelihood(lik, model, 0.9, estimator,
                                            generator=torch.Generator().manual_seed(2))
    value = clml(model(x), y)
    clml.generator.manual_seed(2)
    est = clml.estimate(model(x), y)
    priors = sum(prior.log_prob(closure(module)).sum()
                 for _, module, prior, closure, _ in model.named_priors())
    assert value.item() == pytest.approx((est.mean + priors).item() / 2, abs=1e-10)  # p = 2
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("estimator", ["split", "masked"])
def test_batch_gp_one_value_per_batch_element(estimator):
    x, y, lik, model = make_gp(n=10, batch_shape=(3,))
    clml = ConditionalMarginalLogLikelihood(lik, model, 0.7, estimator,
                                            generator=torch.Generator().manual_seed(0))
    value = clml(model(x), y)
    assert value.shape == (3,)
    # Each batch element alone, with its own factor: the same target (exhaustive split average).
    with torch.no_grad():
        observations = _observations(lik(model(x)), y)
        sets = torch.tensor(list(itertools.combinations(range(10), 3)))
        held = torch.zeros(len(sets), 1, 10, dtype=torch.bool).scatter_(-1, sets[:, None], True)
        exact = split_log_prob(observations, held.expand(-1, 3, -1)).mean(0)
    mean, cov = moments(lik, model, x)
    for b in range(3):
        naive = torch.stack([naive_joint(mean[b], cov[b], y[b], h.tolist()) for h in sets]).mean()
        assert exact[b].item() == pytest.approx(naive.item(), abs=1e-10)


def test_stratified_masks_are_one_per_size_and_weighted():
    draw = stratified_clml_masks(4, 10, (2,), num_draws=3, generator=torch.Generator()
                                 .manual_seed(0), dtype=DTYPE)
    sizes = draw.masks.sum(-1)
    assert sizes.shape == (12, 2) and sizes[:, 0].tolist() == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert torch.allclose(draw.weights, 1 / (3 * sizes.to(DTYPE)))
    assert draw.strata.tolist() == sizes[:, 0].sub(1).tolist()


def test_bad_arguments():
    x, y, lik, model = make_gp(n=6)
    with pytest.raises(ValueError, match="estimator"):
        ConditionalMarginalLogLikelihood(lik, model, estimator="joint")
    with pytest.raises(ValueError, match="condition_fraction"):
        ConditionalMarginalLogLikelihood(lik, model, condition_fraction=1.0)
    with pytest.raises(ValueError, match="num_draws"):
        ConditionalMarginalLogLikelihood(lik, model, num_draws=0)
    assert isinstance(clml_rate_range(0.5), RateRange)


# --- Pyro: the same target through MaskedPretrainingELBO and clml_rate_range -----------------


def test_pyro_elbo_with_clml_rate_range_estimates_the_per_row_clml():
    import pyro
    import pyro.distributions as dist

    from pyro_mpt.infer import MaskedPretrainingELBO

    gen = torch.Generator().manual_seed(0)
    size, rows, c = 6, 5, 0.5
    factor = torch.randn(size, size, generator=gen, dtype=DTYPE)
    cov = factor @ factor.mT / size + 0.3 * torch.eye(size, dtype=DTYPE)
    loc = torch.zeros(size, dtype=DTYPE)
    data = torch.distributions.MultivariateNormal(loc, cov).sample((rows,))

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.MultivariateNormal(loc, cov), obs=x)

    def guide(x):
        pass

    p = held_out_size(c, size)  # condition on 3 of 6 dimensions, predict 3
    exact = sum(
        torch.stack([naive_joint(loc, cov, row, list(h))
                     for h in itertools.combinations(range(size), p)]).mean()
        for row in data
    ).item()
    losses = torch.tensor([
        MaskedPretrainingELBO(clml_rate_range(c), num_masks=20,
                              generator=torch.Generator().manual_seed(seed)).loss(model, guide,
                                                                                  data)
        for seed in range(30)
    ])
    stderr = losses.std().item() / math.sqrt(len(losses))
    assert abs(-losses.mean().item() - exact) < 4 * stderr, (losses.mean(), exact, stderr)
