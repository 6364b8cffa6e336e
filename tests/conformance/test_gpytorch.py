"""pyro_mpt.gp as a drop-in for gpytorch.mlls, on models written the way GPyTorch users write them.

Claims checked: with :class:`~pyro_mpt.masks.Exhaustive` masks ``MaskedPretrainingMLL`` *is*
``ExactMarginalLogLikelihood`` (value and gradient), ``LeavePOutPseudoLikelihood(rate=1/n)`` *is*
``LeaveOneOutPseudoLikelihood``; both succeed wherever GPyTorch does (jitter, n above
``max_cholesky_size``); unsupported input raises a ``TypeError``/``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior, NormalPrior
from linear_operator.utils.warnings import NumericalWarning

from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL
from pyro_mpt.masks import Exhaustive

# Float precision of value and gradient (per datum, values of order 1) against gpytorch, about ten
# times the largest difference measured (6e-16 in float64, 1e-6 in float32).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}


class ARDGP(gpytorch.models.ExactGP):
    """GPyTorch's regression tutorial model, with ARD lengthscales and an optional batch."""

    def __init__(self, x, y, likelihood, batch_shape=(), priors=False):
        super().__init__(x, y, likelihood)
        batch_shape = torch.Size(batch_shape)
        self.mean_module = gpytorch.means.ConstantMean(
            batch_shape=batch_shape, constant_prior=NormalPrior(0.0, 1.0) if priors else None
        )
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(
                ard_num_dims=x.shape[-1],
                batch_shape=batch_shape,
                lengthscale_prior=GammaPrior(3.0, 6.0) if priors else None,
            ),
            batch_shape=batch_shape,
            outputscale_prior=GammaPrior(2.0, 0.5) if priors else None,
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MultitaskGP(gpytorch.models.ExactGP):
    """GPyTorch's two multitask tutorials: coregionalised (interleaved covariance) or batch
    independent outputs (blocked covariance)."""

    def __init__(self, x, y, likelihood, coregionalised: bool):
        super().__init__(x, y, likelihood)
        num_tasks = y.shape[-1]
        self.coregionalised = coregionalised
        if coregionalised:
            self.mean_module = gpytorch.means.MultitaskMean(
                gpytorch.means.ConstantMean(), num_tasks=num_tasks
            )
            self.covar_module = gpytorch.kernels.MultitaskKernel(
                gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1]), num_tasks=num_tasks, rank=1
            )
        else:
            tasks = torch.Size([num_tasks])
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=tasks)
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.RBFKernel(ard_num_dims=x.shape[-1], batch_shape=tasks),
                batch_shape=tasks,
            )

    def forward(self, x):
        mean, covar = self.mean_module(x), self.covar_module(x)
        if self.coregionalised:
            return gpytorch.distributions.MultitaskMultivariateNormal(mean, covar)
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(
            gpytorch.distributions.MultivariateNormal(mean, covar)
        )


def inputs(n, d=2, batch_shape=(), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch_shape, n, d, generator=gen, dtype=dtype)
    y = torch.sin(6 * x[..., 0]) + torch.cos(4 * x[..., -1])
    return x, y + 0.1 * torch.randn(y.shape, generator=gen, dtype=dtype), gen


def make_model(case: str, n=8, dtype=torch.float64, seed=0):
    """``(likelihood, model, x, y)`` in training mode, hyperparameters away from the defaults."""
    batch_shape = torch.Size([3] if case == "batch" else [])
    x, y, gen = inputs(n, batch_shape=batch_shape, dtype=dtype, seed=seed)
    if case.startswith("multitask"):
        y = torch.stack([y, y.flip(-1) - x[..., 1]], -1)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
        model = MultitaskGP(x, y, likelihood, coregionalised=case == "multitask")
    elif case == "fixed_noise":
        noise = 0.01 + 0.05 * torch.rand(n, generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
        model = ARDGP(x, y, likelihood)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch_shape)
        model = ARDGP(x, y, likelihood, batch_shape, priors=case == "priors")
    model.to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=gen, dtype=dtype))
    model.train()
    return likelihood, model, x, y


def near_noiseless(n, d=1, dtype=torch.float32, seed=0):
    """Noise 1e-8 on a smooth function: float32 needs GPyTorch's jitter to factorise."""
    x, _, _ = inputs(n, d, dtype=dtype, seed=seed)
    y = torch.sin(6 * x[..., 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(1e-9)
    )
    model = ARDGP(x, y, likelihood).to(dtype)
    likelihood.noise = 1e-8
    model.train()
    return likelihood, model, x, y


def value_and_grads(mll, model, x, y):
    model.zero_grad()
    value = mll(model(x), y)
    value.sum().backward()
    return value.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_objective(ours, theirs, model, x, y, atol):
    value, grads = value_and_grads(ours, model, x, y)
    expected, expected_grads = value_and_grads(theirs, model, x, y)
    torch.testing.assert_close(value, expected, atol=atol, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)


CASES = ["gaussian", "priors", "fixed_noise", "batch", "multitask", "multitask_independent"]
DTYPES = [torch.float64, torch.float32]


# --- Exact where GPyTorch is exact -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_exhaustive_masks_are_the_exact_mll(case, dtype):
    n = 5 if case.startswith("multitask") else 8  # 2^(n t) - 1 masks
    likelihood, model, x, y = make_model(case, n=n, dtype=dtype)
    ours = MaskedPretrainingMLL(likelihood, model, masks=Exhaustive(), num_masks=1)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    assert_same_objective(ours, exact, model, x, y, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["gaussian", "priors", "fixed_noise", "batch"])
def test_leave_one_out_is_gpytorchs(case, dtype):
    # (gpytorch's LeaveOneOutPseudoLikelihood does not take multitask targets.)
    likelihood, model, x, y = make_model(case, n=15, dtype=dtype)
    ours = LeavePOutPseudoLikelihood(likelihood, model, rate=1 / 15)
    loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, model)
    assert_same_objective(ours, loo, model, x, y, ATOL[dtype])


def test_nan_targets_follow_observation_nan_policy():
    likelihood, model, x, y = make_model("priors")
    y = y.clone()
    y[[1, 5]] = float("nan")
    ours = MaskedPretrainingMLL(likelihood, model, masks=Exhaustive())
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with gpytorch.settings.observation_nan_policy("mask"):
        assert_same_objective(ours, exact, model, x, y, ATOL[torch.float64])


# --- Succeeds where GPyTorch succeeds ----------------------------------------------------------


# Tolerance for a float32 near-noiseless GP. GPyTorch adds jitter only when float32 Cholesky fails,
# so the jittered matrix is still ill-conditioned: κ = cond(L)² ≈ 8e6 here, κ·eps32 ≈ 1. That is
# the first-order bound on how far rounding the covariance to float32 can move (1/n) log det, and
# rounding GPyTorch's own L Lᵀ to float32 moves the LML of these inputs by 0.03-0.55 nats per datum
# (measured in float64): at this conditioning the value is only defined to that scale. GPyTorch
# scores its one factor L; we combine 2^n - 1 conditionals from blocks of that matrix and of its
# inverse. Measured difference 0.009-0.05 (values about -50); allowed κ·eps32 / 4 ≈ 0.25.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_near_noiseless_gp_matches_exact_mll(seed):
    likelihood, model, x, y = near_noiseless(12, seed=seed)
    with pytest.warns(NumericalWarning, match="added jitter"):
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        ours = MaskedPretrainingMLL(likelihood, model, masks=Exhaustive())(model(x), y)
        loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, model)(model(x), y)
        ours_loo = LeavePOutPseudoLikelihood(likelihood, model, rate=1 / 12)(model(x), y)
        output = likelihood(model(x))
        factor = output.lazy_covariance_matrix.cholesky().to_dense().double()
    eps = torch.finfo(torch.float32).eps
    assert torch.isfinite(ours)
    # Both condition on GPyTorch's jittered factor L: scored in float64, L L^T is the reference,
    # and ours must be as close to it as GPyTorch's own float32 value (up to a small factor).
    reference = torch.distributions.MultivariateNormal(
        output.loc.detach().double(), scale_tril=factor
    ).log_prob(y.double()) / len(y)
    gpytorch_error = abs(exact.item() - reference.item())
    assert abs(ours.item() - reference.item()) < 10 * gpytorch_error + 1e-5
    # Leave-one-out needs only 1 / diag(Σ⁻¹) from the factor, as in gpytorch, by different solves:
    # relative rounding error up to cond(L) eps ≈ 3e-4 (measured 3e-6 to 2e-5).
    torch.testing.assert_close(ours_loo, loo, rtol=torch.linalg.cond(factor).item() * eps, atol=0)


def test_float32_near_noiseless_gp_trains():
    likelihood, model, x, y = near_noiseless(30, d=2)
    mll = MaskedPretrainingMLL(likelihood, model, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.warns(NumericalWarning, match="added jitter"):
        for _ in range(10):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            assert torch.isfinite(loss)
            assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            optimizer.step()


# --- Above gpytorch.settings.max_cholesky_size -------------------------------------------------

N_LARGE = 1000  # above max_cholesky_size (800): ExactMarginalLogLikelihood switches to CG/Lanczos


def smooth_regression(n, dtype=torch.float32):
    """A fitted-looking ARD GP: noise 0.01, lengthscales 0.3 and 0.5 on the unit square."""
    x, y, _ = inputs(n, dtype=dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ARDGP(x, y, likelihood).to(dtype)
    likelihood.noise = 0.01
    model.covar_module.base_kernel.lengthscale = torch.tensor([[0.3, 0.5]], dtype=dtype)
    model.train()
    return likelihood, model, x, y


@pytest.mark.parametrize(
    "make", [smooth_regression, lambda n: near_noiseless(n, d=2)], ids=["smooth", "near_noiseless"]
)
def test_above_max_cholesky_size(make):
    likelihood, model, x, y = make(N_LARGE)
    assert N_LARGE > gpytorch.settings.max_cholesky_size.value()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)  # jitter, for the near-noiseless GP
        mll = MaskedPretrainingMLL(likelihood, model, generator=torch.Generator().manual_seed(0))
        value = mll(model(x), y)
        value.backward()
        with torch.no_grad():
            ours_loo = LeavePOutPseudoLikelihood(likelihood, model, rate=1 / N_LARGE)(model(x), y)
            loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(likelihood, model)(model(x), y)
            factor = likelihood(model(x)).lazy_covariance_matrix.cholesky().to_dense()
    assert torch.isfinite(value)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    # Both compute 1 / diag(Σ⁻¹) from the same factor, by different solves: relative rounding
    # error up to cond(L) eps (1e-5 and 2e-3 here; measured 0 and 5e-7).
    rtol = torch.linalg.cond(factor.double()).item() * torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours_loo, loo, rtol=rtol, atol=0)


@pytest.mark.slow
def test_estimate_above_max_cholesky_size_is_unbiased_for_the_exact_mll():
    likelihood, model, x, y = smooth_regression(N_LARGE)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**5):
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    mll = MaskedPretrainingMLL(
        likelihood, model, num_masks=8, generator=torch.Generator().manual_seed(0)
    )
    # Cumulative draws have a long left tail (a mask of size 1 scores one point, weighted by n):
    # enough draws that the tail is sampled and the standard error is honest.
    with torch.no_grad():
        draws = torch.stack([mll(model(x), y) for _ in range(30)])
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 4 * stderr
    assert stderr < 0.03  # per datum; the exact value is 0.85: 4 s.e. is within 14%


# --- Unsupported input fails loudly, naming the argument ----------------------------------------


class VariationalGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing_points):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(len(inducing_points))
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, distribution, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("objective", [MaskedPretrainingMLL, LeavePOutPseudoLikelihood])
def test_rejects_models_without_an_exact_gaussian_predictive(objective):
    kwargs = {"rate": 0.2} if objective is LeavePOutPseudoLikelihood else {}
    likelihood, model, x, y = make_model("gaussian")
    with pytest.raises(TypeError, match="likelihood must be a Gaussian likelihood"):
        objective(gpytorch.likelihoods.BernoulliLikelihood(), model, **kwargs)
    with pytest.raises(TypeError, match="model must be a gpytorch.models.ExactGP"):
        objective(likelihood, VariationalGP(x[:4].float()), **kwargs)


@pytest.mark.parametrize("objective", [MaskedPretrainingMLL, LeavePOutPseudoLikelihood])
def test_nan_targets_need_the_mask_policy(objective):
    kwargs = {"rate": 0.2} if objective is LeavePOutPseudoLikelihood else {}
    likelihood, model, x, y = make_model("gaussian")
    mll = objective(likelihood, model, **kwargs)
    y = y.clone()
    y[3] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN.*observation_nan_policy"):
        mll(model(x), y)
    with gpytorch.settings.observation_nan_policy("fill"), pytest.raises(ValueError, match="fill"):
        mll(model(x), y)
    with pytest.raises(ValueError, match="target contains NaN"):
        mll.conditionals(model(x), y, torch.ones(8, dtype=torch.bool))


def test_rejects_badly_shaped_or_typed_input():
    likelihood, model, x, y = make_model("gaussian")
    mll = MaskedPretrainingMLL(likelihood, model)
    output = model(x)
    with pytest.raises(TypeError, match="function_dist must be a gpytorch"):
        mll(torch.distributions.Normal(torch.zeros(8), 1.0), y)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        mll(output, y.tolist())
    with pytest.raises(ValueError, match=r"target must end with the output's event shape \(8,\)"):
        mll(output, y[:5])
    batch_likelihood, batch_model, batch_x, _ = make_model("batch")  # batch shape (3,)
    with pytest.raises(ValueError, match="target of shape .* does not broadcast"):
        MaskedPretrainingMLL(batch_likelihood, batch_model)(batch_model(batch_x), y.expand(2, 8))
    with pytest.raises(TypeError, match="target must have the model's dtype"):
        mll(output, y.float())
    with pytest.raises(TypeError, match="mask must be a boolean"):
        mll.conditionals(output, y, torch.ones(8))
    with pytest.raises(ValueError, match="mask must end with the target's shape"):
        mll.conditionals(output, y, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must hold out at least one observation"):
        mll.conditionals(output, y, torch.zeros(8, dtype=torch.bool))


def test_rejects_multitask_target_in_the_wrong_layout():
    likelihood, model, x, y = make_model("multitask", n=5)
    mll = MaskedPretrainingMLL(likelihood, model)
    with pytest.raises(ValueError, match=r"target must end with the output's event shape \(5, 2\)"):
        mll(model(x), y.mT)
    with pytest.raises(ValueError, match=r"event shape \(5, 2\)"):
        mll(model(x), y.flatten())
