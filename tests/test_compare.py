"""compare_models on exact GPs: exact LOO into ArviZ, common masks, standard errors of differences.

Checked against independent computations: leave-one-out by direct solves and GPyTorch's
LeaveOneOutPseudoLikelihood, ``arviz_stats.compare`` on the exact pointwise LOO, PSIS-LOO on
posterior draws, and the unpaired standard error.
"""

from __future__ import annotations

import arviz_stats
import gpytorch
import pytest
import torch

from pyro_mpt.evaluate import (
    as_dataframe,
    compare_models,
    format_table,
    gp_pointwise_loo,
    plot_comparison,
)
from pyro_mpt.inference_data import from_gpytorch, gp_loo

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
    assert table.splitlines()[0].startswith("| model | exact LML")
    assert len(table.splitlines()) == 2 + len(models)
    frame = as_dataframe(rows)
    assert list(frame.index) == list(models) and "clml_dse" in frame
    plot_comparison(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_data_required_for_non_gp_models():
    with pytest.raises(ValueError, match="data is required"):
        compare_models({"a": torch.distributions.MultivariateNormal(torch.zeros(2),
                                                                    torch.eye(2))})
