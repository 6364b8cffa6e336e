"""The GP objectives' closed-form gradient against autograd through explicit Schur complements."""

import pytest
import torch

from pyro_mpt.gp._masked_gaussian_score import _prefers_precision, masked_gaussian_log_prob_sums


def naive_sums(covariance, residual, masks):
    """Each masked conditional from an explicit Schur complement, ``torch.linalg.solve``."""
    sums = []
    for mask in masks:
        masked, visible = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
        total = residual.new_zeros(())
        for j in masked.tolist():
            cross = covariance[j, visible]
            weights = torch.linalg.solve(covariance[visible][:, visible], cross)
            mean = weights @ residual[visible]
            var = covariance[j, j] - weights @ cross
            total = total + torch.distributions.Normal(mean, var.sqrt()).log_prob(residual[j])
        sums.append(total)
    return torch.stack(sums)


# Every mask size 0..n (both routes, the marginal r = 0, an empty mask), some repeated; and many
# small masks, whose precision-route gradient is pulled back by two n x n products instead.
ALL_SIZES = list(range(11)) + [2, 8]
MANY_SMALL = [3] * 9 + [1, 9]


def random_problem(n, dtype, seed=0, sizes=ALL_SIZES):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    covariance = a @ a.mT / n + 0.3 * torch.eye(n, dtype=dtype)
    residual = torch.randn(n, generator=gen, dtype=dtype)
    masks = torch.stack([torch.randperm(n, generator=gen) < size for size in sizes])
    return covariance, residual, masks


def values_and_grads(fn, covariance, residual, masks, weights):
    covariance = covariance.clone().requires_grad_()
    residual = residual.clone().requires_grad_()
    sums = fn(covariance, residual, masks)
    (sums * weights).sum().backward()
    return sums.detach(), covariance.grad, residual.grad


def test_both_routes_are_exercised():
    n = 10
    routes = {_prefers_precision(m, n - m) for m in range(1, n)}
    assert routes == {True, False}


@pytest.mark.parametrize("sizes", [ALL_SIZES, MANY_SMALL], ids=["all-sizes", "many-small"])
@pytest.mark.parametrize("jitter", [0.0, 1e-2])
def test_values_and_gradients_match_autograd_through_schur_complements(jitter, sizes):
    covariance, residual, masks = random_problem(10, torch.float64, sizes=sizes)
    weights = torch.linspace(-1.0, 2.0, len(masks), dtype=torch.float64)
    eye = torch.eye(10, dtype=torch.float64)
    factor = torch.linalg.cholesky(covariance + jitter * eye)  # e.g. GPyTorch's jittered factor
    ours = values_and_grads(
        lambda c, r, m: masked_gaussian_log_prob_sums(c, factor, r, m),
        covariance,
        residual,
        masks,
        weights,
    )
    reference = values_and_grads(
        lambda c, r, m: naive_sums(c + jitter * eye, r, m), covariance, residual, masks, weights
    )
    for got, expected in zip(ours, reference, strict=True):
        # The naive gradient is not symmetric; only its symmetric part reaches a symmetric kernel.
        if got.dim() == 2:
            expected = 0.5 * (expected + expected.mT)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_batches_broadcast_and_score_each_element():
    covariance, residual, masks = random_problem(6, torch.float64, sizes=[0, 1, 3, 5, 6])
    other, _, other_masks = random_problem(6, torch.float64, seed=1, sizes=[2, 2, 4, 1, 6])
    batch_covariance = torch.stack([covariance, other])
    batch_masks = torch.stack([masks, other_masks], 1)  # (S, 2, n)
    factor = torch.linalg.cholesky(batch_covariance)
    sums = masked_gaussian_log_prob_sums(batch_covariance, factor, residual, batch_masks)
    assert sums.shape == (5, 2)
    torch.testing.assert_close(sums[:, 0], naive_sums(covariance, residual, masks))
    torch.testing.assert_close(sums[:, 1], naive_sums(other, residual, other_masks))


def test_ill_conditioned_float32_is_scored_through_the_factor_in_float64():
    # Near-noiseless: the float32 covariance and L L^T differ by rounding amplified by cond ~1e7.
    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    covariance = torch.exp(-0.5 * (x[:, None] - x) ** 2 / 0.3**2) + 1e-5 * torch.eye(12)
    covariance32 = covariance.float()
    factor32 = torch.linalg.cholesky(covariance32)
    residual = torch.sin(6 * x)
    masks = torch.stack([torch.arange(12) >= k for k in range(1, 12)])  # m = 11 .. 1
    ours = masked_gaussian_log_prob_sums(covariance32, factor32, residual.float(), masks)
    # The reference: the same factor's L L^T, in float64.
    reference = naive_sums(factor32.double() @ factor32.double().mT, residual, masks)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-4)
