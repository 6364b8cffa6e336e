"""Randomness keyed by seed, step and global row index (issue #13): what makes a run on several
processes draw, row by row, what one process draws over the union of their batches."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import (
    Cumulative,
    Exhaustive,
    FixedRate,
    RateRange,
    Stratified,
    fold_in,
    keyed_normal,
    keyed_uniform,
)
from pyro_mpt.models import PPCA, BernoulliLatentModel
from pyro_mpt.models.bernoulli_latent_guide import BernoulliLatentGuide
from pyro_mpt.scoring import mpt_score

MASK64 = 2**64 - 1


def splitmix64(state: int, count: int) -> list[int]:
    """Vigna's reference splitmix64.c, in Python integers."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def mix(z: int) -> int:
    return splitmix64((z - 0x9E3779B97F4A7C15) & MASK64, 1)[0]


def test_keyed_uniforms_are_the_splitmix64_reference_stream():
    # The first outputs for seed 0 are the published test values of splitmix64.
    assert [hex(v) for v in splitmix64(0, 2)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]
    for key in (0, 1, 12345, 2**63 + 7, MASK64):
        expected = [((v >> 11) + 0.5) * 2.0**-53 for v in splitmix64(key, 5)]
        assert keyed_uniform(key, 5).tolist() == expected
        offset = keyed_uniform(key, 2, offset=3)
        assert offset.tolist() == expected[3:5]


def test_fold_in_matches_its_definition_and_separates_inputs():
    for key, data in [(0, 0), (5, 7), (2**64 - 3, 2**40 + 1)]:
        expected = mix(key ^ mix((data + 0x9E3779B97F4A7C15) & MASK64))
        assert fold_in(key, data).item() & MASK64 == expected
    keys = fold_in(fold_in(3, 11), torch.arange(10_000))
    assert len(keys.unique()) == 10_000
    with pytest.raises(TypeError, match="integer"):
        fold_in(0, torch.tensor([0.5]))


def test_keyed_normals_are_standard_normal():
    z = keyed_normal(fold_in(7, torch.arange(50_000)), 2)
    assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1) < 0.02
    assert abs(torch.corrcoef(z.T)[0, 1].item()) < 0.02  # the two entries of a key: independent


@pytest.mark.parametrize(
    "scheme", [Cumulative(), Stratified(2), FixedRate(0.3), RateRange(0.2, 0.8)], ids=repr
)
def test_a_rows_masks_depend_on_its_key_alone(scheme):
    keys = fold_in(fold_in(0, 4), torch.tensor([11, 3, 8, 5, 0, 9]))
    union = scheme.sample(10, (6,), num_masks=3, keys=keys)
    part = scheme.sample(10, (2,), num_masks=3, keys=keys[[4, 1]])  # other rows, other order
    assert torch.equal(union.masks[:, [4, 1]], part.masks)
    assert torch.equal(union.weights[:, [4, 1]], part.weights)
    again = scheme.sample(10, (6,), num_masks=3, keys=keys)
    assert torch.equal(union.masks, again.masks)
    other_step = scheme.sample(10, (6,), num_masks=3, keys=fold_in(fold_in(0, 5), keys * 0))
    assert not torch.equal(union.masks, other_step.masks)


def test_keyed_cumulative_masks_have_the_schemes_distribution():
    draw = Cumulative().sample(8, (4,), num_masks=5000, keys=fold_in(1, torch.arange(4)))
    sizes = draw.masks.sum(-1)
    counts = torch.bincount(sizes.flatten(), minlength=9)[1:].float() / sizes.numel()
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.01)
    assert torch.allclose(draw.weights, 8 / sizes / 5000)
    # Given the size, a uniform subset: every position equally often.
    assert torch.allclose(draw.masks.float().mean((0, 1)), torch.full((8,), 4.5 / 8), atol=0.01)


def test_keyed_stratified_and_fixed_rate_draws_are_uniform_subsets():
    draw = Stratified(1).sample(6, (3000,), keys=fold_in(2, torch.arange(3000)))
    assert torch.equal(draw.masks.sum(-1)[:, 0], torch.arange(1, 7))
    # size m: each position masked with probability m / 6
    rates = draw.masks.float().mean(1)
    assert torch.allclose(rates, (torch.arange(1, 7) / 6).unsqueeze(-1).expand(6, 6), atol=0.03)
    fixed = FixedRate(0.5).sample(6, (3000,), keys=fold_in(3, torch.arange(3000)))
    assert torch.allclose(fixed.masks.float().mean((0, 1)), torch.full((6,), 0.5), atol=0.03)


def test_keys_have_one_entry_per_row_or_one_for_shared_masks():
    with pytest.raises(ValueError, match="one key per row"):
        Cumulative().sample(5, (3,), keys=fold_in(0, torch.arange(2)))
    with pytest.raises(ValueError, match="shared masks"):
        Cumulative(shared=True).sample(5, (3,), keys=fold_in(0, torch.arange(3)))
    shared = Cumulative(shared=True).sample(5, (3,), 4, keys=fold_in(0, 1))
    assert (shared.masks == shared.masks[:, :1]).all()
    with pytest.raises(ValueError, match="not both"):
        Cumulative().sample(5, (3,), generator=torch.Generator(), keys=fold_in(0, torch.arange(3)))
    assert Exhaustive().sample(3, (2,), keys=fold_in(0, 1)).exact  # shared: one key


def test_mpt_score_with_keys_scores_each_row_alike_in_any_batch():
    d = dist.LowRankMultivariateNormal(torch.zeros(5), torch.ones(5, 2), torch.ones(5))
    x, keys = torch.randn(9, 5), fold_in(0, torch.arange(9))
    whole = mpt_score(d, x, num_masks=3, keys=keys)
    part = mpt_score(d, x[4:], num_masks=3, keys=keys[4:])
    assert torch.equal(whole.mean[4:], part.mean)


# ------------------------------------------------------------------ MaskedPretrainingELBO(seed=)
N = 40


def _no_guide(*args, **kwargs):
    pass


def _split_and_union(model, guide, x, **options):
    """Loss and gradients on 8 rows, and on the same rows split in two batches of 4."""
    rows = torch.tensor([33, 2, 17, 8, 25, 39, 0, 11])
    parameters = list(model.parameters())
    if isinstance(guide, torch.nn.Module):
        parameters += list(guide.parameters())

    def run(part):
        elbo = MaskedPretrainingELBO(seed=3, **options)
        elbo.step = 5  # as if resumed at step 5
        for p in parameters:
            p.grad = None
        loss = elbo.differentiable_loss(model, guide, x[rows[part]], num_data=N,
                                        subsample=rows[part])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in parameters]

    union, union_grads = run(slice(0, 8))
    first, first_grads = run(slice(0, 4))
    second, second_grads = run(slice(4, 8))
    # Plate scales N/8 and N/4: the union is the mean of the halves, as DDP averages gradients.
    assert (first + second) / 2 == pytest.approx(union, rel=1e-6)
    for a, b, c in zip(first_grads, second_grads, union_grads, strict=True):
        assert torch.allclose((a + b) / 2, c, rtol=1e-4, atol=1e-4 * c.abs().max().item())
    return union


@pytest.fixture
def module_local_params():
    with pyro.settings.context(module_local_params=True):
        yield


def test_seeded_elbo_collapsed_ppca_rows_are_drawn_alike_in_any_batch(module_local_params):
    model = PPCA(6, 2, generator=torch.Generator().manual_seed(0))
    _split_and_union(model, _no_guide, torch.randn(N, 6))


@pytest.mark.parametrize("proposal", ["prior", "laplace"])
def test_seeded_elbo_latent_ppca_particles_are_keyed(module_local_params, proposal):
    """Prior particles, and Laplace proposals (each row's found from its own data alone), are
    drawn alike for a row whichever batch it is in; with seed, K does not grow."""
    model = PPCA(6, 2, generator=torch.Generator().manual_seed(0), collapsed=False)
    _split_and_union(model, _no_guide, torch.randn(N, 6), num_importance_samples=32,
                     proposal=proposal)


def test_seeded_elbo_guide_proposal_particles_are_keyed(module_local_params):
    model = BernoulliLatentModel(6, generator=torch.Generator().manual_seed(0))
    x = (torch.rand(N, 6, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    _split_and_union(model, BernoulliLatentGuide(6), x, proposal="guide",
                     num_importance_samples=16)


def test_seeded_elbo_steps_and_particles_draw_fresh_masks():
    x = torch.randn(10, 4)
    cov = torch.eye(4) + 0.5

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(4), cov), obs=x)

    elbo = MaskedPretrainingELBO(seed=0)
    first, second = elbo.loss(model, _no_guide, x), elbo.loss(model, _no_guide, x)
    assert first != second and elbo.step == 2
    elbo.step = 0  # a resumed run repeats its steps
    assert elbo.loss(model, _no_guide, x) == first
    two = MaskedPretrainingELBO(seed=0, num_particles=2).loss(model, _no_guide, x)
    assert two != first  # the second particle draws other masks


def test_seeded_elbo_warns_when_rows_have_no_global_index():
    def model(x):
        with pyro.plate("data", 100, subsample_size=len(x)):
            pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1), obs=x)

    elbo = MaskedPretrainingELBO(masks=FixedRate(0.5), seed=0)
    with pytest.warns(UserWarning, match="subsample=indices"):
        elbo.loss(model, _no_guide, torch.randn(5, 3))


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed"):
        MaskedPretrainingELBO(seed=1.5)
