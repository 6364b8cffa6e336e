"""Laplace proposals for local latents: Newton's method against closed forms and autograd, the
widening rule against Monte Carlo, and K grown by the estimated bias."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import hessian

from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.infer.masked_pretraining_elbo import _widening
from pyro_mpt.infer.site_terms import laplace_approximation, snis_estimate
from pyro_mpt.masks import Exhaustive


def test_one_newton_step_is_exact_for_a_batch_of_gaussians():
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(5, 3, generator=g, dtype=torch.float64)
    root = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    precision = root @ root.mT + torch.eye(3, dtype=torch.float64)
    target = dist.MultivariateNormal(loc, precision_matrix=precision)
    mode, found = laplace_approximation(target.log_prob, torch.zeros(5, 3, dtype=torch.float64), 1)
    torch.testing.assert_close(mode, loc)  # each row its own: the rows do not mix
    torch.testing.assert_close(found, precision)


def test_newton_finds_the_mode_and_curvature_of_a_logistic_posterior():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, 20, 2, generator=g, dtype=torch.float64)  # 4 rows, 20 pixels
    labels = (torch.rand(4, 20, generator=g) < 0.5).double()

    def log_density(z):  # N(0, I) prior, Bernoulli(sigmoid(a_j . z)) likelihood
        logits = (features * z.unsqueeze(-2)).sum(-1)
        likelihood = dist.Bernoulli(logits=logits).log_prob(labels).sum(-1)
        return dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + likelihood

    mode, precision = laplace_approximation(log_density, torch.zeros(4, 2, dtype=torch.float64), 8)
    (grad,) = torch.autograd.grad(log_density(mode.requires_grad_()).sum(), mode)
    assert grad.abs().max() < 1e-10
    for row in range(4):

        def row_density(z, row=row):
            full = mode.detach().clone()
            full[row] = z
            return log_density(full)[row]

        expected = -hessian(row_density, mode[row].detach())
        torch.testing.assert_close(precision[row], expected, atol=1e-6, rtol=1e-6)


def test_an_indefinite_hessian_still_gives_an_ascent_step():
    def double_well(z):  # -(z^2 - 1)^2: convex near 0, where -f'' < 0
        return -(z.square() - 1).square().sum(-1)

    start = torch.tensor([[0.1], [-0.2]], dtype=torch.float64)
    mode, precision = laplace_approximation(double_well, start, 1)
    assert bool((double_well(mode) > double_well(start)).all())
    assert bool((precision > 0).all())


@pytest.mark.parametrize("dim", [1, 2, 10])
def test_widening_leaves_three_quarters_of_the_particles_effective(dim):
    g = torch.Generator().manual_seed(dim)
    scale = math.sqrt(_widening(dim))
    z = scale * torch.randn(200_000, dim, generator=g, dtype=torch.float64)
    log_w = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - dist.Normal(0.0, scale).log_prob(z).sum(-1)
    efficiency = (log_w.logsumexp(0) * 2 - (2 * log_w).logsumexp(0)).exp().item() / len(z)
    assert efficiency == pytest.approx(0.75, abs=0.02)


def test_the_estimated_bias_is_the_first_order_bias_of_the_log_ratio():
    """Against the bias measured over many draws (uncorrected log-mean of p(x_j | z_k) under
    prior particles), and the correction removes most of it."""
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True]])
    # p(x_j | z) = N(1; z, 0.5^2), z ~ N(0, 1): p(x_j) = N(1; 0, 1.25).
    exact = dist.Normal(0.0, math.sqrt(1.25)).log_prob(torch.tensor(1.0)).item()
    raw, corrected, estimated = [], [], []
    for _ in range(4000):
        z = torch.randn(1, 32, 1, generator=g, dtype=torch.float64)
        log_lik = dist.Normal(z, 0.5).log_prob(torch.tensor(1.0)).unsqueeze(-1)  # (1, K, 1, 1)
        estimate = snis_estimate(log_lik, mask)
        raw.append(torch.logsumexp(log_lik, 1).item() - math.log(32))
        corrected.append(estimate.conditionals.item())
        estimated.append(estimate.bias)
    raw_bias = sum(raw) / len(raw) - exact
    corrected_bias = sum(corrected) / len(corrected) - exact
    assert raw_bias < -0.01  # the log of a mean is biased low
    assert sum(estimated) / len(estimated) == pytest.approx(-raw_bias, rel=0.25)
    assert abs(corrected_bias) < abs(raw_bias) / 4


def _latent_ppca(noise):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, generator=g)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, noise).to_event(1), obs=x)

    x = (torch.randn(40, 2, generator=g) @ w.T) + noise * torch.randn(40, 6, generator=g)
    return model, x


def test_k_grows_where_the_estimate_asks_for_it_and_not_with_seed():
    easy, x_easy = _latent_ppca(3.0)  # the likelihood barely moves the prior
    hard, x_hard = _latent_ppca(0.1)  # p(x_j | z) is sharp: the numerators need particles
    elbo = MaskedPretrainingELBO(generator=torch.Generator().manual_seed(0))
    elbo.loss(easy, lambda x: None, x_easy)
    assert elbo.importance_samples["x"] == 16
    elbo.loss(hard, lambda x: None, x_hard)
    assert elbo.importance_samples["x"] > 16
    keyed = MaskedPretrainingELBO(seed=0)
    keyed.loss(hard, lambda x: None, x_hard)
    assert keyed.importance_samples["x"] == 16


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="max_importance_samples"):
        MaskedPretrainingELBO(num_importance_samples=64, max_importance_samples=32)
    with pytest.raises(ValueError, match="proposal must be 'laplace', 'prior' or 'guide'"):
        MaskedPretrainingELBO(proposal="adaptive")
    with pytest.raises(ValueError, match="newton_steps"):
        MaskedPretrainingELBO(newton_steps=0)


def test_a_flat_log_density_gets_the_floor_precision():
    """No curvature (a Laplace prior with nothing observed): the Gaussian is as wide as the
    floor allows, not infinitely wide."""

    def flat(z):  # -|z|: zero Hessian almost everywhere
        return -z.abs().sum(-1)

    start = torch.zeros(3, 2, dtype=torch.float64)
    floor = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    _, precision = laplace_approximation(flat, start, 1, min_precision=floor)
    expected = floor[:, None, None] * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(precision, expected)


def test_laplace_proposals_for_a_prior_without_curvature():
    """A Laplace prior on z: with every dimension masked the log-density has no curvature; the
    proposal falls back to the prior's width and the loss agrees with many prior particles."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, generator=g)
    x = torch.randn(30, 2, generator=g) @ w.T + 0.5 * torch.randn(30, 6, generator=g)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Laplace(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, 0.5).to_event(1), obs=x)

    elbo = MaskedPretrainingELBO(masks=Exhaustive())
    ours = sum(elbo.loss(model, lambda x: None, x) for _ in range(3)) / 3
    reference = MaskedPretrainingELBO(
        masks=Exhaustive(), proposal="prior", num_importance_samples=8192
    ).loss(model, lambda x: None, x)
    assert abs(ours - reference) / len(x) < 0.05  # measured 0.015 (mean of 3 draws)
