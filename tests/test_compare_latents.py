"""compare_models on Pyro models with local latents and with masked observations.

Checked against independent computations: the PPCA evidence and its masked conditionals by dense
solves on W W^T + s^2 I, the Bernoulli latent model's evidence by grid quadrature, the same
model scored on the kept rows only, and the unpaired standard error.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt.evaluate import PyroModel, compare_models, format_table
from pyro_mpt.gp.conditional_marginal_log_likelihood import held_out_size, stratified_clml_masks
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Exhaustive, Stratified
from pyro_mpt.models import PPCA, BernoulliLatentModel

DTYPE = torch.float64
D, N = 6, 40


def ppca_data():
    gen = torch.Generator().manual_seed(0)
    loading = torch.randn(D, 2, generator=gen, dtype=DTYPE)
    return torch.randn(N, 2, generator=gen, dtype=DTYPE) @ loading.T + 0.5 * torch.randn(
        N, D, generator=gen, dtype=DTYPE
    )


def ppca(x, latent_dim, collapsed):
    """PPCA at its closed-form maximum-likelihood parameters (Tipping & Bishop, 1999)."""
    model = PPCA(D, latent_dim, collapsed=collapsed).double()
    centred = x - x.mean(0)
    _, values, vectors = torch.linalg.svd(centred / math.sqrt(len(x)), full_matrices=False)
    noise = values[latent_dim:].pow(2).mean()
    with torch.no_grad():
        model.loc.copy_(x.mean(0))
        model.cov_factor.copy_(vectors[:latent_dim].T * (values[:latent_dim] ** 2 - noise).sqrt())
        model.noise_scale = noise.sqrt()
    return model


def dense(model):
    """N(loc, W W^T + s^2 I), formed densely from the parameters."""
    loading, noise = model.cov_factor.detach(), model.noise_scale.detach()
    cov = loading @ loading.T + noise**2 * torch.eye(D, dtype=DTYPE)
    return model.loc.detach(), cov


def naive_clml(loc, cov, x, draw):
    """sum_s w_s sum_rows sum_{j in M} log p(x_j | x_R), each conditional by a direct solve."""
    total = torch.zeros((), dtype=DTYPE)
    masks = draw.masks.reshape(len(draw.masks), *x.shape)
    for mask, weight in zip(masks, draw.weights, strict=True):
        for row, hidden in zip(x, mask, strict=True):
            rest = (~hidden).nonzero().squeeze(-1)
            for j in hidden.nonzero().squeeze(-1):
                gain = torch.linalg.solve(cov[rest][:, rest], cov[rest, j])
                mean = loc[j] + gain @ (row[rest] - loc[rest])
                var = cov[j, j] - gain @ cov[rest, j]
                total += weight * torch.distributions.Normal(mean, var.sqrt()).log_prob(row[j])
    return total.item()


@pytest.fixture(scope="module")
def ppca_rows():
    x = ppca_data()
    fitted = {k: (ppca(x, k, False), ppca(x, k, True)) for k in (1, 2, 3)}
    # A plain function hides PPCA.log_marginal: the LML must come from the MPT estimate.
    latent = {f"K={k}": PyroModel(lambda x, m=m: m(x), None, (x,)) for k, (m, _) in fitted.items()}
    collapsed = {f"K={k}": PyroModel(m, None, (x,)) for k, (_, m) in fitted.items()}
    generator = torch.Generator().manual_seed(0)
    return x, fitted, compare_models(latent, generator=generator), compare_models(collapsed)


def test_site_estimates_are_the_loss_terms():
    x = ppca_data()
    model = ppca(x, 2, collapsed=True)
    # Exhaustive masks on the exact Gaussian conditionals: log p(x_n) per row, exactly.
    draw, sums = MaskedPretrainingELBO(Exhaustive()).site_estimates(model, lambda x: None, x)["x"]
    loc, cov = dense(model)
    exact = torch.distributions.MultivariateNormal(loc, cov).log_prob(x)
    assert torch.allclose(draw.estimate(sums, summed=True).mean, exact, atol=1e-10)
    # Local latents: the weighted sums are the loss of the same keyed step.
    latent = ppca(x, 2, collapsed=False)
    elbo = MaskedPretrainingELBO(Stratified(), num_masks=2, seed=3)
    draw, sums = elbo.site_estimates(latent, lambda x: None, x)["x"]
    loss = MaskedPretrainingELBO(Stratified(), num_masks=2, seed=3).loss(latent, lambda x: None, x)
    assert draw.weighted_sums(sums, summed=True).sum().item() == pytest.approx(-loss, abs=1e-8)


def test_local_latents_lml_is_the_mpt_estimate_of_the_exact_evidence(ppca_rows):
    x, fitted, rows, _ = ppca_rows
    exact = {}
    for row in rows:
        loc, cov = dense(fitted[int(row["model"][2:])][0])
        exact[row["model"]] = torch.distributions.MultivariateNormal(loc, cov).log_prob(x).sum()
        assert row["lml_method"] == "mpt" and row["mpt_method"] == "snis"
        assert row["exact_lml"] is None and row["lml"] == row["mpt"]
        # Monte-Carlo error over masks plus what is left of the importance-sampling bias
        # (measured 0.5-2.9 nats in all against an s.e. of 3.1-3.7).
        assert abs(row["lml"] - exact[row["model"]].item()) < 4 * row["lml_se"] + 1.0
        # Rows independent given the parameters: leave-one-row-out is the per-row evidence.
        assert row["loo_method"] == "mpt" and row["elpd_loo"] == pytest.approx(row["lml"])
    assert sorted(exact, key=lambda k: -exact[k]) == sorted(
        (r["model"] for r in rows), key=lambda k: -next(r["lml"] for r in rows if r["model"] == k)
    )


def test_local_latents_clml_matches_dense_conditionals_on_the_common_masks(ppca_rows):
    x, fitted, latent_rows, collapsed_rows = ppca_rows
    n = x.numel()
    draw = stratified_clml_masks(
        held_out_size(0.9, n), n, (), 4, torch.Generator().manual_seed(0), DTYPE
    )
    for latent, collapsed in zip(latent_rows, collapsed_rows, strict=True):
        expected = naive_clml(*dense(fitted[int(latent["model"][2:])][1]), x, draw)
        # Exact conditionals on the same masks: the layout of the masks on the rows.
        assert collapsed["clml_method"] == "exact"
        assert collapsed["clml"] == pytest.approx(expected, abs=1e-8)
        # SNIS conditionals (Laplace proposals): measured within 0.02-0.1 nats.
        assert latent["clml_method"] == "snis"
        assert latent["clml"] == pytest.approx(expected, abs=0.25)


def test_local_latents_paired_standard_errors_are_smaller(ppca_rows):
    _, _, rows, _ = ppca_rows
    by_name = {row["model"]: row for row in rows}
    # Keyed masks and particles are common to every model. Measured: K=2 against the best
    # (K=3), MPT 0.64 paired vs 4.5 unpaired, CLML 0.21 vs 0.99.
    for key in ("mpt", "clml", "lml"):
        assert by_name["K=2"][key + "_dse"] < 0.5 * by_name["K=2"][key + "_dse_unpaired"], key
        assert by_name["K=1"][key + "_dse"] < by_name["K=1"][key + "_dse_unpaired"], key
    table = format_table(rows)
    assert "(MPT)" in table and "(SNIS)" in table


def test_non_conjugate_local_latents_against_quadrature():
    """The Bernoulli latent model has no closed form: its evidence by grid quadrature."""
    gen = torch.Generator().manual_seed(1)
    size = 8
    truth = BernoulliLatentModel(size, latent_dim=2, init_scale=2.0, generator=gen).double()
    with torch.no_grad():
        z = torch.randn(30, 2, generator=gen, dtype=DTYPE)
        x = torch.bernoulli(torch.sigmoid(truth.logits(z)), generator=gen)
    models = {
        "truth": truth,
        "one latent": BernoulliLatentModel(
            size, latent_dim=1, init_scale=2.0, generator=gen
        ).double(),
        "noise": BernoulliLatentModel(size, latent_dim=1, init_scale=0.01, generator=gen).double(),
    }
    rows = compare_models(
        {name: PyroModel(lambda x, m=m: m(x), None, (x,)) for name, m in models.items()},
        generator=torch.Generator().manual_seed(0),
    )
    quadrature = {name: m.log_marginal(x, grid_size=201).sum().item() for name, m in models.items()}
    for row in rows:
        assert row["lml_method"] == "mpt"
        assert abs(row["lml"] - quadrature[row["model"]]) < 4 * row["lml_se"] + 0.5, row
    assert [r["model"] for r in sorted(rows, key=lambda r: -r["lml"])] == sorted(
        quadrature, key=lambda name: -quadrature[name]
    )
    # With log_marginal in reach, the LML column is exact.
    exact = compare_models({"truth": PyroModel(truth, None, (x,))})[0]
    assert exact["lml_method"] == "exact"
    assert exact["lml"] == pytest.approx(truth.log_marginal(x).sum().item(), abs=1e-9)


# --- masked observations -------------------------------------------------------------------


def masked(model, keep):
    """``model`` with the rows where ``keep`` is False hidden by poutine.mask."""

    def masked_model(x):
        with poutine.mask(mask=keep):
            return model(x)

    return masked_model


def test_masked_rows_are_not_data():
    x = ppca_data()
    keep = torch.ones(N, dtype=torch.bool)
    keep[::3] = False
    holes = x.clone()
    holes[~keep] = float("nan")  # masked-out rows may hold NaN
    collapsed = ppca(x, 2, collapsed=True)
    generator = torch.Generator().manual_seed(0)
    row = compare_models(
        {"masked": PyroModel(masked(collapsed, keep), None, (holes,))}, generator=generator
    )[0]
    subset = compare_models({"subset": PyroModel(collapsed, None, (x[keep],))})[0]
    loc, cov = dense(collapsed)
    exact = torch.distributions.MultivariateNormal(loc, cov).log_prob(x[keep]).sum().item()
    assert row["n"] == keep.sum() * D
    for key in ("lml", "elbo", "elpd_loo"):
        assert row[key] == pytest.approx(exact, abs=1e-9) and subset[key] == row[key], key
    # The same CLML masks over the kept values: the same estimate; the MPT masks are keyed by
    # row index, so they differ.
    assert row["clml"] == pytest.approx(subset["clml"], abs=1e-10)
    assert abs(row["mpt"] - exact) < 4 * row["mpt_se"]
    # Local latents: the MPT estimate of the evidence of the kept rows.
    latent = ppca(x, 2, collapsed=False)
    row = compare_models({"latent": PyroModel(masked(lambda x: latent(x), keep), None, (holes,))})[
        0
    ]
    assert row["lml_method"] == "mpt" and abs(row["lml"] - exact) < 4 * row["lml_se"] + 1.0
    with pytest.raises(ValueError, match="every row"):
        compare_models(
            {"none": PyroModel(masked(collapsed, torch.zeros(N, dtype=torch.bool)), None, (x,))}
        )


def test_scaled_or_two_observed_sites_are_refused():
    x = ppca_data()
    model = ppca(x, 1, collapsed=True)

    def scaled(x):
        with poutine.scale(scale=2.0):
            return model(x)

    def two(x):
        pyro.sample("a", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))
        return model(x)

    with pytest.raises(ValueError, match="scaled"):
        compare_models({"scaled": PyroModel(scaled, None, (x,))})
    with pytest.raises(ValueError, match="exactly one observed site"):
        compare_models({"two": PyroModel(two, None, (x,))})
