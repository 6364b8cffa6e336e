r"""Probabilistic PCA (Tipping & Bishop, 1999) in collapsed form.

.. math::

    x_n = \mu + W z_n + \varepsilon_n, \quad z_n \sim \mathcal{N}(0, I_K),
    \quad \varepsilon_n \sim \mathcal{N}(0, \sigma^2 I_D)
    \quad\Longrightarrow\quad x_n \sim \mathcal{N}(\mu, WW^\top + \sigma^2 I_D).

The latent :math:`z_n` is integrated out, so the marginal is a ``LowRankMultivariateNormal`` and
its masked conditionals are exact (:mod:`pyro_mpt.gaussian`). The maximum-likelihood solution is in
closed form (``sklearn.decomposition.PCA(K).score(X)`` is its average log-likelihood).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

__all__ = ["PPCA"]


class PPCA(PyroModule):
    r"""Collapsed PPCA with learned loading matrix :math:`W` and noise scale :math:`\sigma`.

    The same object serves every objective: ``forward`` is a Pyro model (one observed
    ``LowRankMultivariateNormal`` site ``"x"`` per row, for ``Trace_ELBO`` or
    :class:`~pyro_mpt.infer.MaskedPretrainingELBO`), :meth:`marginal` is the distribution for
    exact LML or :func:`~pyro_mpt.scoring.mpt_score`, and :meth:`log_marginal` is the exact
    per-row log marginal likelihood.

    Args:
        data_dim: D.
        latent_dim: K.
        noise_scale: initial :math:`\sigma`.
        init_scale: standard deviation of the random initial :math:`W`.
        loc: fixed mean :math:`\mu` (default zero: the maximum-likelihood mean of centred data).
        generator: ``torch.Generator`` for the initial :math:`W`.

    Example:
        >>> model = PPCA(data_dim=5, latent_dim=2, generator=torch.Generator().manual_seed(0))
        >>> model.log_marginal(torch.zeros(3, 5)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        noise_scale: float = 1.0,
        init_scale: float = 0.1,
        loc: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not 1 <= latent_dim:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.register_buffer("loc", torch.zeros(data_dim) if loc is None else loc.clone())
        self.cov_factor = PyroParam(
            init_scale * torch.randn(data_dim, latent_dim, generator=generator)
        )
        self.noise_scale = PyroParam(torch.tensor(float(noise_scale)), dist.constraints.positive)

    def marginal(self) -> dist.LowRankMultivariateNormal:
        """The marginal distribution of one row, :math:`\\mathcal{N}(\\mu, WW^T + \\sigma^2 I)`."""
        cov_factor = self.cov_factor
        cov_diag = self.noise_scale.pow(2).expand(self.data_dim)
        return dist.LowRankMultivariateNormal(self.loc.to(cov_factor), cov_factor, cov_diag)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact :math:`\\log p(x_n)` for every row of ``x``."""
        return self.marginal().log_prob(x)

    def forward(self, x: torch.Tensor | None = None, num_data: int | None = None):
        """Pyro model: ``x`` observed row-wise in a ``"data"`` plate (``num_data`` rows in all)."""
        size = num_data if num_data is not None else (len(x) if x is not None else 1)
        with pyro.plate("data", size, subsample_size=None if x is None else len(x)):
            return pyro.sample("x", self.marginal(), obs=x)
