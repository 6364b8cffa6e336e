"""Local latents integrated by importance sampling: bias at the default settings, gradients,
proposals that are not the prior, and the wake-phi update that trains a guide proposal."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt.datasets import load_binarized_digits
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Exhaustive, FixedRate
from pyro_mpt.models import BernoulliLatentGuide, BernoulliLatentModel

D, L, N = 6, 2, 50


@pytest.fixture(scope="module")
def latent_ppca():
    """Latent-form PPCA, D = 6, noise 0.3: p(z | x_R) is far narrower than the prior."""
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(D, L, generator=g, dtype=torch.float64)
    marginal = dist.LowRankMultivariateNormal(
        torch.zeros(D, dtype=torch.float64), true_w, torch.full((D,), 0.09, dtype=torch.float64)
    )
    x = marginal.sample((N,))
    w = (true_w + 0.2 * torch.randn(D, L, generator=g, dtype=torch.float64)).requires_grad_()
    log_noise = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(L, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, log_noise.exp()).to_event(1), obs=x)

    def exact_loss():
        marginal = dist.LowRankMultivariateNormal(
            torch.zeros_like(x[0]), w, (2 * log_noise).exp().expand(D)
        )
        return -marginal.log_prob(x).sum()

    return model, x, exact_loss, (w, log_noise)


def test_default_settings_estimate_the_lml_of_latent_ppca(latent_ppca):
    """Prior particles alone (adapt_steps=0, K = 256) were off by +0.78 nats per row here."""
    model, x, exact_loss, _ = latent_ppca
    exact = exact_loss().item()
    # Exhaustive masks: no mask noise, so what remains is the importance-sampling error.
    losses = [MaskedPretrainingELBO(masks=Exhaustive()).loss(model, lambda x: None, x)
              for _ in range(4)]
    assert abs(sum(losses) / len(losses) - exact) / N < 0.05
    prior_only = MaskedPretrainingELBO(masks=Exhaustive(), adapt_steps=0)
    with pytest.warns(UserWarning, match="collapsed"):
        biased = prior_only.loss(model, lambda x: None, x)
    assert (biased - exact) / N > 0.3  # what the adaptation fixes: the test can see it


def test_expected_gradient_aligns_with_the_exact_lml_gradient(latent_ppca):
    """Prior particles alone: cosine 0.87 and dLoss/dlog(sigma) -80 where the exact is -1.4."""
    model, x, exact_loss, params = latent_ppca
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_loss(), params)])
    elbo = MaskedPretrainingELBO(generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(40):
        loss = elbo.differentiable_loss(model, lambda x: None, x)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    mean = torch.stack(grads).mean(0)
    assert torch.nn.functional.cosine_similarity(mean, exact, dim=0) >= 0.99


def test_effective_sample_size_is_reported_per_site(latent_ppca):
    model, x, _, _ = latent_ppca
    elbo = MaskedPretrainingELBO(num_importance_samples=64)
    elbo.loss(model, lambda x: None, x)
    ess = elbo.effective_sample_size["x"]
    assert ess.shape == (1, N) and bool(((ess >= 1) & (ess <= 64)).all())


@pytest.fixture(scope="module")
def bernoulli():
    x = load_binarized_digits(dtype=torch.float64)[:40]
    model = BernoulliLatentModel(64, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # loadings large enough that p(z | x_R) is far from the prior
        model.weight.mul_(25.0)
    return model, x


def shifted_encoder():
    """An encoder that is not the prior: biased and too narrow, so that importance weights are
    needed (dropping them moves the estimate by far more than the tolerance below)."""
    guide = BernoulliLatentGuide(64).double()
    with torch.no_grad():
        guide.loc_bias.fill_(0.7)
        guide.scale_bias.fill_(-0.5)  # softplus(-0.5) = 0.47
    return guide


@pytest.mark.parametrize("proposal", ["prior", "guide"])
def test_snis_conditionals_match_quadrature_with_a_proposal_that_is_not_the_prior(
    bernoulli, proposal
):
    model, x = bernoulli
    guide = shifted_encoder()
    rate, num_masks = 0.25, 4
    draw = FixedRate(rate).sample(64, x.shape[:1], num_masks, torch.Generator().manual_seed(3),
                                  dtype=torch.float64)
    with torch.no_grad():
        exact = torch.stack([model.conditional_log_prob(x, mask) for mask in draw.masks])
    per_dimension = draw.masks.sum().item() * 64 / 16 / num_masks  # weight D/m per mask
    expected = -(draw.weighted_sums(exact).sum().item())
    elbo = MaskedPretrainingELBO(masks=FixedRate(rate), num_masks=num_masks, proposal=proposal,
                                 generator=torch.Generator().manual_seed(3))
    loss = elbo.loss(model, guide, x)
    assert abs(loss - expected) / per_dimension < 0.02
    if proposal == "guide":
        # Without the importance correction (weights p(z) p(x_R | z) / q(z)) it is far off.
        uncorrected = MaskedPretrainingELBO(masks=FixedRate(rate), num_masks=num_masks,
                                            num_importance_samples=1, proposal="guide",
                                            generator=torch.Generator().manual_seed(3))
        losses = [uncorrected.loss(model, guide, x) for _ in range(8)]
        assert abs(sum(losses) / 8 - expected) / per_dimension > 0.1


def test_wake_phi_trains_a_guide_proposal_towards_the_posterior():
    """proposal='guide': the same step trains the encoder (reweighted wake-sleep, wake-phi);
    its effective sample size rises from the prior's (measured: 17 -> about 50 of 64)."""
    x = load_binarized_digits(dtype=torch.float64)[:40]
    model = BernoulliLatentModel(64, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        model.weight.mul_(8.0)
    guide = BernoulliLatentGuide(64).double()  # starts at the prior
    elbo = MaskedPretrainingELBO(proposal="guide", num_importance_samples=64,
                                 generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.02)
    elbo.loss(model, guide, x)
    before = elbo.effective_sample_size["x"].median().item()
    for _ in range(60):
        optimizer.zero_grad()
        elbo.differentiable_loss(model, guide, x).backward()
        assert guide.loc_weight.grad is not None and guide.loc_weight.grad.abs().sum() > 0
        optimizer.step()
    elbo.loss(model, guide, x)
    after = elbo.effective_sample_size["x"].median().item()
    assert after > 2 * before, (before, after)


@pytest.mark.slow
def test_training_latent_ppca_recovers_the_noise_mle():
    """Default settings, z integrated by adaptive importance sampling: sigma within 1% of the
    closed-form maximum-likelihood value (measured +0.51% after 800 steps; K = 128 ended 1.4%
    high, the O(1/K) bias of the estimator pushing the noise up)."""
    from pyro_mpt.training import fit_svi

    g = torch.Generator().manual_seed(0)
    n = 100
    true_w = torch.randn(D, L, generator=g, dtype=torch.float64)
    x = dist.LowRankMultivariateNormal(
        torch.zeros(D, dtype=torch.float64), true_w, torch.full((D,), 0.09, dtype=torch.float64)
    ).sample((n,))
    x = x - x.mean(0)
    # Tipping & Bishop: sigma^2 is the mean of the D - L smallest eigenvalues of the covariance.
    sigma_mle = torch.linalg.eigvalsh(x.T @ x / n)[: D - L].mean().sqrt().item()
    w = torch.nn.Parameter(0.5 * torch.randn(D, L, generator=g, dtype=torch.float64))
    log_noise = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def model(x):
        pyro.module("ppca", torch.nn.ParameterList([w, log_noise]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(L, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, log_noise.exp()).to_event(1), obs=x)

    elbo = MaskedPretrainingELBO(generator=torch.Generator().manual_seed(1))
    fit_svi(model, lambda x: None, elbo, x, steps=800, lr=0.05, progress=False)
    assert log_noise.exp().item() == pytest.approx(sigma_mle, rel=0.01)
