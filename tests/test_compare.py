"""compare_models on exact GPs and Pyro models: exact LOO into ArviZ, common masks, standard
errors of differences.

Checked against independent computations: leave-one-out by direct solves and GPyTorch's
LeaveOneOutPseudoLikelihood, ``arviz_stats.compare`` on the exact pointwise LOO, PSIS-LOO on
posterior draws, and the unpaired standard error.
"""

from __future__ import annotations

import math

import arviz_stats
import gpytorch
import pyro
import pytest
import torch

from pyro_mpt.evaluate import (
    PyroModel,
    as_dataframe,
    compare_models,
    format_table,
    gp_pointwise_loo,
    plot_comparison,
)
from pyro_mpt.inference_data import from_gpytorch, gp_loo
from pyro_mpt.models import BayesianLinearRegression

DTYPE = torch.float64


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen, dtype=DTYPE)
    y = torch.sin(6 * x[:, 0]) + 0.2 * torch.randn(n, generator=gen, dtype=DTYPE)
    return x, y


def gps(n=40, fit_steps=40):
    """Three GPs of the same data: RBF and Matern (both fitted), and a linear kernel (wrong)."""
    x, y = data(n)
    kernels = {
        "rbf": gpytorch.kernels.RBFKernel(),
        "matern12": gpytorch.kernels.MaternKernel(nu=0.5),
        "linear": gpytorch.kernels.LinearKernel(),
    }
    models = {}
    for name, kernel in kernels.items():
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = GP(x, y, likelihood, kernel).to(DTYPE)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        model.train()
        for _ in range(fit_steps):
            optimizer.zero_grad()
            (-mll(model(x), y)).backward()
            optimizer.step()
        models[name] = model
    return models


@pytest.fixture(scope="module")
def models():
    return gps()


def test_pointwise_loo_matches_direct_solves_and_gpytorch(models):
    model = models["rbf"]
    x, y = model.train_inputs[0], model.train_targets
    elpd_i = gp_pointwise_loo(model)
    with torch.no_grad():
        output = model.likelihood(model(x))
        mean, cov = output.mean, output.covariance_matrix
        for i in (0, 7, 39):
            rest = [j for j in range(len(y)) if j != i]
            gain = torch.linalg.solve(cov[rest][:, rest], cov[rest, i])
            mu, var = mean[i] + gain @ (y[rest] - mean[rest]), cov[i, i] - gain @ cov[rest, i]
            expected = torch.distributions.Normal(mu, var.sqrt()).log_prob(y[i])
            assert elpd_i[i].item() == pytest.approx(expected.item(), abs=1e-9)
        loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(model.likelihood, model)
        assert elpd_i.mean().item() == pytest.approx(loo(model(x), y).item(), abs=1e-10)


def test_compare_models_matches_arviz_compare_on_exact_loo(models):
    rows = compare_models(models, generator=torch.Generator().manual_seed(3))
    table = arviz_stats.compare({name: gp_loo(model) for name, model in models.items()})
    by_name = {row["model"]: row for row in rows}
    assert list(table.index) == sorted(by_name, key=lambda name: by_name[name]["rank"])
    for name, row in by_name.items():
        assert row["elpd_loo"] == pytest.approx(table.loc[name, "elpd"], abs=1e-9)
        assert row["elpd_loo_se"] == pytest.approx(table.loc[name, "se"], abs=1e-9)
        assert row["elpd_loo_diff"] == pytest.approx(table.loc[name, "elpd_diff"], abs=1e-9)
        assert row["elpd_loo_dse"] == pytest.approx(table.loc[name, "dse"], abs=1e-9)
    # The wrong (linear) model is last by every column.
    for key in ("exact_lml", "clml", "elpd_loo"):
        assert min(rows, key=lambda r, key=key: r[key])["model"] == "linear"


def test_exact_lml_column_is_gpytorch_times_n(models):
    rows = compare_models(models)
    for row in rows:
        model = models[row["model"]]
        x, y = model.train_inputs[0], model.train_targets
        with torch.no_grad():
            exact = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        assert row["exact_lml"] == pytest.approx(exact.item() * len(y), abs=1e-9)


def test_common_masks_make_paired_standard_errors_smaller(models):
    rows = compare_models(models, num_masks=4, generator=torch.Generator().manual_seed(0))
    close = [r for r in rows if r["clml_diff"] != 0]
    assert close
    for row in close:
        assert row["clml_dse"] < row["clml_dse_unpaired"], row
    # The paired difference is the difference of the two estimates (same masks).
    best = max(rows, key=lambda r: r["clml"])
    for row in rows:
        assert row["clml_diff"] == pytest.approx(best["clml"] - row["clml"], abs=1e-9)


def test_psis_loo_on_posterior_draws_approaches_exact_loo(models):
    model = models["rbf"]
    tree = from_gpytorch(model, 4000, torch.Generator().manual_seed(0))
    psis = arviz_stats.loo(tree)
    exact = gp_loo(model)
    assert psis.elpd == pytest.approx(exact.elpd, abs=0.5)
    assert exact.p > 0


def test_outputs(models, tmp_path):
    rows = compare_models(models)
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| model | LML | Δ LML ± dse | CLML (p = 4 of 40)")
    assert len(table.splitlines()) == 2 + len(models)
    frame = as_dataframe(rows)
    assert list(frame.index) == list(models) and "clml_dse" in frame
    plot_comparison(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_data_required_for_non_gp_models():
    with pytest.raises(ValueError, match="data is required"):
        compare_models({"a": torch.distributions.MultivariateNormal(torch.zeros(2),
                                                                    torch.eye(2))})


# --- Pyro models: Bayesian linear regression on scikit-learn's diabetes data ---------------

FEATURES = {"bmi+bp+s5": [2, 3, 8], "all": list(range(10)), "sex": [1]}


def diabetes():
    from sklearn.datasets import load_diabetes

    x, y = (torch.as_tensor(a, dtype=DTYPE) for a in load_diabetes(return_X_y=True))
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def fit_type2(inputs, targets, collapsed=True):
    """Bayesian linear regression with (prior scale, noise) at their type-II maximum likelihood."""
    model = BayesianLinearRegression(inputs.shape[1], collapsed=collapsed).double()
    params = [model.prior_scale_unconstrained, model.noise_scale_unconstrained]
    optimizer = torch.optim.LBFGS(params, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -model.log_marginal(inputs, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def dense_marginal(model, inputs):
    """N(0, a^2 X X^T + s^2 I) formed densely: independent of the model's low-rank marginal."""
    a2, s2 = model.prior_scale.detach() ** 2, model.noise_scale.detach() ** 2
    cov = a2 * inputs @ inputs.T + s2 * torch.eye(len(inputs), dtype=DTYPE)
    return torch.distributions.MultivariateNormal(torch.zeros(len(inputs), dtype=DTYPE), cov)


def posterior_guide(model, inflate=1.0):
    """The exact Gaussian posterior of the weights, its scale multiplied by ``inflate``."""

    def guide(inputs, targets):
        with torch.no_grad():
            a2, s2 = model.prior_scale.detach() ** 2, model.noise_scale.detach() ** 2
            eye = torch.eye(inputs.shape[1], dtype=DTYPE)
            cov = torch.linalg.inv(inputs.T @ inputs / s2 + eye / a2)
            mean = cov @ inputs.T @ targets / s2
        scale_tril = inflate * torch.linalg.cholesky(cov)
        pyro.sample("weights", pyro.distributions.MultivariateNormal(mean, scale_tril=scale_tril))

    return guide


@pytest.fixture(scope="module")
def regressions():
    x, y = diabetes()
    fitted = {name: fit_type2(x[:, cols], y) for name, cols in FEATURES.items()}
    return x, y, fitted


def ranking(rows, key):
    return [row["model"] for row in sorted(rows, key=lambda r: -r[key])]


def test_pyro_compare_ranks_as_exact_lml_of_the_conjugate_model(regressions):
    x, y, fitted = regressions
    models = {name: PyroModel(model, None, (x[:, FEATURES[name]], y))
              for name, model in fitted.items()}
    rows = compare_models(models, generator=torch.Generator().manual_seed(0))
    exact = {name: dense_marginal(model, x[:, FEATURES[name]]).log_prob(y).item()
             for name, model in fitted.items()}
    truth = sorted(exact, key=lambda name: -exact[name])
    assert truth == ["all", "bmi+bp+s5", "sex"]
    for row in rows:
        assert row["exact_lml"] == pytest.approx(exact[row["model"]], abs=1e-8)
        # No latents: the ELBO is the evidence; the masked estimate agrees within its error.
        assert row["elbo"] == pytest.approx(row["exact_lml"], abs=1e-8)
        assert abs(row["mpt"] - row["exact_lml"]) < 4 * row["mpt_se"]
        assert row["clml_held_out"] == 44 and row["loo_method"] == "exact"
    for key in ("exact_lml", "elbo", "mpt", "clml", "elpd_loo"):
        assert ranking(rows, key) == truth, key
    assert [row["rank"] for row in rows] == [truth.index(name) for name in models]


def test_pyro_exact_loo_matches_dense_formula(regressions):
    x, y, fitted = regressions
    rows = compare_models({name: PyroModel(model, None, (x[:, FEATURES[name]], y))
                           for name, model in fitted.items()})
    for row in rows:
        precision = torch.linalg.inv(
            dense_marginal(fitted[row["model"]], x[:, FEATURES[row["model"]]]).covariance_matrix)
        var = 1 / precision.diagonal()
        mean = y - (precision @ y) * var
        elpd_i = torch.distributions.Normal(mean, var.sqrt()).log_prob(y)
        assert row["elpd_loo"] == pytest.approx(elpd_i.sum().item(), abs=1e-8)
        assert row["elpd_loo_se"] == pytest.approx(
            (len(y) * elpd_i.var(unbiased=False)).sqrt().item(), abs=1e-8)


def test_pyro_paired_standard_errors_are_smaller_than_unpaired(regressions):
    x, y, fitted = regressions
    models = {name: PyroModel(model, None, (x[:, FEATURES[name]], y))
              for name, model in fitted.items()}
    rows = compare_models(models, num_masks=4, generator=torch.Generator().manual_seed(1))
    by_name = {row["model"]: row for row in rows}
    for key in ("clml", "mpt"):
        best = max(rows, key=lambda r, key=key: r[key])
        for row in rows:
            # Common masks: the paired difference is the difference of the two estimates...
            assert row[key + "_diff"] == pytest.approx(best[key] - row[key], abs=1e-9)
    # ... with a smaller standard error: the models' mask noise is shared. Measured (seed 1):
    # bmi+bp+s5 vs all, CLML 0.27 paired vs 0.95 unpaired, MPT 0.30 vs 0.94, LOO 5.1 vs
    # 18.8.
    close = by_name["bmi+bp+s5"]
    for key in ("clml", "mpt", "elpd_loo"):
        assert close[key + "_dse"] < 0.5 * close[key + "_dse_unpaired"], key
    for key in ("clml", "mpt", "elpd_loo"):
        assert by_name["sex"][key + "_dse"] < by_name["sex"][key + "_dse_unpaired"], key


def test_pyro_latent_models_with_guides_elbo_and_psis_loo(regressions):
    x, y, fitted = regressions
    models, exact = {}, {}
    for name, collapsed in fitted.items():
        latent = BayesianLinearRegression(len(FEATURES[name]), collapsed=False).double()
        with torch.no_grad():
            latent.prior_scale = collapsed.prior_scale.detach().clone()
            latent.noise_scale = collapsed.noise_scale.detach().clone()
        # An inflated posterior: the ELBO is a strict bound and PSIS must correct for q != p.
        models[name] = (latent, posterior_guide(latent, inflate=1.3))
        exact[name] = compare_models({name: PyroModel(collapsed, None,
                                                      (x[:, FEATURES[name]], y))})[0]
    entries = {name: PyroModel(model, guide, (x[:, FEATURES[name]], y))
               for name, (model, guide) in models.items()}
    rows = compare_models(entries, generator=torch.Generator().manual_seed(0))
    for row in rows:
        reference = exact[row["model"]]
        assert row["exact_lml"] == pytest.approx(reference["exact_lml"], abs=1e-8)
        assert row["elbo"] < row["exact_lml"] < row["elbo"] + 2.0
        assert row["loo_method"] == "psis" and row["pareto_k_max"] < 0.7
        assert row["elpd_loo"] == pytest.approx(reference["elpd_loo"], abs=0.5)
        # The CLML by SNIS over guide draws, on the masks the collapsed model was scored on:
        # only the importance-sampling error separates it from the exact conditionals (measured
        # 0.012-0.014 nats, against a Monte-Carlo s.e. over masks of 0.5-0.75).
        assert row["clml_method"] == "snis" and row["clml_ess"] > 20
        assert row["clml"] == pytest.approx(reference["clml"], abs=0.1)
        assert row["mpt"] is None  # a guide fitted to p(w | y) is no proposal for p(w | y_R)
    for key in ("exact_lml", "elbo", "elpd_loo"):
        assert ranking(rows, key) == ["all", "bmi+bp+s5", "sex"], key
    # The exact posterior as guide: every ELBO particle is log p(y) (zero variance).
    model, _ = models["all"]
    row = compare_models({"all": (model, posterior_guide(model))}, (x, y))[0]
    assert row["elbo"] == pytest.approx(row["exact_lml"], abs=1e-6) and row["elbo_se"] < 1e-6


def test_pyro_outputs_and_checks(regressions, tmp_path):
    x, y, fitted = regressions
    models = {name: PyroModel(model, None, (x[:, FEATURES[name]], y))
              for name, model in fitted.items()}
    rows = compare_models(models)
    table = format_table(rows)
    assert "ELBO" in table.splitlines()[0] and "CLML (p = 44 of 442)" in table
    assert len(table.splitlines()) == 2 + len(models)
    frame = as_dataframe(rows)
    assert list(frame.index) == list(models) and "elpd_loo_dse" in frame
    plot_comparison(rows, tmp_path / "pyro.png")
    assert (tmp_path / "pyro.png").stat().st_size > 1000
    other = {"all": models["all"], "flipped": models["all"]._replace(args=(x, -y))}
    with pytest.raises(ValueError, match="different data"):
        compare_models(other)


def test_pyro_models_without_latents_or_gaussian_marginal():
    """Independent Bernoulli observations: LML = ELBO = LOO = the log-likelihood, exactly."""
    dist = pyro.distributions
    y = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DTYPE)

    def model(probs):
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Bernoulli(torch.as_tensor(probs, dtype=DTYPE)), obs=y)

    rows = compare_models({"good": (model, None, (0.75,)), "bad": (model, None, (0.25,))},
                          num_masks=50)
    for row, p in zip(rows, (0.75, 0.25), strict=True):
        expected = 3 * math.log(p) + math.log(1 - p)
        for key in ("exact_lml", "elbo", "elpd_loo", "mpt"):
            assert row[key] == pytest.approx(expected, abs=1e-12), key
        assert row["mpt_se"] == 0 and row["loo_method"] == "exact"
        # One of 4 held out (p = 1), predicted from nothing it depends on: E = LML / 4.
        assert row["clml_held_out"] == 1 and row["clml_se"] > 0
        assert abs(row["clml"] - expected / 4) < 4 * row["clml_se"]
    assert [row["rank"] for row in rows] == [0, 1]


def hidden_evidence(model):
    """The model as a plain function: its log_marginal is out of compare_models' reach."""
    return lambda inputs, targets: model(inputs, targets)


def test_pyro_global_latents_lml_by_importance_sampling(regressions):
    x, y, fitted = regressions
    entries, exact = {}, {}
    for name, collapsed in fitted.items():
        latent = BayesianLinearRegression(len(FEATURES[name]), collapsed=False).double()
        with torch.no_grad():
            latent.prior_scale = collapsed.prior_scale.detach().clone()
            latent.noise_scale = collapsed.noise_scale.detach().clone()
        inputs = x[:, FEATURES[name]]
        entries[name] = PyroModel(hidden_evidence(latent), posterior_guide(latent, 1.3),
                                  (inputs, y))
        exact[name] = dense_marginal(collapsed, inputs).log_prob(y).item()
    rows = compare_models(entries, generator=torch.Generator().manual_seed(0))
    for row in rows:
        entry = entries[row["model"]]
        assert row["lml_method"] == "importance" and row["exact_lml"] is None
        # Measured: within 0.03 nats of the closed form, s.e. 0.02-0.08.
        assert abs(row["lml"] - exact[row["model"]]) < 4 * row["lml_se"] + 0.01
        # Pyro's own importance sampler on the same guide draws (same seed, same order).
        with torch.random.fork_rng():
            torch.manual_seed(0)
            importance = pyro.infer.Importance(entry.model, entry.guide, num_samples=256)
            reference = importance.run(*entry.args).get_log_normalizer().item()
        assert row["lml"] == pytest.approx(reference, abs=1e-6)  # summed in another order
        assert row["elbo"] < row["lml"]
    assert ranking(rows, "lml") == ["all", "bmi+bp+s5", "sex"]
    assert "(IS)" in format_table(rows) and "(PSIS)" in format_table(rows)


def test_pyro_global_latents_with_masked_observations(regressions):
    """A plate of targets, some hidden by poutine.mask (and NaN): the same scores as the
    model on the kept targets only, and the importance-sampled LML of their evidence."""
    x, y, fitted = regressions
    model = fitted["bmi+bp+s5"]
    inputs = x[:, FEATURES["bmi+bp+s5"]]
    keep = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) > 0.2
    prior, noise = model.prior_scale.detach(), model.noise_scale.detach()

    def regression(inputs, targets, keep):
        weights = pyro.sample("w", pyro.distributions.Normal(torch.zeros(3, dtype=DTYPE), prior)
                              .to_event(1))
        with pyro.plate("data", len(targets)), pyro.poutine.mask(mask=keep):
            pyro.sample("y", pyro.distributions.Normal(inputs @ weights, noise), obs=targets)

    def guide(inputs, targets, keep):
        kept_inputs, kept_targets = inputs[keep], targets[keep]
        eye = torch.eye(3, dtype=DTYPE)
        cov = torch.linalg.inv(kept_inputs.T @ kept_inputs / noise**2 + eye / prior**2)
        mean = cov @ kept_inputs.T @ kept_targets / noise**2
        pyro.sample("w", pyro.distributions.MultivariateNormal(
            mean, scale_tril=1.2 * torch.linalg.cholesky(cov)))

    holes = torch.where(keep, y, torch.nan)
    row = compare_models({"masked": (regression, guide, (inputs, holes, keep))})[0]
    subset = compare_models({"kept": (regression, guide, (inputs[keep], y[keep],
                                                          torch.ones(int(keep.sum()),
                                                                     dtype=torch.bool)))})[0]
    assert row["n"] == keep.sum()
    for key in ("lml", "elbo", "clml", "elpd_loo"):
        assert row[key] == pytest.approx(subset[key], abs=1e-9), key
    exact = dense_marginal(model, inputs[keep]).log_prob(y[keep]).item()
    assert row["lml_method"] == "importance"
    assert abs(row["lml"] - exact) < 4 * row["lml_se"] + 0.01
