"""Every model instance owns its parameters, whatever trains it (issue #10).

Pyro's param store is global and keyed by name. Models that all named their parameters
``"cov_factor"``, ``"weight"``, ... made a second fresh instance adopt the first one's trained
tensors the first time it ran under SVI: it started from the first model's optimum and trained the
first model's parameters in place. Each test below trains one instance, then a second, and compares
the second with the same model trained alone in an empty store.
"""

from __future__ import annotations

import copy
import pickle

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule

from pyro_mpt.models import (
    PPCA,
    BayesianLinearRegression,
    BernoulliLatentGuide,
    BernoulliLatentModel,
    FactorAnalysis,
    fit,
    no_guide,
)

STEPS = 30


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gaussian_rows():
    return torch.randn(60, 5, generator=_gen(100))


def _binary_rows():
    return (torch.rand(60, 6, generator=_gen(101)) < 0.4).float()


def _regression_data():
    inputs = torch.randn(40, 3, generator=_gen(102))
    noise = 0.3 * torch.randn(40, generator=_gen(103))
    return inputs, inputs @ torch.tensor([1.0, -2.0, 0.5]) + noise


# name -> builder(seed) returning (model, guide or None, data args). Different seeds give
# different initial values where a model has random ones (BayesianLinearRegression has none).
BUILDERS = {
    "PPCA": lambda seed: (PPCA(5, 2, generator=_gen(seed)), None, (_gaussian_rows(),)),
    "FactorAnalysis": lambda seed: (
        FactorAnalysis(5, 2, generator=_gen(seed)), None, (_gaussian_rows(),)
    ),
    "BayesianLinearRegression": lambda seed: (BayesianLinearRegression(3), None,
                                              _regression_data()),
    "BernoulliLatentModel": lambda seed: (
        BernoulliLatentModel(6, init_scale=0.5, generator=_gen(seed)),
        BernoulliLatentGuide(6),
        (_binary_rows(),),
    ),
}


def _snapshot(*modules):
    return [p.detach().clone() for module in modules if module is not None
            for p in module.parameters()]


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _train_svi(model, guide, args):
    """Plain Pyro: SVI with pyro.optim and Trace_ELBO. Returns the loss of every step."""
    pyro.set_rng_seed(7)
    svi = SVI(model, guide or no_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    return [svi.step(*args) for _ in range(STEPS)]


def _train_fit(objective):
    def train(model, guide, args):
        guide = guide if objective == "elbo" else None
        result = fit(model, *args, objective=objective, guide=guide, steps=STEPS, lr=0.05,
                     track=None, progress=False)
        return result.losses

    return train


TRAINERS = {"SVI": _train_svi, "fit elbo": _train_fit("elbo"), "fit mpt": _train_fit("mpt")}


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("name", BUILDERS)
def test_a_second_fresh_model_trains_its_own_parameters(name, trainer):
    build, train = BUILDERS[name], TRAINERS[trainer]

    # Reference: the second model trained alone, in an empty param store.
    alone, alone_guide, args = build(1)
    alone_losses = train(alone, alone_guide, args)
    alone_final = _snapshot(alone, alone_guide)
    pyro.clear_param_store()

    first, first_guide, args = build(0)
    train(first, first_guide, args)
    first_final = _snapshot(first, first_guide)

    second, second_guide, args = build(1)
    second_losses = train(second, second_guide, args)

    # It starts from its own initial values, so its first loss is the lone model's first loss...
    assert second_losses[0] == pytest.approx(alone_losses[0], rel=1e-6)
    # ...ends where the lone model ends...
    _assert_same(_snapshot(second, second_guide), alone_final)
    # ...and training it left the first model as it was.
    _assert_same(_snapshot(first, first_guide), first_final)


@pytest.mark.parametrize("copy_model", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_copies_are_new_instances_with_their_own_parameters(copy_model):
    x = _gaussian_rows()
    original = PPCA(5, 2, generator=_gen(0))
    _train_svi(original, None, (x,))  # the param store knows the original by now
    trained = _snapshot(original)

    # Two copies of one model, trained the same way, must train the same way: from the copied
    # values, each on its own parameters, leaving the original alone.
    first, second = copy_model(original), copy_model(original)
    first_losses = _train_svi(first, None, (x,))
    first_final = _snapshot(first)
    second_losses = _train_svi(second, None, (x,))
    assert second_losses[0] == pytest.approx(first_losses[0], rel=1e-6)
    _assert_same(_snapshot(second), first_final)
    _assert_same(_snapshot(original), trained)


def test_parameter_names_are_per_instance_and_sample_sites_are_not():
    x = _gaussian_rows()
    store = pyro.get_param_store()
    models = [PPCA(5, 2, prior_scale=1.0), PPCA(5, 2, prior_scale=1.0)]
    traces = [pyro.poutine.trace(model).get_trace(x) for model in models]
    # Sample sites keep the names guides and handlers refer to.
    for trace in traces:
        assert {"cov_factor", "x"} <= set(trace.nodes)
        assert not trace.nodes["cov_factor"]["is_observed"]
    names = [store.param_name(model.noise_scale_unconstrained) for model in models]
    assert names[0] != names[1] and all(name.endswith(".noise_scale") for name in names)


def test_a_model_inside_another_pyro_module_is_named_by_its_parent():
    parent = PyroModule(name="parent")
    parent.model = PPCA(5, 2, generator=_gen(0))
    x = _gaussian_rows()
    trace = pyro.poutine.trace(parent.model).get_trace(x)
    assert "parent.model.noise_scale" in trace.nodes
    copied = copy.deepcopy(parent)  # the parent's name, not ours, is the one to keep
    trace = pyro.poutine.trace(copied.model).get_trace(x)
    assert "parent.model.noise_scale" in trace.nodes
