"""MaskedPretrainingELBO against Trace_ELBO, exact log-likelihoods and Pyro's own machinery."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Cumulative, Exhaustive, FixedRate, Stratified

D, K = 5, 2


def _no_guide(*args, **kwargs):
    pass


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ppca_globals():
    W = pyro.sample("W", dist.Normal(0.0, 1.0).expand([D, K]).to_event(2))
    noise = pyro.param("noise", torch.tensor(0.7), constraint=dist.constraints.positive)
    return dist.LowRankMultivariateNormal(torch.zeros(D), W, noise.pow(2).expand(D))


def ppca_with_prior(x, num_data=None):
    """Collapsed PPCA with a Normal prior on W and a learned noise scale."""
    num_data = len(x) if num_data is None else num_data
    marginal = _ppca_globals()
    with pyro.plate("data", num_data, subsample_size=len(x)):
        pyro.sample("x", marginal, obs=x)


def _initialised_guide(model, *args):
    guide = AutoNormal(model)
    guide(*args)  # create the parameters now, so later calls consume the RNG identically
    return guide


def _losses(elbo_factory, model, guide, args, seed=1, repeats=1):
    out = []
    for i in range(repeats):
        pyro.set_rng_seed(seed)  # same guide sample (and subsample) every time
        out.append(elbo_factory(i).loss(model, guide, *args))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def data():
    return torch.randn(30, D, generator=_generator(3))


def test_exhaustive_masks_reproduce_trace_elbo_exactly(data):
    guide = _initialised_guide(ppca_with_prior, data)
    pyro.set_rng_seed(1)
    expected = Trace_ELBO().loss(ppca_with_prior, guide, data)
    pyro.set_rng_seed(1)
    actual = MaskedPretrainingELBO(Exhaustive()).loss(ppca_with_prior, guide, data)
    assert actual == pytest.approx(expected, rel=1e-5)


def test_loss_differentiable_loss_and_loss_and_grads_agree(data):
    guide = _initialised_guide(ppca_with_prior, data)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]

    def run(method):
        pyro.set_rng_seed(7)
        elbo = MaskedPretrainingELBO(generator=_generator(11))
        for p in params:
            p.grad = None
        return getattr(elbo, method)(ppca_with_prior, guide, data)

    loss = run("loss")
    differentiable = run("differentiable_loss")
    differentiable.backward()
    grads = [p.grad.clone() for p in params]
    loss_and_grads = run("loss_and_grads")
    assert isinstance(loss, float) and isinstance(loss_and_grads, float)
    assert differentiable.item() == pytest.approx(loss, rel=1e-6)
    assert loss_and_grads == pytest.approx(loss, rel=1e-6)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert any(g.abs().sum() > 0 for g in grads)


def test_masks_are_deterministic_under_a_seeded_generator(data):
    guide = _initialised_guide(ppca_with_prior, data)
    first = _losses(lambda _: MaskedPretrainingELBO(generator=_generator(5)), ppca_with_prior,
                    guide, (data,), repeats=2)
    assert first[0] == first[1]
    other = _losses(lambda _: MaskedPretrainingELBO(generator=_generator(6)), ppca_with_prior,
                    guide, (data,))
    assert other[0] != first[0]


def _expectation_check(model, args, num_draws=2000, num_batches=40):
    """Mean over ``num_draws`` mask draws (in batches of independent replicates) vs Trace_ELBO."""
    guide = _initialised_guide(model, *args)
    expected = _losses(lambda _: Trace_ELBO(), model, guide, args).item()
    generator = _generator(0)
    per_batch = num_draws // num_batches

    def elbo(_):
        return MaskedPretrainingELBO(num_masks=per_batch, generator=generator)

    batches = _losses(elbo, model, guide, args, repeats=num_batches)
    stderr = batches.std() / math.sqrt(num_batches)
    assert stderr > 0
    assert abs(batches.mean().item() - expected) < 4 * stderr, (batches.mean(), expected, stderr)
    return batches, expected


def test_expected_loss_equals_trace_elbo_at_fixed_guide_samples(data):
    batches, expected = _expectation_check(ppca_with_prior, (data,))
    # The check has power: a 1% error in the loss would be many standard errors.
    assert 0.01 * abs(expected) > 4 * batches.std() / math.sqrt(len(batches))


def test_expectation_holds_with_subsampling():
    num_data = 1000
    full = torch.randn(num_data, D, generator=_generator(4))

    def model(x):
        # The batch is chosen by the plate; the loss is scaled by num_data / 128.
        with pyro.plate("rows", num_data, subsample_size=128) as rows:
            pass
        ppca_with_prior(x[rows], num_data)

    _expectation_check(model, (full,))
    guide = _initialised_guide(model, full)
    expected = _losses(lambda _: Trace_ELBO(), model, guide, (full,)).item()
    exact = _losses(lambda _: MaskedPretrainingELBO(Exhaustive()), model, guide, (full,)).item()
    assert exact == pytest.approx(expected, rel=1e-5)


def test_plate_subsample_scale_poutine_scale_and_mask_match_trace_elbo(data):
    mask = torch.arange(len(data)) % 3 != 0

    def model(x):
        marginal = _ppca_globals()
        with poutine.scale(scale=0.3), pyro.plate("data", 100, subsample_size=len(x)):
            with poutine.mask(mask=mask):
                pyro.sample("x", marginal, obs=x)

    guide = _initialised_guide(model, data)
    expected = _losses(lambda _: Trace_ELBO(), model, guide, (data,)).item()
    actual = _losses(lambda _: MaskedPretrainingELBO(Exhaustive()), model, guide, (data,)).item()
    assert actual == pytest.approx(expected, rel=1e-5)


def test_distribution_mask_is_respected(data):
    def model(x):
        noise = pyro.param("noise", torch.tensor(0.7), constraint=dist.constraints.positive)
        cov = noise * torch.eye(D) + 0.3
        with pyro.plate("data", len(x)):
            fn = dist.MultivariateNormal(torch.zeros(D), cov).mask(torch.arange(len(x)) < 10)
            pyro.sample("x", fn, obs=x)

    expected = Trace_ELBO().loss(model, lambda x: None, data)
    actual = MaskedPretrainingELBO(Exhaustive()).loss(model, lambda x: None, data)
    assert actual == pytest.approx(expected, rel=1e-5)


def test_type_ii_maximum_likelihood_without_latents_equals_exact_lml(data):
    def model(x):
        noise = pyro.param("noise", torch.tensor(0.7), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            cov = noise * torch.eye(D) + 0.5
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(D), cov), obs=x)

    cov = 0.7 * torch.eye(D) + 0.5
    exact = -dist.MultivariateNormal(torch.zeros(D), cov).log_prob(data).sum().item()
    for masks in [Exhaustive(), Stratified(masks_per_size=2)]:
        loss = MaskedPretrainingELBO(masks, generator=_generator()).loss(model, _no_guide, data)
        tolerance = 1e-5 if masks.exact else 0.05
        assert loss == pytest.approx(exact, rel=tolerance)


def test_factorised_site_term_is_the_plain_log_likelihood(data):
    def model(x):
        loc = pyro.param("loc", torch.zeros(D))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 2.0).to_event(1), obs=x)
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=x[:, 0])  # no event dimension

    exact = dist.Normal(0.0, 2.0).log_prob(data).sum()
    exact = exact + dist.Normal(0.0, 1.0).log_prob(data[:, 0]).sum()
    loss = MaskedPretrainingELBO(Cumulative(), generator=_generator()).loss(model, _no_guide, data)
    assert loss == pytest.approx(-exact.item(), rel=1e-6)
    # A fixed rate has no closed form shortcut; its masked estimate is unbiased here too (D/m each).
    draws = torch.tensor(
        [
            MaskedPretrainingELBO(FixedRate(0.4), generator=_generator(i)).loss(
                model, _no_guide, data
            )
            for i in range(200)
        ]
    )
    assert abs(draws.mean() + exact) < 4 * draws.std() / math.sqrt(len(draws))


def test_vectorized_particles_match_trace_elbo(data):
    guide = _initialised_guide(ppca_with_prior, data)
    common = dict(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    expected = _losses(lambda _: Trace_ELBO(**common), ppca_with_prior, guide, (data,)).item()
    actual = _losses(lambda _: MaskedPretrainingELBO(Exhaustive(), **common), ppca_with_prior,
                     guide, (data,)).item()
    assert actual == pytest.approx(expected, rel=1e-5)


def test_svi_elbo_module_and_gp_train_interfaces():
    x = torch.randn(40, D, generator=_generator(8)) * 2.0

    def model(x):
        noise = pyro.param("noise", torch.tensor(0.5), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(D), noise * torch.eye(D)), obs=x)

    elbo = MaskedPretrainingELBO(generator=_generator())
    svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}), elbo)
    for _ in range(100):
        svi.step(x)
    # Type-II ML of an isotropic Gaussian: the variance is the mean square.
    assert pyro.param("noise").item() == pytest.approx(x.pow(2).mean().item(), rel=0.1)

    module = elbo(model, lambda x: None)
    assert torch.is_tensor(module(x)) and module(x).requires_grad


def test_gp_contrib_train_accepts_differentiable_loss():
    gp = pytest.importorskip("pyro.contrib.gp")
    inputs = torch.linspace(0, 1, 6)
    targets = torch.sin(6 * inputs)
    model = gp.models.GPRegression(inputs, targets, gp.kernels.RBF(1), noise=torch.tensor(0.1))
    exact = model.model  # the marginal likelihood of the targets is one MultivariateNormal site
    elbo = MaskedPretrainingELBO(Exhaustive())
    trace_loss = Trace_ELBO().loss(exact, model.guide)
    assert elbo.loss(exact, model.guide) == pytest.approx(trace_loss, rel=1e-5)
    losses = gp.util.train(model, loss_fn=elbo.differentiable_loss, num_steps=5)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------------- bad input
def test_model_without_observed_sites_is_rejected():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sites"):
        MaskedPretrainingELBO().loss(model, model)


def test_unsupported_distribution_names_the_site():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("probs", dist.Dirichlet(torch.ones(3)), obs=x)

    x = dist.Dirichlet(torch.ones(3)).sample((4,))
    with pytest.raises(TypeError, match="'probs'.*Dirichlet"):
        MaskedPretrainingELBO().loss(model, lambda x: None, x)


def test_enumerated_discrete_latent_is_rejected():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(torch.ones(2) / 2),
                            infer={"enumerate": "parallel"})
            loc = c.float().unsqueeze(-1).expand(len(x), 3)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'c'.*enumerat"):
        MaskedPretrainingELBO().loss(model, lambda x: None, torch.zeros(4, 3))


def test_discrete_local_latent_is_rejected():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1).expand(-1, 3), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'c'.*discrete"):
        MaskedPretrainingELBO().loss(model, lambda x: None, torch.zeros(4, 3))


def test_nan_observation_names_the_site(data):
    bad = data.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="'x'.*NaN"):
        MaskedPretrainingELBO().loss(ppca_with_prior, lambda x: None, bad)


def test_non_factorised_site_with_local_latents_is_rejected():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.MultivariateNormal(z, torch.eye(3)), obs=x)

    with pytest.raises(TypeError, match="'x'.*local latent"):
        MaskedPretrainingELBO().loss(model, lambda x: None, torch.zeros(4, 3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"masks": "cumulative"}, TypeError, "masks"),
        ({"num_masks": 0}, ValueError, "num_masks"),
        ({"num_importance_samples": 1.5}, ValueError, "num_importance_samples"),
        ({"proposal": "posterior"}, ValueError, "proposal"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MaskedPretrainingELBO(**kwargs)
