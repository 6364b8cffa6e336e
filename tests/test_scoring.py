import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from pyro_mpt.datasets import synthetic_ppca
from pyro_mpt.masks import Cumulative, Exhaustive, FixedRate, RateRange, Stratified
from pyro_mpt.scoring import interpolation_weights, mpt_curve, mpt_score, stratified_estimate


@pytest.fixture(scope="module")
def ppca50():
    """PPCA with its true parameters, D = 50, K = 2, noise precision 5 (the paper's E1 setting)."""
    g = torch.Generator().manual_seed(1)
    x, cov_factor = synthetic_ppca(4, 50, 2, 5.0, generator=g, dtype=torch.float64)
    dist = LowRankMultivariateNormal(
        torch.zeros(50, dtype=torch.float64),
        cov_factor,
        torch.full((50,), 0.2, dtype=torch.float64),
    )
    return dist, x


@pytest.mark.parametrize(
    "scheme, num_masks", [(Cumulative(), 10_000), (Stratified(masks_per_size=200), 1)]
)
def test_unbiased_schemes_average_to_the_exact_lml(ppca50, scheme, num_masks):
    dist, x = ppca50
    estimate = mpt_score(dist, x, scheme, num_masks, torch.Generator().manual_seed(2))
    exact = dist.log_prob(x)
    z = (estimate.mean - exact) / estimate.stderr
    assert z.abs().max() < 4, z
    # The standard error is small enough that this is a real check (under 0.5% of the LML).
    assert (estimate.stderr < 0.005 * exact.abs()).all()


def test_stratified_has_lower_variance_than_cumulative_for_the_same_masks(ppca50):
    dist, x = ppca50
    g = torch.Generator().manual_seed(3)
    cumulative = mpt_score(dist, x, Cumulative(), 1000, g)
    stratified = mpt_score(dist, x, Stratified(masks_per_size=20), 1, g)
    assert (stratified.stderr < cumulative.stderr).all()


def test_stderr_is_calibrated(ppca50):
    """The reported standard error matches the spread of independent repetitions."""
    dist, x = ppca50
    g = torch.Generator().manual_seed(4)
    repeats = [mpt_score(dist, x[:1], Cumulative(), 50, g) for _ in range(300)]
    spread = torch.stack([r.mean for r in repeats]).std(0)
    reported = torch.stack([r.stderr for r in repeats]).mean(0)
    # With 300 repeats the sample std is within ~10% of the truth (2.5 sigma = 0.1).
    assert torch.allclose(reported, spread, rtol=0.15)


def test_fixed_rate_is_biased_with_rate_dependent_sign(ppca50):
    """15% over-estimates the LML and 85% under-estimates it (DESIGN.md's figures)."""
    dist, x = ppca50
    g = torch.Generator().manual_seed(5)
    exact = dist.log_prob(x).mean()
    low = mpt_score(dist, x, FixedRate(0.15), 2000, g, reduction="mean")
    high = mpt_score(dist, x, FixedRate(0.85), 2000, g, reduction="mean")
    assert low.mean - exact > 10 * low.stderr
    assert exact - high.mean > 10 * high.stderr


def test_fixed_rate_targets_d_times_the_curve_value():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    dist = MultivariateNormal(torch.zeros(6, dtype=torch.float64), a @ a.T + torch.eye(6))
    x = torch.randn(2, 6, generator=g, dtype=torch.float64)
    exhaustive = Exhaustive().sample(6, (2,), dtype=torch.float64)
    from pyro_mpt.gaussian import masked_conditional_log_prob

    per_mask = masked_conditional_log_prob(dist, x, exhaustive.masks).sum(-1)
    sizes = exhaustive.masks[:, 0].sum(-1)
    exact_curve = torch.stack([(per_mask[sizes == m] / m).mean(0) for m in range(1, 7)])
    rate = mpt_score(dist, x, FixedRate(0.5), 4000, g)
    assert ((rate.mean - 6 * exact_curve[2]).abs() < 4 * rate.stderr).all()
    curve = mpt_curve(dist, x, masks_per_rate=4000, generator=g)
    assert ((curve.mean - exact_curve).abs() < 4 * curve.stderr).all()
    assert torch.allclose(exact_curve.sum(0), dist.log_prob(x))


def test_curve_area_matches_exact_lml_and_interpolates(ppca50):
    dist, x = ppca50
    g = torch.Generator().manual_seed(7)
    curve = mpt_curve(dist, x, masks_per_rate=64, generator=g, reduction="mean")
    area = curve.area()
    exact = dist.log_prob(x).mean()
    assert abs(area.mean - exact) < 4 * area.stderr
    sparse = mpt_curve(
        dist,
        x,
        rates=[0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 1.0],
        masks_per_rate=4,
        generator=g,
        reduction="mean",
    )
    assert sparse.sizes.tolist() == [1, 5, 15, 25, 35, 45, 49, 50]


def test_area_interpolation_is_exact_for_piecewise_linear_curves():
    sizes = torch.tensor([1, 4, 10])
    weights = interpolation_weights(sizes, 12)
    values = torch.tensor([2.0, 5.0, -1.0], dtype=torch.float64)
    grid = torch.arange(1, 13, dtype=torch.float64)
    # Linear between the knots, constant beyond the last one.
    expected = torch.where(grid <= 4, grid + 1, torch.where(grid <= 10, 5 - (grid - 4), -1.0))
    torch.testing.assert_close(weights @ values, expected.sum())


def test_rate_range_estimates_the_partial_sum_of_the_curve():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    dist = MultivariateNormal(torch.zeros(8, dtype=torch.float64), a @ a.T + torch.eye(8))
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    curve = mpt_curve(dist, x, masks_per_rate=3000, generator=g)
    partial = curve.mean[3:6].sum(0)  # m = 4, 5, 6
    partial_se = curve.stderr[3:6].pow(2).sum(0).sqrt()
    ranged = mpt_score(dist, x, RateRange(0.5, 0.75), 6000, g)
    assert ((ranged.mean - partial).abs() < 4 * (ranged.stderr**2 + partial_se**2).sqrt()).all()


def test_reduction_accounts_for_shared_masks(ppca50):
    dist, x = ppca50
    g = torch.Generator().manual_seed(9)
    per_row = mpt_score(dist, x, Cumulative(shared=True), 400, g)
    pooled = mpt_score(
        dist, x, Cumulative(shared=True), 400, torch.Generator().manual_seed(9), reduction="mean"
    )
    torch.testing.assert_close(pooled.mean, per_row.mean.mean())
    # Shared masks correlate the rows: the pooled error is not the independent-rows formula.
    independent_formula = per_row.stderr.pow(2).sum().sqrt() / len(x)
    assert not torch.isclose(pooled.stderr, independent_formula, rtol=0.05)


def test_deterministic_under_a_seed(ppca50):
    dist, x = ppca50
    a = mpt_score(dist, x, Cumulative(), 3, torch.Generator().manual_seed(10))
    b = mpt_score(dist, x, Cumulative(), 3, torch.Generator().manual_seed(10))
    assert torch.equal(a.mean, b.mean)


def test_stratified_estimate_matches_hand_computation():
    contributions = torch.tensor([1.0, 3.0, 10.0, 14.0, 20.0])
    strata = torch.tensor([0, 0, 1, 1, 1])
    estimate = stratified_estimate(contributions, strata)
    assert estimate.mean.item() == 48.0
    expected = 2 * torch.tensor([1.0, 3.0]).var() + 3 * torch.tensor([10.0, 14.0, 20.0]).var()
    torch.testing.assert_close(estimate.stderr, expected.sqrt())
    assert torch.isnan(stratified_estimate(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).stderr)


def test_bad_arguments(ppca50):
    dist, x = ppca50
    with pytest.raises(TypeError, match="masks must be a pyro_mpt.masks.MaskScheme"):
        mpt_score(dist, x, masks="cumulative")
    with pytest.raises(ValueError, match="rate"):
        mpt_curve(dist, x, rates=[0.0, 0.5])
    with pytest.raises(ValueError, match="masks_per_rate"):
        mpt_curve(dist, x, masks_per_rate=0)
    with pytest.raises(ValueError, match="reduction"):
        mpt_score(dist, x, reduction="max")
    with pytest.raises(ValueError, match="value contains NaN"):
        mpt_score(dist, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="does not broadcast"):
        mpt_score(
            LowRankMultivariateNormal(dist.loc.expand(3, 50), dist.cov_factor, dist.cov_diag), x
        )


@pytest.mark.parametrize("data_dtype", [torch.long, torch.int32, torch.bool])
def test_integer_and_boolean_data_are_promoted_like_log_prob(data_dtype):
    """Weights used to be cast to the data's dtype and truncate to 0: every score was 0.0."""
    dist = LowRankMultivariateNormal(torch.zeros(4), 0.5 * torch.ones(4, 1), torch.ones(4))
    x = torch.randint(0, 2, (5, 4)).to(data_dtype)
    exact = dist.log_prob(x.float())
    est = mpt_score(dist, x, masks=Exhaustive())
    assert est.mean.dtype == torch.float32
    assert torch.allclose(est.mean, exact, atol=1e-5)
    cumulative = mpt_score(dist, x, num_masks=4, generator=torch.Generator().manual_seed(0))
    same_on_floats = mpt_score(dist, x.float(), num_masks=4,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(cumulative.mean, same_on_floats.mean)


def test_mismatched_floating_dtypes_name_the_argument():
    dist = MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(TypeError, match="value has dtype torch.float64"):
        mpt_score(dist, torch.zeros(2, 3, dtype=torch.float64))


def test_empty_batch_is_an_error_not_nan():
    dist = MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="no rows"):
        mpt_score(dist, torch.zeros(0, 3), reduction="mean")


@pytest.mark.parametrize("generator", [0, 1.5, "seed"])
def test_a_non_generator_is_named(generator):
    dist = MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mpt_score(dist, torch.zeros(2, 3), generator=generator)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mpt_curve(dist, torch.zeros(2, 3), generator=generator)


def test_student_t_intervals_cover_with_few_masks(ppca50):
    """±1.96 s.e. from 2 masks covers ~68%; the Student-t interval on the reported degrees of
    freedom must cover at its nominal level (400 independent estimates of one row's LML)."""
    dist, x = ppca50
    rows = x[:1].expand(400, 50)
    est = mpt_score(dist, rows, num_masks=2, generator=torch.Generator().manual_seed(5))
    exact = dist.log_prob(x[0])
    assert (est.dof == 1).all()
    low, high = est.interval(0.95)
    coverage = ((low <= exact) & (exact <= high)).double().mean()
    normal_coverage = ((est.mean - exact).abs() <= 1.96 * est.stderr).double().mean()
    assert coverage > 0.9, coverage
    assert normal_coverage < 0.8, normal_coverage  # what the naive interval gave


def test_mean_reduction_pools_rows_with_independent_masks(ppca50):
    """Two masks per row: averaging rows before comparing draws left 1 degree of freedom;
    pooling the rows' variances (Welch-Satterthwaite, conservative) gives many more, and the
    standard error stays calibrated over repetitions."""
    dist, x = ppca50
    data = dist.sample((40,))
    exact = dist.log_prob(data).mean()
    g = torch.Generator().manual_seed(6)
    estimates = [mpt_score(dist, data, num_masks=2, generator=g, reduction="mean")
                 for _ in range(200)]
    dofs = torch.stack([torch.as_tensor(e.dof) for e in estimates])
    assert (dofs <= 40).all() and dofs.median() > 3, dofs
    z = torch.stack([(e.mean - exact) / e.stderr for e in estimates])
    assert 0.8 < z.std().item() < 1.25, z.std()
    low_high = [e.interval(0.95) for e in estimates]
    coverage = sum(bool(lo <= exact <= hi) for lo, hi in low_high) / len(low_high)
    assert coverage > 0.88, coverage
