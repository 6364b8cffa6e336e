"""PPCA and factor analysis: both forms, every objective, against closed forms and scikit-learn."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from sklearn.decomposition import PCA
from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis

from pyro_mpt.datasets import load_digits, synthetic_ppca
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Exhaustive
from pyro_mpt.models import PPCA, FactorAnalysis, no_guide


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def small():
    x, _ = synthetic_ppca(40, 4, 2, generator=_gen(1), dtype=torch.float64)
    return x


def _model(cls=PPCA, collapsed=True, **kwargs):
    return cls(4, 2, noise_scale=0.8, init_scale=0.7, generator=_gen(2), collapsed=collapsed,
               **kwargs).double()


def test_both_forms_share_the_exact_marginal(small):
    collapsed, latent = _model(), _model(collapsed=False)
    cov = collapsed.cov_factor @ collapsed.cov_factor.T + 0.64 * torch.eye(4, dtype=torch.float64)
    expected = dist.MultivariateNormal(torch.zeros(4, dtype=torch.float64), cov).log_prob(small)
    torch.testing.assert_close(collapsed.log_marginal(small), expected)
    torch.testing.assert_close(latent.log_marginal(small), expected)


def _exact_posterior_guide(model):
    """q(z_n | x_n) = p(z_n | x_n): then every ELBO sample equals log p(x) exactly."""

    def guide(x, num_data=None):
        W, var = model.cov_factor.detach(), model.noise_scale.detach().pow(2)
        precision = W.T @ W / var + torch.eye(2, dtype=W.dtype)
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        loc = (x - model.loc) @ W @ cov / var
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(loc, cov))

    return guide


def test_latent_form_trace_elbo_with_exact_posterior_is_the_lml(small):
    model = _model(collapsed=False)
    loss = Trace_ELBO().loss(model, _exact_posterior_guide(model), small)
    assert loss == pytest.approx(-model.log_marginal(small).sum().item(), rel=1e-8)


def test_latent_form_mpt_integrates_local_latents_by_importance_sampling(small):
    model = _model(collapsed=False)
    exact = -model.log_marginal(small).sum().item()
    elbo = MaskedPretrainingELBO(Exhaustive(), num_importance_samples=4096)
    assert elbo.loss(model, no_guide, small) == pytest.approx(exact, rel=0.01)


def test_collapsed_form_exhaustive_mpt_is_the_lml(small):
    model = _model()
    exact = -model.log_marginal(small).sum().item()
    assert MaskedPretrainingELBO(Exhaustive()).loss(model, no_guide, small) == pytest.approx(
        exact, rel=1e-10
    )


def test_factor_analysis_matches_scikit_learn():
    x = load_digits(torch.float64)[:400, :12].numpy()
    reference = SkFactorAnalysis(3, random_state=0).fit(x)
    model = FactorAnalysis(12, 3, loc=torch.as_tensor(reference.mean_)).double()
    with torch.no_grad():
        model.cov_factor = torch.as_tensor(reference.components_.T).clone()
        model.noise_scale = torch.as_tensor(reference.noise_variance_).sqrt()
    ours = model.log_marginal(torch.as_tensor(x)).mean().item()
    assert ours == pytest.approx(reference.score(x), rel=1e-8)
    assert model.noise_scale.shape == (12,)


def test_prior_on_loadings_is_a_latent_site_and_marginal_asks_for_it(small):
    model = _model(prior_scale=1.0)
    trace = pyro.poutine.trace(model).get_trace(small)
    assert not trace.nodes["cov_factor"]["is_observed"]
    with pytest.raises(ValueError, match="cov_factor="):
        model.log_marginal(small)
    W = trace.nodes["cov_factor"]["value"]
    assert model.log_marginal(small, cov_factor=W).shape == (40,)
    guide = AutoNormal(model)
    assert MaskedPretrainingELBO().loss(model, guide, small) > 0


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
@pytest.mark.parametrize("kwargs, match", [({"latent_dim": 0}, "latent_dim"),
                                            # K >= D: the noise is not identifiable.
                                            ({"latent_dim": 4}, "latent_dim=4 with data_dim=4"),
                                            ({"data_dim": 3, "latent_dim": 5}, "latent_dim=5"),
                                            ({"noise_scale": -1.0}, "noise_scale"),
                                            # W = 0 is a stationary point: training never moves.
                                            ({"init_scale": 0.0}, "init_scale"),
                                            ({"loc": torch.zeros(3)}, r"loc .*\(4,\).*\(3,\)"),
                                            ({"prior_scale": 0.0}, "prior_scale")])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"data_dim": 4, "latent_dim": 2, **kwargs})


@pytest.mark.slow
def test_svi_with_mpt_reaches_the_closed_form_optimum_on_digits():
    x = load_digits()
    optimum = PCA(10).fit(x.double().numpy()).score(x.double().numpy())
    model = PPCA(64, 10, generator=_gen(0))
    steps = 250
    scheduler = pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "T_max": steps,
         "eta_min": 1e-4}
    )
    svi = SVI(model, no_guide, scheduler, MaskedPretrainingELBO(generator=_gen(1)))
    for _ in range(steps):
        svi.step(x)
        scheduler.step()
    with torch.no_grad():
        final = model.log_marginal(x).mean().item()
    gap = (optimum - final) / abs(optimum)
    assert 0 <= gap < 0.01, (final, optimum)
