"""The linear Bernoulli latent model: quadrature, SNIS conditionals, guide proposals, training."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_mpt.datasets import load_binarized_digits
from pyro_mpt.infer import MaskedPretrainingELBO, masked_observations
from pyro_mpt.infer.site_terms import snis_conditional_log_prob
from pyro_mpt.masks import Cumulative
from pyro_mpt.models import BernoulliLatentGuide, BernoulliLatentModel, fit, no_guide


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def toy():
    model = BernoulliLatentModel(5, init_scale=1.5, generator=_gen(1)).double()
    x = (torch.rand(8, 5, generator=_gen(2)) < 0.4).double()
    return model, x


def test_quadrature_matches_monte_carlo(toy):
    model, x = toy
    z = torch.randn(400_000, 2, generator=_gen(3), dtype=torch.float64)
    with torch.no_grad():
        log_lik = dist.Bernoulli(logits=model.logits(z)).log_prob(x.unsqueeze(1)).sum(-1)
        monte_carlo = log_lik.logsumexp(-1) - torch.log(torch.tensor(4e5, dtype=torch.float64))
        torch.testing.assert_close(model.log_marginal(x), monte_carlo, atol=0.015, rtol=0)


def test_conditionals_are_ratios_of_marginals(toy):
    model, x = toy
    mask = torch.tensor([True, False, True, False, False])
    conditional = model.conditional_log_prob(x, mask.expand_as(x))

    def marginal(dims):
        sub = BernoulliLatentModel(len(dims)).double()
        with torch.no_grad():
            sub.weight = model.weight[dims].clone()
            sub.bias = model.bias[dims].clone()
        return sub.log_marginal(x[:, dims])

    visible = [1, 3, 4]
    for j in [0, 2]:
        expected = marginal(sorted(visible + [j])) - marginal(visible)
        torch.testing.assert_close(conditional[:, j].detach(), expected.detach())
    assert (conditional[:, ~mask] == 0).all()


def test_snis_with_many_particles_approaches_quadrature(toy):
    model, x = toy
    masks = Cumulative().sample(5, (8,), 1, _gen(4)).masks
    with torch.no_grad():
        exact = model.conditional_log_prob(x, masks[0])
        z = torch.randn(200_000, 8, 2, generator=_gen(5), dtype=torch.float64)
        log_lik = dist.Bernoulli(logits=model.logits(z)).log_prob(x)
        estimate = snis_conditional_log_prob(log_lik.unsqueeze(0), masks)[0]
    torch.testing.assert_close(estimate, exact, atol=5e-3, rtol=0)


def test_guide_reads_only_the_visible_part():
    guide = BernoulliLatentGuide(3)
    with torch.no_grad():
        guide.loc_weight = torch.ones(3, 2)
    x = torch.tensor([[1.0, 1.0, 0.0]])
    full, _ = guide.encode(x)
    torch.testing.assert_close(full, torch.tensor([[1.0, 1.0]]))  # codes +1, +1, -1
    with masked_observations({"x": torch.tensor([[True, False, False]])}, {"x": x}):
        hidden, _ = guide.encode(x)
    torch.testing.assert_close(hidden, torch.tensor([[0.0, 0.0]]))  # the hidden +1 is gone


def test_guide_proposal_requires_a_guide_that_reads_the_view(toy):
    model, x = toy
    with pytest.raises(ValueError, match="never read observed site 'x'"):
        MaskedPretrainingELBO(proposal="guide").loss(model, AutoNormal(model), x)


def test_guide_proposal_and_prior_proposal_agree_with_quadrature(toy):
    model, x = toy
    guide = BernoulliLatentGuide(5).double()
    masks = Cumulative().sample(5, (8,), 8, _gen(6), dtype=torch.float64)
    exact = -(masks.weights * model.conditional_log_prob(x, masks.masks).sum(-1)).sum().item()
    for proposal in ["prior", "guide"]:
        elbo = MaskedPretrainingELBO(num_masks=8, num_importance_samples=20_000,
                                     max_importance_samples=20_000, proposal=proposal,
                                     generator=_gen(6))
        tolerance = 0.02 * masks.masks.sum().item()
        assert elbo.loss(model, guide, x) == pytest.approx(exact, abs=tolerance)


@pytest.fixture(scope="module")
def trained():
    """Trained by cumulative MPT on binarised digits (prior proposal, no guide needed)."""
    pyro.clear_param_store()
    x = load_binarized_digits()
    model = BernoulliLatentModel(64, generator=_gen(0))
    with torch.no_grad():
        initial = model.log_marginal(x).mean().item()
    fit(model, x, objective="mpt", steps=150, lr=0.05, batch_size=128, seed=0,
        num_importance_samples=64, track=None, progress=False)
    return model, x, initial


@pytest.mark.slow
def test_cumulative_mpt_training_raises_the_quadrature_lml(trained):
    model, x, initial = trained
    with torch.no_grad():
        final = model.log_marginal(x).mean().item()
    assert final > initial + 10.0, (initial, final)


@pytest.mark.slow
def test_snis_conditionals_match_quadrature_at_the_default_settings(trained):
    """The ELBO's own conditionals (Laplace proposals, K grown from 16 while the estimated bias
    or the effective sample size asks for it) against quadrature, per masked dimension."""
    model, x, _ = trained
    x = x[:200]
    elbo = MaskedPretrainingELBO(num_masks=4, generator=_gen(7))
    draw, sums = elbo.site_estimates(model, no_guide, x)["x"]
    with torch.no_grad():
        exact = model.conditional_log_prob(x, draw.masks).sum(-1)
    error = ((sums - exact).abs().sum() / draw.masks.sum()).item()
    assert error < 0.02, (error, elbo.importance_samples)
    bias = ((sums - exact).sum() / draw.masks.sum()).item()
    assert abs(bias) < 0.005, bias


@pytest.mark.parametrize("kwargs, match", [({"data_dim": 0}, "data_dim"),
                                            ({"latent_dim": 0}, "latent_dim"),
                                            # W = 0 is a stationary point: training never moves.
                                            ({"init_scale": 0.0}, "init_scale")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BernoulliLatentModel(**{"data_dim": 4, **kwargs})
    if "init_scale" not in kwargs:
        with pytest.raises(ValueError, match=match):
            BernoulliLatentGuide(**{"data_dim": 4, **kwargs})
