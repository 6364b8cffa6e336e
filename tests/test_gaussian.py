import pyro.distributions as pyro_dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, Normal

from pyro_mpt.gaussian import (
    full_rank_conditionals,
    low_rank_conditionals,
    masked_conditional_log_prob,
    masked_conditional_normal,
)
from pyro_mpt.masks import Cumulative, Exhaustive
from pyro_mpt.scoring import mpt_score


def _random_gaussians(seed, size, rank=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=g, dtype=dtype)
    cov = a @ a.T + 0.3 * torch.eye(size, dtype=dtype)
    loc = torch.randn(size, generator=g, dtype=dtype)
    cov_factor = torch.randn(size, rank, generator=g, dtype=dtype)
    cov_diag = 0.1 + torch.rand(size, generator=g, dtype=dtype)
    return (
        MultivariateNormal(loc, cov),
        LowRankMultivariateNormal(loc, cov_factor, cov_diag),
        g,
    )


def _schur_log_prob(loc, cov, x, mask):
    """Brute force: condition each masked j on the visible set by an explicit Schur complement."""
    out = torch.zeros_like(x)
    visible = (~mask).nonzero().flatten()
    for j in mask.nonzero().flatten().tolist():
        if len(visible) == 0:
            mean, var = loc[j], cov[j, j]
        else:
            s_rr = cov[visible][:, visible]
            s_jr = cov[j, visible]
            mean = loc[j] + s_jr @ torch.linalg.solve(s_rr, x[visible] - loc[visible])
            var = cov[j, j] - s_jr @ torch.linalg.solve(s_rr, s_jr)
        out[j] = Normal(mean, var.sqrt()).log_prob(x[j])
    return out


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 10), seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 4))
def test_exhaustive_masks_recover_log_prob_exactly(size, seed, rank):
    full, low_rank, g = _random_gaussians(seed, size, rank)
    x = torch.randn(3, size, generator=g, dtype=torch.float64) * 2
    for dist in (full, low_rank):
        estimate = mpt_score(dist, x, masks=Exhaustive())
        assert (estimate.mean - dist.log_prob(x)).abs().max() < 1e-8
        assert (estimate.stderr == 0).all()


@pytest.mark.parametrize("size", [1, 3, 7, 12])
@pytest.mark.parametrize("kind", ["full", "low_rank", "low_rank_wide"])
def test_conditionals_match_brute_force_schur_complement(size, kind):
    full, low_rank, g = _random_gaussians(size, size, rank=2 if kind == "low_rank" else size + 1)
    dist = full if kind == "full" else low_rank
    cov = dist.covariance_matrix
    x = torch.randn(4, size, generator=g, dtype=torch.float64)
    masks = Cumulative().sample(size, (4,), num_masks=6, generator=g).masks
    got = masked_conditional_log_prob(dist, x, masks)
    for s in range(6):
        for r in range(4):
            expected = _schur_log_prob(dist.loc, cov, x[r], masks[s, r])
            torch.testing.assert_close(got[s, r], expected, atol=1e-10, rtol=1e-10)


def test_conditional_mean_and_variance_match_textbook_formula():
    full, _, g = _random_gaussians(1, 6)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, False])
    mean, var = masked_conditional_normal(full, x, mask)
    precision = torch.linalg.inv(full.covariance_matrix)
    block = torch.linalg.inv(precision[mask][:, mask])
    expected_mean = x[mask] - block @ (precision @ (x - full.loc))[mask]
    torch.testing.assert_close(mean[mask], expected_mean)
    torch.testing.assert_close(var[mask], block.diagonal())
    assert torch.equal(mean[~mask], x[~mask]) and (var[~mask] == 0).all()


def test_diagonal_normal_conditionals_are_marginals():
    loc, scale = torch.randn(5), torch.rand(5) + 0.5
    dist = pyro_dist.Normal(loc, scale).to_event(1)
    x = torch.randn(3, 5)
    mask = torch.rand(3, 5) < 0.5
    mask[:, 0] = True
    expected = torch.where(mask, Normal(loc, scale).log_prob(x), torch.zeros(()))
    torch.testing.assert_close(masked_conditional_log_prob(dist, x, mask), expected)


def test_pyro_distributions_and_float32():
    full, low_rank, g = _random_gaussians(3, 5)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    for dist in (
        pyro_dist.MultivariateNormal(full.loc.float(), full.covariance_matrix.float()),
        pyro_dist.LowRankMultivariateNormal(
            low_rank.loc.float(), low_rank.cov_factor.float(), low_rank.cov_diag.float()
        ),
    ):
        estimate = mpt_score(dist, x.float(), masks=Exhaustive())
        assert estimate.mean.dtype == torch.float32
        torch.testing.assert_close(estimate.mean, dist.log_prob(x.float()), atol=1e-4, rtol=1e-5)


def test_batched_distribution_broadcasts_like_log_prob():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    dist = MultivariateNormal(torch.zeros(2, 4, dtype=torch.float64), a @ a.mT + torch.eye(4))
    x = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    estimate = mpt_score(dist, x, masks=Exhaustive())
    assert estimate.mean.shape == (5, 2)
    torch.testing.assert_close(estimate.mean, dist.log_prob(x))


def test_gradients_of_exhaustive_score_equal_gradients_of_log_prob():
    g = torch.Generator().manual_seed(0)
    cov_factor = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    cov_diag = (torch.rand(6, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for route in ("low_rank", "full"):
        if route == "low_rank":
            dist = LowRankMultivariateNormal(
                torch.zeros(6, dtype=torch.float64), cov_factor, cov_diag
            )
        else:
            cov = cov_factor @ cov_factor.T + torch.diag(cov_diag)
            dist = MultivariateNormal(torch.zeros(6, dtype=torch.float64), cov)
        ours = torch.autograd.grad(
            mpt_score(dist, x, Exhaustive()).mean.sum(), (cov_factor, cov_diag), retain_graph=True
        )
        exact = torch.autograd.grad(dist.log_prob(x).sum(), (cov_factor, cov_diag))
        for a, b in zip(ours, exact, strict=True):
            torch.testing.assert_close(a, b)


class TestBadInput:
    dist = MultivariateNormal(torch.zeros(3), torch.eye(3))
    mask = torch.tensor([True, False, True])

    def test_nan_and_inf_values(self):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="value contains NaN or infinite"):
                masked_conditional_log_prob(self.dist, torch.tensor([0.0, bad, 1.0]), self.mask)

    def test_wrong_value_shape(self):
        with pytest.raises(ValueError, match="value must have trailing dimension D=3"):
            masked_conditional_log_prob(self.dist, torch.zeros(4), self.mask)

    def test_wrong_mask_shape_and_dtype(self):
        with pytest.raises(ValueError, match="mask must have trailing dimension D=3"):
            masked_conditional_log_prob(self.dist, torch.zeros(3), torch.ones(4, dtype=torch.bool))
        with pytest.raises(TypeError, match="mask must be a boolean"):
            masked_conditional_log_prob(self.dist, torch.zeros(3), torch.ones(3))

    def test_non_broadcasting_shapes(self):
        with pytest.raises(ValueError, match="do not broadcast"):
            masked_conditional_log_prob(self.dist, torch.zeros(2, 3), self.mask.expand(5, 3))

    def test_all_false_mask_row(self):
        mask = torch.tensor([[True, False, False], [False, False, False]])
        with pytest.raises(ValueError, match="mask has a row with no masked dimension"):
            masked_conditional_log_prob(self.dist, torch.zeros(3), mask)

    def test_non_gaussian_distribution(self):
        with pytest.raises(TypeError, match="dist must be a MultivariateNormal"):
            masked_conditional_log_prob(
                pyro_dist.Bernoulli(0.5 * torch.ones(3)).to_event(1), torch.zeros(3), self.mask
            )
        with pytest.raises(TypeError, match="dist must be a MultivariateNormal"):
            mpt_score(Normal(torch.zeros(3), 1.0), torch.zeros(3))

    def test_singular_covariance(self):
        from pyro_mpt.gaussian import full_rank_conditionals

        singular = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        with pytest.raises(ValueError, match="singular"):
            full_rank_conditionals(torch.zeros(3), torch.zeros(3), self.mask, covariance=singular)
        low_rank = LowRankMultivariateNormal(
            torch.zeros(3), torch.ones(3, 1), torch.tensor([1.0, 0.0, 1.0]), validate_args=False
        )
        with pytest.raises(ValueError, match="cov_diag must be strictly positive"):
            masked_conditional_log_prob(low_rank, torch.zeros(3), self.mask)


def test_float32_conditionals_are_as_accurate_as_torch_log_prob():
    """Valid float32 factors with a wide range of scales: the block-Cholesky routes refused 35 of
    these 40 as singular (and were off by up to 443 nats on the rest); conditioning from the
    factor must stay within a small multiple of torch's own float32 log_prob error."""
    torch.manual_seed(0)
    size = 6
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        scale_tril = torch.randn(size, size, generator=g).tril()
        scale_tril.diagonal().copy_(scale_tril.diagonal().abs() * 0.05 + 0.01)
        dist32 = MultivariateNormal(torch.zeros(size), scale_tril=scale_tril)
        dist64 = MultivariateNormal(torch.zeros(size, dtype=torch.float64),
                                    scale_tril=scale_tril.double())
        x = dist64.sample((3,)).float()
        truth = dist64.log_prob(x.double())
        torch_error = (dist32.log_prob(x).double() - truth).abs().max()
        estimate = mpt_score(dist32, x, masks=Exhaustive()).mean.double()
        error = (estimate - truth).abs().max()
        assert error <= 10 * (torch_error + 1e-4), (seed, error, torch_error)


def test_float32_variances_are_never_negative_and_unrepresentable_ones_are_refused():
    # x_0 given the other five has variance ~1e-50 here: below float32's range, so the honest
    # answer is an error that says what to do, never a NaN or a clamped number.
    g = torch.Generator().manual_seed(27)
    scale = 10 ** (-4 * torch.rand(1, generator=g).item())
    scale_tril = torch.randn(6, 6, generator=g).tril()
    scale_tril.diagonal().copy_(scale_tril.diagonal().abs() * scale + 1e-7)
    dist = MultivariateNormal(torch.zeros(6), scale_tril=scale_tril)
    x = MultivariateNormal(torch.zeros(6, dtype=torch.float64),
                           scale_tril=scale_tril.double()).sample((3,)).float()
    _, var = masked_conditional_normal(dist, x[0], Exhaustive().sample(6).masks)
    assert (var >= 0).all()
    with pytest.raises(ValueError, match="float64"):
        mpt_score(dist, x, masks=Exhaustive())
    assert torch.isfinite(mpt_score(dist.__class__(torch.zeros(6, dtype=torch.float64),
                                                   scale_tril=scale_tril.double()),
                                    x.double(), masks=Exhaustive()).mean).all()


def test_low_rank_closed_form_gradients_match_autograd_through_the_dense_covariance():
    """The Woodbury conditionals' hand-written backward (W, psi, value and loc) against autograd
    through the dense route on W W^T + diag(psi); masks of every size, with a leading draw dim."""
    gen = torch.Generator().manual_seed(0)
    size, rank, rows = 9, 3, 7
    params = [
        torch.randn(size, rank, generator=gen, dtype=torch.float64),
        torch.rand(size, generator=gen, dtype=torch.float64) + 0.3,
        torch.randn(rows, size, generator=gen, dtype=torch.float64),
        torch.randn(size, generator=gen, dtype=torch.float64),
    ]
    mask = torch.stack([torch.rand(rows, size, generator=gen) < rate for rate in (0.2, 0.8)])
    mask[0, 0] = True  # a row with every dimension masked: the marginals
    # Both routes are defined at masked positions only.
    grads = [mask * torch.randn(2, rows, size, generator=gen, dtype=torch.float64) for _ in "dv"]

    def values_and_grads(conditionals):
        leaves = [p.clone().requires_grad_() for p in params]
        outputs = [out * mask for out in conditionals(*leaves)]
        sum((out * g).sum() for out, g in zip(outputs, grads, strict=True)).backward()
        return [out.detach() for out in outputs] + [leaf.grad for leaf in leaves]

    ours = values_and_grads(
        lambda w, psi, x, loc: low_rank_conditionals(loc, x, mask, cov_factor=w, cov_diag=psi)
    )
    dense = values_and_grads(
        lambda w, psi, x, loc: full_rank_conditionals(
            loc, x, mask, covariance=w @ w.mT + torch.diag(psi)
        )
    )
    for got, expected in zip(ours, dense, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
