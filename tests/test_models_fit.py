"""The shared fit helper: every objective through one loop, history recorded, bad input named."""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Trace_ELBO
from sklearn.decomposition import PCA

from pyro_mpt.datasets import synthetic_ppca
from pyro_mpt.models import PPCA, BernoulliLatentGuide, BernoulliLatentModel, fit
from pyro_mpt.training import fit_svi


@pytest.fixture
def x():
    data, _ = synthetic_ppca(200, 6, 2, generator=torch.Generator().manual_seed(0))
    return data - data.mean(0)


@pytest.mark.parametrize("objective", ["exact", "mpt"])
def test_objectives_reach_the_closed_form_optimum(x, objective):
    model = PPCA(6, 2, generator=torch.Generator().manual_seed(1))
    result = fit(model, x, objective=objective, steps=200, lr=0.05, progress=False)
    optimum = PCA(2).fit(x.double().numpy()).score(x.double().numpy())
    assert result.tracked[-1] == pytest.approx(optimum, rel=0.005)
    assert len(result.losses) == 200 and result.tracked_steps[-1] == 199


def test_history_losses_are_per_datum(x):
    model = PPCA(6, 2, generator=torch.Generator().manual_seed(1))
    result = fit(model, x, objective="exact", steps=1, progress=False)
    initial = PPCA(6, 2, generator=torch.Generator().manual_seed(1))
    assert result.losses[0] == pytest.approx(-initial.log_marginal(x).mean().item(), rel=1e-5)


def test_minibatches_and_elbo_instances_and_guides():
    x = (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    model, guide = BernoulliLatentModel(6), BernoulliLatentGuide(6)
    result = fit(model, x, objective=Trace_ELBO(), guide=guide, steps=20, batch_size=16,
                 progress=False, track_every=10)
    assert result.tracked_steps == [0, 10, 19]
    assert any(p.grad is not None for p in guide.parameters())


def test_bad_arguments(x):
    model = PPCA(6, 2)
    with pytest.raises(ValueError, match="objective"):
        fit(model, x, objective="bogus", steps=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, x, batch_size=0, steps=1, progress=False)
    with pytest.raises(ValueError, match="positional"):
        fit(model, steps=1, progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        fit_svi(lambda: None, lambda: None, Trace_ELBO(), steps=1, progress=False)
