import math

import pytest
import torch

from pyro_mpt.masks import (
    Cumulative,
    Exhaustive,
    FixedRate,
    RateRange,
    Stratified,
    masks_of_sizes,
    size_for_rate,
)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_masks_of_sizes_has_exact_sizes_and_uniform_positions():
    sizes = torch.full((20000,), 3)
    masks = masks_of_sizes(sizes, 6, _generator())
    assert (masks.sum(-1) == 3).all()
    # Each position is masked with probability 3/6; binomial stderr ~ 0.0035.
    assert torch.allclose(masks.float().mean(0), torch.full((6,), 0.5), atol=0.015)


def test_cumulative_sizes_are_uniform_and_weights_are_d_over_m():
    draw = Cumulative().sample(8, batch_shape=(4,), num_masks=5000, generator=_generator())
    sizes = draw.masks.sum(-1)
    counts = torch.bincount(sizes.flatten(), minlength=9)[1:].float() / sizes.numel()
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.01)
    assert torch.allclose(draw.weights, 8 / sizes / 5000)


def test_masks_are_independent_per_row_unless_shared():
    independent = Cumulative().sample(10, batch_shape=(3,), num_masks=50, generator=_generator())
    assert not (independent.masks[:, 0] == independent.masks[:, 1]).all()
    shared = Cumulative(shared=True).sample(10, (3,), num_masks=50, generator=_generator())
    assert (shared.masks[:, 0] == shared.masks[:, 1]).all()
    assert (shared.weights[:, 0] == shared.weights[:, 2]).all()


def test_same_seed_same_masks():
    a = Cumulative().sample(7, (2,), 3, generator=_generator(5))
    b = Cumulative().sample(7, (2,), 3, generator=_generator(5))
    assert torch.equal(a.masks, b.masks)


def test_stratified_covers_every_size_with_weights_one_over_pm():
    draw = Stratified(masks_per_size=3).sample(4, (2,), num_masks=2)
    sizes = draw.masks.sum(-1)
    assert torch.equal(sizes[:, 0], torch.arange(1, 5).repeat_interleave(6))
    assert torch.allclose(draw.weights, 1.0 / (6 * sizes))
    assert torch.equal(draw.strata, sizes[:, 0] - 1)


def test_fixed_rate_size_and_weight():
    draw = FixedRate(0.15).sample(64, (3,), num_masks=2)
    assert (draw.masks.sum(-1) == 10).all()
    assert torch.allclose(draw.weights, torch.full((2, 3), 6.4 / 2))
    assert size_for_rate(0.001, 64) == 1 and size_for_rate(1.0, 64) == 64


def test_rate_range_sizes_stay_in_range():
    draw = RateRange(0.3, 0.6).sample(10, (5,), num_masks=400, generator=_generator())
    sizes = draw.masks.sum(-1)
    assert sizes.min() == 3 and sizes.max() == 6
    assert torch.allclose(draw.weights, 4 / sizes / 400)


def test_exhaustive_enumerates_every_nonempty_mask_once():
    draw = Exhaustive().sample(5, (2,))
    assert draw.exact and len(draw.masks) == 31
    codes = (draw.masks[:, 0].long() * (2 ** torch.arange(5))).sum(-1)
    assert sorted(codes.tolist()) == list(range(1, 32))
    # The weights sum, for each size m, to 1/m: S(x; m) is an average of (1/m) masked sums.
    sizes = draw.masks[:, 0].sum(-1)
    for m in range(1, 6):
        assert math.isclose(draw.weights[sizes == m, 0].sum().item(), 1 / m, rel_tol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FixedRate(0.0), "rate"),
        (lambda: FixedRate(1.5), "rate"),
        (lambda: FixedRate(float("nan")), "rate"),
        (lambda: RateRange(0.5, 0.2), "low"),
        (lambda: RateRange(-0.1, 0.5), "low"),
        (lambda: RateRange(0.1, 1.2), "high"),
        (lambda: Stratified(masks_per_size=0), "masks_per_size"),
        (lambda: Cumulative().sample(0), "event_size"),
        (lambda: Cumulative().sample(4, num_masks=0), "num_masks"),
        (lambda: Exhaustive().sample(21), "event_size=21"),
        (lambda: RateRange(0.01, 0.02).sample(10), "no mask size"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("scheme", [Cumulative(), Stratified(2), Exhaustive(), FixedRate(0.5),
                                    Cumulative(shared=True)])
def test_draws_follow_the_requested_device_and_dtype(scheme):
    """Masks, weights and strata were created on the CPU whatever the data's device."""
    g = torch.Generator().manual_seed(0)
    draw = scheme.sample(4, (3,), 2, generator=g, dtype=torch.float64, device="meta")
    assert {draw.masks.device.type, draw.weights.device.type, draw.strata.device.type} == {"meta"}
    assert draw.weights.dtype == torch.float64
    # The masks do not depend on where they are sent: a CPU generator draws them on the CPU.
    on_cpu = scheme.sample(4, (3,), 2, generator=torch.Generator().manual_seed(0))
    again = scheme.sample(4, (3,), 2, generator=torch.Generator().manual_seed(0), device="cpu")
    assert torch.equal(on_cpu.masks, again.masks)


def test_weights_are_never_integers():
    with pytest.raises(TypeError, match="floating dtype"):
        Cumulative().sample(4, dtype=torch.long)
