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


# Masked observations (poutine.mask, Distribution.mask, obs_mask) are not data.

PLACEHOLDER = 1e3  # what a masked-out y holds: were it scored, the elpd would be off by ~1e6


def masked_regression(x, y, keep, how="poutine"):
    """``regression`` with the rows where ``keep`` is False hidden, in one of Pyro's three ways."""
    w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", len(y)):
        if how == "poutine":
            with pyro.poutine.mask(mask=keep):
                pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)
        elif how == "distribution":
            pyro.sample("y", dist.Normal(x @ w, NOISE).mask(keep), obs=y)
        else:  # Pyro scores "y_observed" and imputes the rest as the latent "y_unobserved"
            pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y, obs_mask=keep)


def masked_data(data):
    x, y = data
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[[0, 3, 4, 17, 39]] = False
    return x, torch.where(keep, y, PLACEHOLDER), keep


@pytest.mark.parametrize("how", ["poutine", "distribution", "obs_mask"])
def test_masked_rows_are_not_data(data, how):
    x, y, keep = masked_data(data)
    # The posterior of the masked model is the posterior given the kept rows alone.
    draws = posterior_draws(x[keep], y[keep], 2000, seed=0)
    site = "y"
    if how == "obs_mask":
        site = "y_observed"
        noise = torch.randn(2000, int((~keep).sum()), generator=torch.Generator().manual_seed(1),
                            dtype=x.dtype)  # fmt: skip
        draws["y_unobserved"] = torch.zeros(2000, len(y), dtype=x.dtype)
        draws["y_unobserved"][:, ~keep] = draws["w"] @ x[~keep].T + NOISE * noise
    tree = from_pyro(draws, masked_regression, (x, y, keep, how), num_chains=4,
                     dims={site: ["obs"]})  # fmt: skip
    loo = arviz_stats.loo(tree, var_name=site, pointwise=True)

    # The same draws, scored by the model fitted to the kept rows only (masks play no part).
    # All draws go in, y_unobserved too: loo's relative efficiency reads the posterior group.
    reference = arviz_stats.loo(from_pyro(draws, regression, (x[keep], y[keep]), num_chains=4))
    assert loo.n_data_points == int(keep.sum()) == 35
    assert loo.elpd == pytest.approx(reference.elpd, rel=1e-12)
    assert loo.se == pytest.approx(reference.se, rel=1e-9)
    # And the exact leave-one-out of the kept rows (refits, no sampling) within PSIS error
    # (0.04 measured): one row more or less would move it by about 0.8, a placeholder by 1e6.
    assert abs(loo.elpd - exact_loo(x[keep], y[keep]).sum().item()) < 0.1
    # The kept entries keep their labels, in log_likelihood and observed_data alike.
    kept_rows = keep.nonzero()[:, 0].tolist()
    assert loo.elpd_i.coords["obs"].values.tolist() == kept_rows
    assert tree["observed_data"][site].coords["obs"].values.tolist() == kept_rows
    torch.testing.assert_close(torch.as_tensor(tree["observed_data"][site].values), y[keep])
    # log_likelihood() itself marks the masked-out entries NaN, never 0.
    pointwise = log_likelihood(masked_regression, {k: v[:3] for k, v in draws.items()}, x, y,
                               keep, how)[site]  # fmt: skip
    assert (pointwise.isnan() == ~keep).all()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_compare_with_masked_rows(data):
    x, y, keep = masked_data(data)
    full = from_pyro(posterior_draws(x[keep], y[keep], 1000, 0), masked_regression, (x, y, keep))
    reduced = from_pyro(
        posterior_draws(x[keep][:, :1], y[keep], 1000, 1), masked_regression, (x[:, :1], y, keep)
    )
    table = arviz_stats.compare({"one feature": reduced, "all features": full})
    assert list(table.index) == ["all features", "one feature"]
    assert table.loc["all features", "elpd"] == pytest.approx(
        exact_loo(x[keep], y[keep]).sum().item(), abs=0.2
    )


def test_scattered_masked_entries_are_flattened():
    # Two noisy measurements per row of the same linear predictor; single entries are missing.
    x, y = small_data()
    repeat = y + NOISE * torch.randn(len(y), generator=torch.Generator().manual_seed(3))
    y2 = torch.stack([y, repeat], -1)
    keep = torch.ones_like(y2, dtype=torch.bool)
    keep[[1, 4, 4, 9], [0, 0, 1, 1]] = False  # row 4 entirely, rows 1 and 9 partly

    def model(x, y, keep):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("repeat", 2, dim=-1), pyro.plate("data", len(y), dim=-2):
            with pyro.poutine.mask(mask=keep):
                pyro.sample("y", dist.Normal((x @ w).unsqueeze(-1), NOISE), obs=y)

    rows, columns = keep.nonzero(as_tuple=True)
    draws = posterior_draws(x[rows].double(), y2[rows, columns].double(), 2000, seed=0)
    draws = {"w": draws["w"].float()}
    tree = from_pyro(draws, model, (x, torch.where(keep, y2, PLACEHOLDER), keep), num_chains=2)
    log_lik = tree["log_likelihood"]["y"]
    assert log_lik.dims == ("chain", "draw", "y_kept")
    assert log_lik.coords["y_dim_0"].values.tolist() == rows.tolist()
    assert log_lik.coords["y_dim_1"].values.tolist() == columns.tolist()
    assert tree["observed_data"]["y"].coords["y_dim_0"].values.tolist() == rows.tolist()
    torch.testing.assert_close(torch.as_tensor(tree["observed_data"]["y"].values), y2[keep])
    # Each kept entry is one observation: the same as a 1-d regression on the kept entries.
    loo = arviz_stats.loo(tree)
    reference = arviz_stats.loo(from_pyro(draws, regression, (x[rows], y2[rows, columns]),
                                          num_chains=2))  # fmt: skip
    assert loo.n_data_points == len(rows) == 26
    assert loo.elpd == pytest.approx(reference.elpd, rel=1e-6)


def test_partly_masked_events_and_wholly_masked_sites():
    x, y = small_data()
    event_keep = torch.ones(len(y), 2, dtype=torch.bool)
    event_keep[2, 0] = False  # half of row 2 hidden: still data (its visible half)
    event_keep[5] = False  # all of row 5 hidden

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", len(y)):
            loc = (x @ w).unsqueeze(-1).expand(-1, 2)
            pyro.sample("pair", dist.Normal(loc, NOISE).mask(event_keep).to_event(1),
                        obs=torch.stack([y, y], -1))  # fmt: skip
            pyro.sample("ignored", dist.Normal(x @ w, NOISE).mask(False), obs=y)

    draws = {"w": torch.randn(6, 2)}
    pointwise = log_likelihood(model, draws, x, y)
    assert pointwise["ignored"].isnan().all()
    assert pointwise["pair"][:, 5].isnan().all()
    assert not pointwise["pair"][:, torch.arange(len(y)) != 5].isnan().any()
    visible = dist.Normal(draws["w"] @ x[2], NOISE).log_prob(y[2])
    torch.testing.assert_close(pointwise["pair"][:, 2], visible)
    tree = from_pyro(draws, model, (x, y))
    assert set(tree["log_likelihood"].data_vars) == {"pair"}
    assert set(tree["observed_data"].data_vars) == {"pair"}
    assert 5 not in tree["log_likelihood"]["pair"].coords["pair_dim_0"].values


def test_masks_that_are_not_fixed_data_are_refused(data):
    x, y, keep = masked_data(data)

    def draw_dependent(x, y):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", len(y)), pyro.poutine.mask(mask=x @ w > 0):
            pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)

    with pytest.raises(ValueError, match="depends on the posterior draw"):
        # Prior draws: w and -w mask out complementary rows.
        w = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        log_likelihood(draw_dependent, {"w": torch.stack([w, -w])}, x, y)

    def all_masked(x, y):
        masked_regression(x, y, torch.zeros(len(y), dtype=torch.bool))

    with pytest.raises(ValueError, match="every observation"):
        from_pyro(posterior_draws(x, y, 4, 0), all_masked, (x, y))

    def two_sites(x, y):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("a", dist.Normal(x @ w, NOISE).mask(keep), obs=y)
            pyro.sample("b", dist.Normal(x @ w, NOISE), obs=y)

    with pytest.raises(ValueError, match="its own dims"):
        from_pyro(posterior_draws(x, y, 4, 0), two_sites, (x, y), dims={"a": ["obs"], "b": ["obs"]})
    # With their own dims they are fine.
    tree = from_pyro(posterior_draws(x, y, 4, 0), two_sites, (x, y))
    assert tree["log_likelihood"]["a"].sizes["a_dim_0"] == 35
    assert tree["log_likelihood"]["b"].sizes["b_dim_0"] == 40


def test_kept_mask_is_created_on_the_log_prob_device():
    # The meta device stands in for CUDA: a tensor made on the CPU regardless would show here.
    from pyro_mpt.inference_data import _kept

    loc = torch.zeros(5, 2, device="meta")
    with pyro.validation_enabled(False):
        fn = dist.Normal(loc, 1.0).mask(torch.ones(5, 2, dtype=torch.bool, device="meta"))
        fn = fn.to_event(1)
        log_prob = fn.log_prob(loc)
    site = {"fn": fn, "mask": False}
    kept = _kept(site, log_prob)
    assert kept.device.type == "meta" and kept.shape == (5,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_model_on_cuda(data):
    x, y, keep = masked_data(data)
    draws = posterior_draws(x[keep], y[keep], 500, seed=0)
    cpu = from_pyro(draws, masked_regression, (x, y, keep))
    on_cuda = {name: value.cuda() for name, value in draws.items()}
    cuda = from_pyro(on_cuda, masked_regression, (x.cuda(), y.cuda(), keep.cuda()))
    assert cuda["log_likelihood"]["y"].sizes == cpu["log_likelihood"]["y"].sizes
    assert arviz_stats.loo(cuda).elpd == pytest.approx(arviz_stats.loo(cpu).elpd, abs=1e-8)


def test_a_sparse_curve_area_is_labelled_not_stored_as_an_lml_estimate():
    """A 5-rate curve's interpolated area was stored as lml_estimate, 17 s.e. from the truth."""
    from torch.distributions import LowRankMultivariateNormal

    from pyro_mpt.inference_data import mpt_dataset
    from pyro_mpt.scoring import mpt_curve

    d = LowRankMultivariateNormal(torch.zeros(20), torch.ones(20, 2), torch.ones(20))
    x = d.sample((3,))
    sparse = mpt_curve(d, x, rates=[0.1, 0.3, 0.5, 0.7, 0.9], masks_per_rate=4)
    ds = mpt_dataset(curve=sparse)
    assert "lml_estimate" not in ds and "interpolated from 5 of 20" in ds.attrs["curve_area"]
    full = mpt_curve(d, x, masks_per_rate=4)
    ds = mpt_dataset(curve=full)
    assert float(ds["lml_estimate"][0]) == pytest.approx(float(full.area().mean[0]))
    assert "unbiased" in ds.attrs["curve_area"]
