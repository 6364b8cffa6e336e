"""ArviZ bridge: pointwise log-likelihoods, PSIS-LOO against exact LOO, model comparison."""

import math

import arviz_stats
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_mpt.evaluate import pseudo_log_likelihood
from pyro_mpt.inference_data import from_pyro, guide_samples, log_likelihood, mpt_dataset
from pyro_mpt.masks import Stratified
from pyro_mpt.scoring import mpt_curve, mpt_score

NOISE, PRIOR = 0.5, 1.0


def regression(x, y):
    """Bayesian linear regression with known noise: w ~ N(0, PRIOR^2 I), y ~ N(x w, NOISE^2)."""
    w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)


def exact_posterior(x, y):
    """Conjugate posterior N(mean, cov) of w, by Cholesky solves."""
    precision = x.T @ x / NOISE**2 + torch.eye(x.shape[-1]) / PRIOR**2
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve((x.T @ y / NOISE**2).unsqueeze(-1), chol).squeeze(-1)
    return mean, torch.cholesky_inverse(chol)


def exact_loo(x, y):
    """log p(y_i | y_-i) by refitting the conjugate posterior without row i (brute force)."""
    values = []
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        mean, cov = exact_posterior(x[keep], y[keep])
        loc = x[i] @ mean
        scale = (NOISE**2 + x[i] @ cov @ x[i]).sqrt()
        values.append(torch.distributions.Normal(loc, scale).log_prob(y[i]))
    return torch.stack(values)


def posterior_draws(x, y, num_samples, seed):
    mean, cov = exact_posterior(x, y)
    noise = torch.randn(num_samples, len(mean), generator=torch.Generator().manual_seed(seed),
                        dtype=x.dtype)
    return {"w": mean + noise @ torch.linalg.cholesky(cov).T}


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = x @ w + NOISE * torch.randn(40, generator=generator, dtype=torch.float64)
    return x, y


def test_log_likelihood_matches_direct_computation(data):
    x, y = data
    samples = posterior_draws(x, y, 7, seed=0)
    ll = log_likelihood(regression, samples, x, y)
    expected = torch.distributions.Normal(samples["w"] @ x.T, NOISE).log_prob(y)
    assert ll["y"].shape == (7, 40)
    torch.testing.assert_close(ll["y"], expected, rtol=0, atol=1e-12)


def test_exact_loo_is_the_m1_point_of_the_mpt_curve(data):
    # Independent check of the test's own reference: the marginal of y is Gaussian, and its
    # leave-one-out conditionals (m = 1 masked prediction) are the brute-force refits.
    x, y = data
    marginal = MultivariateNormal(
        torch.zeros(len(y), dtype=y.dtype), NOISE**2 * torch.eye(len(y)) + PRIOR**2 * x @ x.T
    )
    torch.testing.assert_close(pseudo_log_likelihood(marginal, y), exact_loo(x, y).sum())


def test_loo_agrees_with_exact_leave_one_out(data):
    x, y = data
    tree = from_pyro(posterior_draws(x, y, 4000, seed=0), regression, (x, y), num_chains=4,
                     dims={"y": ["obs"]})
    loo = arviz_stats.loo(tree, pointwise=True)
    exact = exact_loo(x, y)
    assert abs(loo.elpd - exact.sum().item()) < loo.se
    # Much tighter than the reported s.e. (which is over data points): PSIS error only.
    assert abs(loo.elpd - exact.sum().item()) < 0.05
    torch.testing.assert_close(torch.as_tensor(loo.elpd_i.values), exact, rtol=0, atol=0.05)
    assert float(loo.pareto_k.max()) < 0.5


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_compare_ranks_the_true_model_first(data):
    x, y = data
    full = from_pyro(posterior_draws(x, y, 2000, 0), regression, (x, y), num_chains=2)
    reduced = from_pyro(posterior_draws(x[:, :1], y, 2000, 1), regression, (x[:, :1], y),
                        num_chains=2)
    table = arviz_stats.compare({"one feature": reduced, "all features": full})
    assert list(table.index) == ["all features", "one feature"]
    assert table.loc["one feature", "elpd_diff"] > 3 * table.loc["one feature", "dse"]


def small_data():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(15, 2, generator=generator)
    y = x @ torch.tensor([1.0, -1.0]) + NOISE * torch.randn(15, generator=generator)
    return x, y


@pytest.mark.slow
def test_from_mcmc():
    x, y = small_data()
    kernel = pyro.infer.NUTS(regression)
    mcmc = pyro.infer.MCMC(kernel, num_samples=30, warmup_steps=20, disable_progbar=True)
    mcmc.run(x, y)
    tree = from_pyro(mcmc)
    posterior_w = torch.as_tensor(tree["posterior"]["w"].values).reshape(-1, 2)
    torch.testing.assert_close(posterior_w, mcmc.get_samples()["w"])
    expected = torch.distributions.Normal(posterior_w @ x.T, NOISE).log_prob(y)
    got = torch.as_tensor(tree["log_likelihood"]["y"].values).reshape(30, 15)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.as_tensor(tree["observed_data"]["y"].values), y)


def test_from_guide():
    x, y = small_data()
    # An autoguide's auxiliary joint latent is not a model site and must be left out.
    autoguide = pyro.infer.autoguide.AutoMultivariateNormal(regression)
    assert set(guide_samples(autoguide, 3, x, y)) == {"w"}

    # A guide equal to the exact posterior: PSIS-LOO on its draws matches exact LOO.
    mean, cov = exact_posterior(x.double(), y.double())
    scale_tril = torch.linalg.cholesky(cov).float()

    def guide(x, y):
        pyro.sample("w", dist.MultivariateNormal(mean.float(), scale_tril=scale_tril))

    draws = guide_samples(guide, 500, x, y, generator_seed=0)
    assert draws["w"].shape == (500, 2)
    loo = arviz_stats.loo(from_pyro(draws, regression, (x, y)))
    error = abs(loo.elpd - exact_loo(x.double(), y.double()).sum().item())
    assert error < loo.se and error < 0.25  # 500 draws: Monte-Carlo error ~0.1


def test_mpt_group(data):
    x, y = data
    marginal = MultivariateNormal(
        torch.zeros(len(y), dtype=y.dtype), NOISE**2 * torch.eye(len(y)) + PRIOR**2 * x @ x.T
    )
    curve = mpt_curve(marginal, y, masks_per_rate=2, generator=torch.Generator().manual_seed(0))
    tree = from_pyro(posterior_draws(x, y, 10, 0), regression, (x, y), mpt=curve)
    group = tree["mpt"]
    assert group["score"].dims == ("mask_size",)
    assert group["score"].sizes["mask_size"] == 40
    assert float(group["lml_estimate"]) == pytest.approx(curve.area().mean.item())
    assert float(group["curve_area_se"]) == pytest.approx(curve.area().stderr.item())
    assert float(group["rate"][0]) == pytest.approx(1 / 40)
    # The estimate is the exact LML within Monte-Carlo error.
    exact = marginal.log_prob(y).item()
    assert abs(float(group["lml_estimate"]) - exact) < 4 * float(group["lml_estimate_se"])
    estimate = mpt_score(marginal, y, Stratified(2))
    tree = from_pyro(posterior_draws(x, y, 10, 0), regression, (x, y), mpt=estimate)
    assert float(tree["mpt"]["lml_estimate"]) == pytest.approx(estimate.mean.item())
    assert "score" not in tree["mpt"]


def test_bad_input():
    y = torch.zeros(3)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="lack the latent"):
        log_likelihood(regression, {"other": torch.zeros(2)}, x, y)
    with pytest.raises(TypeError, match="posterior must be"):
        from_pyro([1, 2], regression)
    with pytest.raises(ValueError, match="model is required"):
        from_pyro({"w": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="num_chains"):
        from_pyro({"w": torch.zeros(5, 2)}, regression, (x, y), num_chains=2)
    with pytest.raises(ValueError, match="leading"):
        log_likelihood(regression, {"w": torch.zeros(5, 2), "v": torch.zeros(4)}, x, y)
    with pytest.raises(ValueError, match="curve"):
        mpt_dataset()
    assert math.isfinite(
        log_likelihood(regression, {"w": torch.zeros(2, 2)}, x, y)["y"].sum().item()
    )
