"""Per-row evidence of Pyro models with local latents: the masked estimate through the ELBO's own
conditionals, and importance sampling, each against an independent computation."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_mpt.infer.evidence as evidence
from pyro_mpt.datasets import load_binarized_digits
from pyro_mpt.evaluate import evaluate_model, importance_log_marginal, mpt_log_marginal
from pyro_mpt.masks import Cumulative
from pyro_mpt.models import PPCA, BernoulliLatentGuide, BernoulliLatentModel
from pyro_mpt.models.fitting import fit
from pyro_mpt.training import fit_svi


@pytest.fixture(scope="module")
def bernoulli():
    """The Bernoulli latent model fitted to 24 binarised digits by its quadrature LML, an
    amortised encoder fitted by Trace_ELBO with the model fixed, and the quadrature truth."""
    x = load_binarized_digits()[:24]
    model = BernoulliLatentModel(64, generator=torch.Generator().manual_seed(0))
    fit(model, x, objective="exact", steps=150, lr=0.05, progress=False, track=None)
    encoder = BernoulliLatentGuide(64)
    fit_svi(poutine.block(model, hide_types=["param"]), encoder, Trace_ELBO(), x, steps=300,
            lr=0.05, progress=False)  # fmt: skip
    with torch.no_grad():
        truth = model.log_marginal(x, grid_size=301)
    return model, encoder, x, truth


def test_masked_estimate_of_a_gaussian_site_is_evaluate_models_on_the_same_masks(monkeypatch):
    """Collapsed PPCA (exact conditionals, no particles): the ELBO's masked sums, fed the masks in
    chunks of one draw, give evaluate_model's estimate and standard error on the same masks
    (a chunk misplaced, a weight applied twice or a draw dropped would change them)."""
    g = torch.Generator().manual_seed(0)
    model = PPCA(5, 2, generator=g).double()
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    expected = evaluate_model(model, x, rates=(), generator=torch.Generator().manual_seed(7))
    whole = mpt_log_marginal(model, args=(x,), num_masks=4, seed=7, reduction="mean")
    monkeypatch.setattr(evidence, "_MAX_ELEMENTS", 1)  # one mask draw per ELBO call
    chunked = mpt_log_marginal(model, args=(x,), num_masks=4, seed=7, reduction="mean")
    for estimate in (whole, chunked):
        assert estimate.mean.item() == pytest.approx(expected["mpt"], abs=1e-10)
        assert estimate.stderr.item() == pytest.approx(expected["mpt_se"], abs=1e-10)
    assert abs(expected["mpt"] - expected["exact_lml"]) < 4 * expected["mpt_se"]


@pytest.mark.parametrize("proposal", ["guide", "laplace"])
def test_masked_estimate_with_importance_sampled_conditionals_matches_quadrature(
    bernoulli, proposal
):
    """The same masks scored through SNIS (encoder or Laplace proposals, K from 256) and by
    quadrature (evaluate_model): per datum within 0.1 nats (measured 0.017 and 0.011), and
    within their errors of the LML (the masks' standard error per datum is 0.11 here)."""
    model, encoder, x, truth = bernoulli
    guide = encoder if proposal == "guide" else None
    snis = mpt_log_marginal(model, guide, (x,), seed=3)
    quadrature = evaluate_model(
        model, x, rates=(), num_masks=1, generator=torch.Generator().manual_seed(3)
    )
    assert snis.mean.shape == (len(x),)
    assert abs(snis.mean.mean().item() - quadrature["mpt"]) < 0.1
    per_datum = snis.stderr.pow(2).sum().sqrt().item() / len(x)
    assert abs(snis.mean.mean().item() - truth.mean().item()) < 4 * per_datum + 0.1


def test_importance_weights_are_pyros_split_into_rows(bernoulli):
    """The per-row log-weights sum, over rows, to Pyro's vectorized_importance_weights."""
    model, encoder, x, _ = bernoulli
    with torch.no_grad():
        per_row, pyros = evidence.importance_log_weights_per_row(model, encoder, (x,), {}, 32)
    assert per_row.shape == (32, len(x))
    assert torch.allclose(per_row.sum(-1), pyros, atol=1e-3)


def test_importance_estimate_matches_quadrature_with_its_standard_error(bernoulli):
    """Importance sampling with the encoder: RMSE over rows below 0.05 nats at K = 1024 (measured
    0.024), and the
    delta-method standard errors describe the errors (a wrong log K or a missing q(z) fails)."""
    model, encoder, x, truth = bernoulli
    estimate = importance_log_marginal(model, encoder, (x,), num_samples=1024, seed=1)
    error = estimate.mean - truth
    assert error.pow(2).mean().sqrt() < 0.05
    assert (error.abs() < 5 * estimate.stderr + 1e-3).all()
    mean = importance_log_marginal(model, encoder, (x,), num_samples=1024, seed=1,
                                   reduction="mean")  # fmt: skip
    assert mean.mean.item() == pytest.approx(estimate.mean.mean().item())


def test_a_latent_shared_between_rows_is_refused():
    """A global latent would make every row's evidence conditional on one draw of it."""

    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = (z + shift).unsqueeze(-1).expand(*z.shape, 2)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="not local"):
        mpt_log_marginal(model, guide, (x,), masks=Cumulative(), num_masks=2,
                         proposal="prior", num_importance_samples=8)  # fmt: skip
    with pytest.raises(ValueError, match="not local"):
        importance_log_marginal(model, None, (x,), num_samples=8)
