"""Bayesian linear regression: collapsed and latent-weight forms against the exact evidence."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_mpt.datasets import load_diabetes
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Exhaustive
from pyro_mpt.models import BayesianLinearRegression, fit, no_guide


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    targets = inputs @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    return inputs, targets + 0.3 * torch.randn(8, generator=generator, dtype=torch.float64)


def _model(collapsed=True):
    model = BayesianLinearRegression(3, prior_scale=0.8, noise_scale=0.4, collapsed=collapsed)
    return model.double()


def test_log_marginal_is_the_gaussian_evidence(data):
    inputs, targets = data
    cov = 0.64 * inputs @ inputs.T + 0.16 * torch.eye(8, dtype=torch.float64)
    expected = dist.MultivariateNormal(torch.zeros(8, dtype=torch.float64), cov).log_prob(targets)
    torch.testing.assert_close(_model().log_marginal(inputs, targets), expected)
    torch.testing.assert_close(_model(False).log_marginal(inputs, targets), expected)


def test_collapsed_exhaustive_mpt_is_the_evidence(data):
    model = _model()
    loss = MaskedPretrainingELBO(Exhaustive()).loss(model, no_guide, *data)
    assert loss == pytest.approx(-model.log_marginal(*data).item(), rel=1e-10)


def test_latent_weights_with_exact_posterior_give_the_evidence(data):
    inputs, targets = data
    model = _model(collapsed=False)
    precision = inputs.T @ inputs / 0.16 + torch.eye(3, dtype=torch.float64) / 0.64
    cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    loc = cov @ inputs.T @ targets / 0.16

    def guide(inputs, targets):
        pyro.sample("weights", dist.MultivariateNormal(loc, cov))

    exact = -model.log_marginal(inputs, targets).item()
    assert Trace_ELBO().loss(model, guide, inputs, targets) == pytest.approx(exact, rel=1e-6)
    # Given the weights the targets factorise, so the MPT term is the plain log-likelihood.
    assert MaskedPretrainingELBO().loss(model, guide, inputs, targets) == pytest.approx(
        exact, rel=1e-6
    )


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="input_dim"):
        BayesianLinearRegression(0)
    with pytest.raises(ValueError, match="3 columns"):
        BayesianLinearRegression(3).log_marginal(torch.ones(4, 2), torch.zeros(4))


@pytest.mark.slow
def test_type_ii_ml_by_mpt_matches_exact_evidence_maximisation():
    inputs, targets = load_diabetes(torch.float64)
    exact_model = BayesianLinearRegression(10).double()
    mpt_model = BayesianLinearRegression(10).double()
    fit(exact_model, inputs, targets, objective="exact", steps=300, lr=0.05, progress=False)
    fit(mpt_model, inputs, targets, objective="mpt", steps=300, lr=0.05, progress=False)
    with torch.no_grad():
        best = exact_model.log_marginal(inputs, targets).item()
        ours = mpt_model.log_marginal(inputs, targets).item()
    assert best - ours < 0.002 * abs(best), (best, ours)
