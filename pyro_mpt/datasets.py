"""Data sets available offline: real data shipped with scikit-learn, and the paper's synthetic data.

Nothing here downloads anything. Real data sets are standardised column-wise (constant columns,
such as the blank corner pixels of ``digits``, are centred and left with unit scale).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import datasets as sk_datasets

__all__ = [
    "standardize",
    "load_digits",
    "load_binarized_digits",
    "load_diabetes",
    "load_breast_cancer",
    "synthetic_ppca",
    "synthetic_ppca_marginal",
]


def standardize(array: np.ndarray) -> np.ndarray:
    """Centre each column and scale it to unit variance (constant columns are only centred).

    Example:
        >>> standardize(np.array([[1.0, 2.0], [3.0, 2.0]])).tolist()
        [[-1.0, 0.0], [1.0, 0.0]]
    """
    array = np.asarray(array, dtype=np.float64)
    scale = array.std(axis=0)
    return (array - array.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def load_digits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scikit-learn's 8x8 digit images, 1797 x 64, standardised.

    Example:
        >>> load_digits().shape
        torch.Size([1797, 64])
    """
    return torch.as_tensor(standardize(sk_datasets.load_digits().data), dtype=dtype)


def load_binarized_digits(
    threshold: float = 8.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The digits binarised: pixel intensity (0..16) above ``threshold`` is 1, 1797 x 64.

    Example:
        >>> set(load_binarized_digits().unique().tolist())
        {0.0, 1.0}
    """
    return torch.as_tensor(sk_datasets.load_digits().data > threshold, dtype=dtype)


def load_diabetes(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's diabetes regression data (442 x 10 inputs, 442 targets), standardised.

    Example:
        >>> x, y = load_diabetes()
        >>> x.shape, y.shape
        (torch.Size([442, 10]), torch.Size([442]))
    """
    data = sk_datasets.load_diabetes()
    inputs = torch.as_tensor(standardize(data.data), dtype=dtype)
    targets = torch.as_tensor(standardize(data.target[:, None])[:, 0], dtype=dtype)
    return inputs, targets


def load_breast_cancer(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scikit-learn's breast-cancer features (569 x 30), standardised.

    Example:
        >>> load_breast_cancer().shape
        torch.Size([569, 30])
    """
    return torch.as_tensor(standardize(sk_datasets.load_breast_cancer().data), dtype=dtype)


def synthetic_ppca(
    num_data: int,
    data_dim: int,
    latent_dim: int,
    noise_precision: float = 5.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The paper's synthetic PPCA data: :math:`x_n = W z_n + \varepsilon_n`.

    :math:`W_{dk} \sim \mathcal{N}(0, 1)`, :math:`z_n \sim \mathcal{N}(0, I_K)` and
    :math:`\varepsilon_n \sim \mathcal{N}(0, \tau^{-1} I_D)` drawn independently for every
    dimension (the authors' script reused one noise value across dimensions).

    Returns:
        ``(x, W)`` of shapes ``(num_data, data_dim)`` and ``(data_dim, latent_dim)``.

    Example:
        >>> x, W = synthetic_ppca(100, 5, 2, generator=torch.Generator().manual_seed(0))
        >>> x.shape, W.shape
        (torch.Size([100, 5]), torch.Size([5, 2]))
    """
    if noise_precision <= 0:
        raise ValueError(f"noise_precision must be positive, got {noise_precision!r}")
    cov_factor = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
    latent = torch.randn(num_data, latent_dim, generator=generator, dtype=dtype)
    noise = torch.randn(num_data, data_dim, generator=generator, dtype=dtype)
    return latent @ cov_factor.T + noise / noise_precision**0.5, cov_factor


def synthetic_ppca_marginal(
    cov_factor: torch.Tensor, noise_precision: float = 5.0
) -> torch.distributions.LowRankMultivariateNormal:
    r"""The true marginal of :func:`synthetic_ppca` data: :math:`\mathcal{N}(0, WW^\top + I/\tau)`.

    Example:
        >>> x, W = synthetic_ppca(100, 5, 2, generator=torch.Generator().manual_seed(0))
        >>> synthetic_ppca_marginal(W).log_prob(x).shape
        torch.Size([100])
    """
    size = cov_factor.shape[-2]
    return torch.distributions.LowRankMultivariateNormal(
        cov_factor.new_zeros(size), cov_factor, cov_factor.new_full((size,), 1.0 / noise_precision)
    )
