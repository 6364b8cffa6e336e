"""E6 (``pyro-mpt reproduce selection``): a tiny smoke run and its building blocks."""

import json

import pytest
import torch

from pyro_mpt.experiments import EXPERIMENTS
from pyro_mpt.experiments.selection import OBJECTIVES, load_data, run


def test_registered():
    assert EXPERIMENTS["selection"][0] == "pyro_mpt.experiments.selection"


@pytest.mark.parametrize("name", ["diabetes", "friedman1", "friedman1-t2"])
def test_data_are_standardised_and_seeded(name):
    x, y = load_data(name, 3, num_data=60)
    assert x.dtype == y.dtype == torch.float64 and len(x) == len(y)
    assert abs(y.mean().item()) < 1e-9 and abs(y.std(unbiased=False).item() - 1) < 1e-9
    assert torch.equal(load_data(name, 3, num_data=60)[1], y)


def test_friedman_noise_differs_between_the_gaussian_and_the_misspecified_case():
    _, gaussian = load_data("friedman1", 0, num_data=200)
    _, heavy = load_data("friedman1-t2", 0, num_data=200)
    kurtosis = [(v**4).mean().item() for v in (gaussian, heavy)]
    assert kurtosis[1] > kurtosis[0]


def test_smoke(tmp_path):
    results = run(tmp_path, num_seeds=2, steps=3, num_train=24, num_test=12,
                  datasets=("friedman1",), variance_draws=3, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert (tmp_path / "selection.png").exists()
    cell = saved["summary"]["friedman1"]["deep-kernel GP"]
    assert list(cell) == list(OBJECTIVES)
    runs = [r for r in saved["runs"] if r["model"] == "deep-kernel GP" and r["objective"] == "LOO"]
    assert cell["LOO"]["test_nll"] == pytest.approx(sum(r["test_nll"] for r in runs) / 2)
    assert set(saved["estimator_variance"]["friedman1"]["exact GP"]) == {"split", "masked"}
    assert "| friedman1 | exact GP | CLML-split |" in markdown
    assert results["config"]["seeds"] == [0, 1]
