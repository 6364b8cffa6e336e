"""Evaluation table: every column against an independent computation."""

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from pyro_mpt.evaluate import (
    compare_models,
    evaluate_model,
    format_table,
    pseudo_log_likelihood,
    rate_key,
)
from pyro_mpt.masks import Exhaustive
from pyro_mpt.models import PPCA, BernoulliLatentModel


def brute_force_loo(covariance, x):
    """sum_j log p(x_j | x_-j) by conditioning each dimension on the others with a linear solve."""
    size = covariance.shape[-1]
    total = torch.zeros(len(x), dtype=x.dtype)
    for j in range(size):
        rest = [i for i in range(size) if i != j]
        cross = covariance[j, rest]
        solved = torch.linalg.solve(covariance[rest][:, rest], cross)
        loc = x[:, rest] @ solved
        var = covariance[j, j] - cross @ solved
        total += Normal(loc, var.sqrt()).log_prob(x[:, j])
    return total


@pytest.fixture
def gaussian():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    covariance = factor @ factor.T + 0.5 * torch.eye(5, dtype=torch.float64)
    dist = MultivariateNormal(torch.zeros(5, dtype=torch.float64), covariance)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64) @ factor.T
    return dist, covariance, x


def test_pseudo_log_likelihood_matches_brute_force(gaussian):
    dist, covariance, x = gaussian
    torch.testing.assert_close(pseudo_log_likelihood(dist, x), brute_force_loo(covariance, x))


def test_evaluate_model_columns(gaussian):
    dist, covariance, x = gaussian
    row = evaluate_model(dist, x, rates=(0.2, 1.0), masks=Exhaustive(), num_masks=1,
                         generator=torch.Generator().manual_seed(1))
    exact = dist.log_prob(x).mean().item()
    assert row["exact_lml"] == pytest.approx(exact, abs=1e-12)
    assert row["mpt"] == pytest.approx(exact, abs=1e-10)  # exhaustive masks: exact identity
    assert row["mpt_se"] == 0.0
    loo = brute_force_loo(covariance, x).mean().item()
    assert row["pseudo_ll"] == pytest.approx(loo, abs=1e-10)
    # Rate 1.0 masks everything: D * S(x; D) is the sum of the prior marginals, with no error.
    marginals = Normal(0.0, covariance.diagonal().sqrt()).log_prob(x).sum(-1).mean().item()
    assert row[rate_key(1.0)] == pytest.approx(marginals, abs=1e-10)
    assert row[rate_key(1.0) + "_se"] == pytest.approx(0.0, abs=1e-10)
    # Rate 0.2 of D = 5 is m = 1: an unbiased estimate of the pseudo-likelihood.
    assert row[rate_key(0.2) + "_m"] == 1
    assert abs(row[rate_key(0.2)] - loo) < 4 * row[rate_key(0.2) + "_se"]
    assert (row["N"], row["D"]) == (30, 5)


def test_default_mpt_estimate_is_within_its_standard_error():
    model = PPCA(8, 2, generator=torch.Generator().manual_seed(0)).double()
    x = model.marginal().sample((200,))
    row = evaluate_model(model, x, generator=torch.Generator().manual_seed(0))
    assert row["mpt_se"] > 0
    assert abs(row["mpt"] - row["exact_lml"]) < 4 * row["mpt_se"]


def test_compare_models_and_markdown(gaussian):
    dist, covariance, x = gaussian
    wrong = MultivariateNormal(dist.loc, torch.eye(5, dtype=torch.float64))
    rows = compare_models({"true": dist, "identity": wrong}, x, rates=(0.4,),
                          generator=torch.Generator().manual_seed(0))
    assert [row["model"] for row in rows] == ["true", "identity"]
    assert rows[0]["exact_lml"] > rows[1]["exact_lml"]
    table = format_table(rows, digits=2)
    lines = table.splitlines()
    assert lines[0] == "| model | exact LML | cumulative MPT | m = 1 (pseudo-LL) | fixed 40% |"
    first = rows[0]
    assert lines[2] == (
        f"| true | {first['exact_lml']:.2f} | {first['mpt']:.2f} ± {first['mpt_se']:.2f} | "
        f"{first['pseudo_ll']:.2f} | {first['rate_40%']:.2f} ± {first['rate_40%_se']:.2f} |"
    )


def test_bad_input(gaussian):
    dist, _, x = gaussian
    with pytest.raises(ValueError, match="data must be"):
        evaluate_model(dist, x[:, :3])
    with pytest.raises(ValueError, match="rates"):
        evaluate_model(dist, x, rates=(1.5,))
    with pytest.raises(TypeError, match="model must be"):
        evaluate_model("not a model", x)
    with pytest.raises(ValueError, match="models must be"):
        compare_models({}, x)
    with pytest.raises(ValueError, match="rows"):
        format_table([])


def test_non_gaussian_model_by_its_own_conditionals():
    model = BernoulliLatentModel(4, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        model.weight = 2 * model.weight + 1.0
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    row = evaluate_model(model, x, rates=(0.25,), masks=Exhaustive(), num_masks=1)
    exact = model.log_marginal(x).mean().item()
    assert row["exact_lml"] == pytest.approx(exact, abs=1e-12)
    assert row["mpt"] == pytest.approx(exact, abs=1e-8)
    # Independent leave-one-out: p(x_j | x_-j) = p(x) / sum over both values of x_j.
    loo = torch.zeros(len(x), dtype=torch.float64)
    for j in range(4):
        flipped = x.clone()
        flipped[:, j] = 1 - flipped[:, j]
        both = torch.stack([model.log_marginal(x), model.log_marginal(flipped)])
        loo += model.log_marginal(x) - both.logsumexp(0)
    assert row["pseudo_ll"] == pytest.approx(loo.mean().item(), abs=1e-8)
    torch.testing.assert_close(pseudo_log_likelihood(model, x), loo, rtol=0, atol=1e-8)
