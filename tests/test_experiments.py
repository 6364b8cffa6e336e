"""The paper's experiments: tiny smoke runs, and their building blocks against exact answers."""

import importlib
import json

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal

from pyro_mpt.experiments import EXPERIMENTS
from pyro_mpt.experiments._report import timing_line
from pyro_mpt.experiments.binary import mpt_loss
from pyro_mpt.experiments.convergence import replicate_estimates
from pyro_mpt.experiments.training import closed_form_loading
from pyro_mpt.masks import Exhaustive, Stratified
from pyro_mpt.models import PPCA, BernoulliLatentModel


def read(out):
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    return results, markdown


@pytest.mark.parametrize("name", ["convergence", "area", "training", "binary", "evidence"])
def test_registered(name):
    module_name, description = EXPERIMENTS[name]
    assert callable(importlib.import_module(module_name).run) and description


def test_replicates_average_to_the_exact_lml():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(3, 1, generator=generator, dtype=torch.float64)
    dist = LowRankMultivariateNormal(torch.zeros(3, dtype=torch.float64), factor,
                                     torch.full((3,), 0.3, dtype=torch.float64))
    x = dist.sample((5,))
    estimates = replicate_estimates(dist, x, Stratified(1), 100, generator)
    assert estimates.shape == (100, 5)
    stderr = estimates.std(0) / 100**0.5
    assert ((estimates.mean(0) - dist.log_prob(x)).abs() < 4 * stderr).all()


def test_convergence_smoke(tmp_path):
    results = importlib.import_module("pyro_mpt.experiments.convergence").run(
        tmp_path, dims=(3, 4), num_seeds=2, max_masks=6, num_data=8, progress=False
    )
    saved, markdown = read(tmp_path)
    assert saved["by_dim"].keys() == {"3", "4"}
    row = saved["by_dim"]["4"]["stratified, masks per row"]
    assert row["masks_per_size"] == [1, 2, 5, 6]
    assert row["gap_mean"] == pytest.approx(torch.tensor(row["gap_per_seed"]).mean(0).tolist())
    assert "| 4 | stratified, shared across rows (paper) |" in markdown
    assert (tmp_path / "convergence_D3.png").exists()
    assert results["config"]["seeds"] == [0, 1]


def test_area_smoke(tmp_path):
    run = importlib.import_module("pyro_mpt.experiments.area").run
    run(tmp_path, data_dim=8, num_data=30, latent_dims=(2,), masks_per_size=3, progress=False)
    saved, markdown = read(tmp_path)
    row, curve = saved["rows"][0], saved["curves"]["K=2"]
    assert curve["sizes"] == list(range(1, 9))
    # Independent sums: the area is the sum of S(x; m) over every size.
    assert row["area"] == pytest.approx(sum(curve["score"]), abs=1e-9)
    se = sum(s**2 for s in curve["score_se"]) ** 0.5
    assert row["area_se"] == pytest.approx(se, abs=1e-9)
    assert abs(row["area"] - row["exact_lml"]) < 4 * row["area_se"]
    assert "D*S(m=8)" in markdown and (tmp_path / "curve.png").exists()
    # The page says under what load and threads its wall time was measured.
    timing = saved["timing"]
    assert timing["threads"] == 1 and timing["cores"] >= 1
    assert 0 <= timing["cpu_time_s"] and 0 < timing["wall_time_s"] == saved["wall_time_s"]
    assert markdown.rstrip().splitlines()[-1].startswith(timing_line(saved))
    assert "CPU time" in timing_line(saved) and "thread(s) on" in timing_line(saved)


@pytest.mark.parametrize("load, busy", [([0.2, 0.3, 0.1], False), ([1.0, 0.5, 0.5], True),
                                        (None, False)])  # fmt: skip
def test_the_timing_line_says_when_the_machine_was_busy(load, busy):
    timing = {"wall_time_s": 12.3, "cpu_time_s": 11.9, "threads": 1, "cores": 2,
              "load_average_start": load, "load_average_end": load}  # fmt: skip
    line = timing_line({"timing": timing, "environment": {"torch": "2.x"}})
    assert line.startswith("Wall time 12 s, CPU time 12 s (torch 2.x, 1 thread(s) on 2 cores; ")
    assert ("not a quiet-machine figure" in line) == busy
    assert ("load average not available" in line) == (load is None)


def test_closed_form_loading_is_the_optimum():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 6, generator=generator, dtype=torch.float64
    )
    model = PPCA(6, 2, noise_scale=0.5).double()
    model.cov_factor = closed_form_loading(x, 2, 0.25).requires_grad_()
    loading = model.cov_factor_unconstrained
    lml = model.log_marginal(x).mean()
    (grad,) = torch.autograd.grad(lml, loading)
    assert grad.abs().max() < 1e-9
    for _ in range(5):  # and no random perturbation does better
        with torch.no_grad():
            other = PPCA(6, 2, noise_scale=0.5).double()
            other.cov_factor = loading + 0.05 * torch.randn(6, 2, generator=generator,
                                                            dtype=torch.float64)
            assert other.log_marginal(x).mean() < lml


def test_training_smoke(tmp_path):
    run = importlib.import_module("pyro_mpt.experiments.training").run
    results = run(tmp_path, num_data=40, epochs=4, num_seeds=2, track_every=2, progress=False)
    saved, markdown = read(tmp_path)
    assert [row["objective"] for row in saved["rows"]] == [
        "exact LML", "cumulative MPT", "fixed 20% MPT", "fixed 80% MPT"
    ]
    first = saved["per_seed"][0]
    assert first["history"]["exact LML"]["epochs"] == [0, 2, 3]
    assert first["optimum_lml"] >= first["true_model_lml"]
    assert "closed-form optimum" in markdown and (tmp_path / "training.png").exists()
    assert results["config"]["seeds"] == [0, 1]


def test_binary_mpt_loss_with_all_masks_is_the_lml():
    model = BernoulliLatentModel(4, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        model.weight = 2 * model.weight + 1.0
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    loss = mpt_loss(model, x, Exhaustive(), torch.Generator(), grid_size=61)
    expected = -model.log_marginal(x, grid_size=61).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-8)


def test_binary_smoke(tmp_path):
    run = importlib.import_module("pyro_mpt.experiments.binary").run
    run(tmp_path, num_data=15, epochs=3, num_seeds=2, train_grid=9, eval_grid=21,
        check_grids=(31,), num_importance_samples=4, track_every=1,
        progress=False)
    saved, markdown = read(tmp_path)
    assert [len(row["final_lml_per_seed"]) for row in saved["rows"]] == [2] * 6
    assert "| ELBO |" in markdown and "| cumulative MPT, SNIS, learned proposal |" in markdown
    assert set(saved["reference_check"]) == {"grids", "restart_gain"}
    assert (tmp_path / "training.png").exists()
