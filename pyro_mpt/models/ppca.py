r"""Probabilistic PCA (Tipping & Bishop, 1999), collapsed or with explicit latents.

.. math::

    x_n = \mu + W z_n + \varepsilon_n, \quad z_n \sim \mathcal{N}(0, I_K),
    \quad \varepsilon_n \sim \mathcal{N}(0, \sigma^2 I_D)
    \quad\Longrightarrow\quad x_n \sim \mathcal{N}(\mu, WW^\top + \sigma^2 I_D).

In the collapsed form (the default) :math:`z_n` is integrated out, so the marginal is a
``LowRankMultivariateNormal`` and its masked conditionals are exact (:mod:`pyro_mpt.gaussian`). In
the latent form (``collapsed=False``) the model samples :math:`z_n` in the data plate and observes
``Normal(mu + W z_n, sigma).to_event(1)``; a guide (e.g. ``AutoNormal``) or masked pre-training's
importance sampling integrates it. The maximum-likelihood solution is in closed form
(``sklearn.decomposition.PCA(K).score(X)`` is its average log-likelihood). With ``prior_scale`` the
loading matrix gets a prior :math:`W_{dk} \sim \mathcal{N}(0, s^2)` and becomes a latent site
``"cov_factor"`` for a guide to cover.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from ._module import InstanceModule

__all__ = ["PPCA"]


class PPCA(InstanceModule):
    r"""PPCA with learned loading matrix :math:`W` and noise scale :math:`\sigma`.

    The same object serves every objective: ``forward`` is a Pyro model (rows observed at site
    ``"x"`` in a ``"data"`` plate, for ``Trace_ELBO`` or
    :class:`~pyro_mpt.infer.MaskedPretrainingELBO`), :meth:`marginal` is the distribution of a row
    for exact LML or :func:`~pyro_mpt.scoring.mpt_score`, and :meth:`log_marginal` is the exact
    per-row log marginal likelihood (in both forms).

    Args:
        data_dim: D.
        latent_dim: K, smaller than D (with K >= D, :math:`WW^\top` can absorb any noise level up
            to the smallest eigenvalue of the data covariance: the noise is not identifiable).
        noise_scale: initial :math:`\sigma`.
        init_scale: standard deviation of the random initial :math:`W` (positive: :math:`W = 0` is
            a stationary point of the likelihood, which gradient training would never leave).
        loc: fixed mean :math:`\mu`, shape ``(D,)`` (default zero: the maximum-likelihood mean of
            centred data).
        generator: ``torch.Generator`` that draws the initial :math:`W`; ``None`` draws from the
            global torch RNG (``torch.manual_seed``), as ``torch.randn`` does. Pass a seeded one
            for a result that does not depend on what else ran before.
        collapsed: observe the marginal (``LowRankMultivariateNormal``, default) or sample the
            latent ``"z"`` per row and observe ``Normal(mu + W z, sigma).to_event(1)``.
        prior_scale: if given, :math:`W` has the prior :math:`\mathcal{N}(0, s^2)` entry-wise and
            is a latent site ``"cov_factor"`` instead of a parameter; then pass ``cov_factor=`` to
            :meth:`marginal` and :meth:`log_marginal`.

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
        collapsed: bool = True,
        prior_scale: float | None = None,
    ):
        super().__init__()
        if not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if latent_dim >= data_dim:
            raise ValueError(
                f"latent_dim must be smaller than data_dim, got latent_dim={latent_dim} with "
                f"data_dim={data_dim} (with latent_dim >= data_dim the noise is not identifiable)"
            )
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        if loc is not None and (not isinstance(loc, torch.Tensor) or loc.shape != (data_dim,)):
            shape = tuple(loc.shape) if isinstance(loc, torch.Tensor) else type(loc).__name__
            raise ValueError(f"loc must be a tensor of shape ({data_dim},) (data_dim), got {shape}")
        if prior_scale is not None and not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive or None, got {prior_scale!r}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.collapsed, self.prior_scale = bool(collapsed), prior_scale
        self.register_buffer("loc", torch.zeros(data_dim) if loc is None else loc.clone())
        if prior_scale is None:
            self.cov_factor = PyroParam(
                init_scale * torch.randn(data_dim, latent_dim, generator=generator)
            )
        self.noise_scale = PyroParam(self._initial_noise(noise_scale), dist.constraints.positive)

    def _initial_noise(self, noise_scale: float) -> torch.Tensor:
        return torch.tensor(float(noise_scale))

    def _loading(self, cov_factor: torch.Tensor | None) -> torch.Tensor:
        if cov_factor is not None:
            return cov_factor
        if self.prior_scale is not None:
            raise ValueError(
                "this model has a prior on W (prior_scale is set): pass cov_factor= (e.g. the "
                "guide's median) to evaluate the marginal at a value of W"
            )
        return self.cov_factor

    def marginal(self, cov_factor: torch.Tensor | None = None) -> dist.LowRankMultivariateNormal:
        """The marginal distribution of one row, :math:`\\mathcal{N}(\\mu, WW^T + \\Psi)`.

        Example:
            >>> PPCA(4, 2).marginal().event_shape
            torch.Size([4])
        """
        cov_factor = self._loading(cov_factor)
        cov_diag = self.noise_scale.pow(2).expand(self.data_dim)
        return dist.LowRankMultivariateNormal(self.loc.to(cov_factor), cov_factor, cov_diag)

    def log_marginal(self, x: torch.Tensor, cov_factor: torch.Tensor | None = None) -> torch.Tensor:
        """Exact :math:`\\log p(x_n)` for every row of ``x`` (at ``cov_factor`` if given).

        Example:
            >>> PPCA(4, 2).log_marginal(torch.zeros(2, 4)).shape
            torch.Size([2])
        """
        return self.marginal(cov_factor).log_prob(x)

    def forward(
        self,
        x: torch.Tensor | None = None,
        num_data: int | None = None,
        subsample: torch.Tensor | None = None,
    ):
        """Pyro model: ``x`` observed row-wise in a ``"data"`` plate (``num_data`` rows in all).

        ``subsample``: the global indices of the rows of ``x`` (e.g. from a distributed
        sampler), passed to the plate; otherwise Pyro draws indices at random.

        Example:
            >>> PPCA(4, 2)(torch.zeros(3, 4)).shape
            torch.Size([3, 4])
        """
        size = num_data if num_data is not None else (len(x) if x is not None else 1)
        if self.prior_scale is None:
            cov_factor = self.cov_factor
        else:
            # A plain sample statement, not a PyroSample attribute: the site keeps the name
            # "cov_factor" whatever this instance's parameters are called.
            prior = dist.Normal(torch.zeros((), dtype=self.loc.dtype), float(self.prior_scale))
            cov_factor = pyro.sample(
                "cov_factor", prior.expand([self.data_dim, self.latent_dim]).to_event(2)
            )
        subsample_size = None if x is None or subsample is not None else len(x)
        with pyro.plate("data", size, subsample_size=subsample_size, subsample=subsample):
            if self.collapsed:
                return pyro.sample("x", self.marginal(cov_factor), obs=x)
            prior = dist.Normal(torch.zeros((), dtype=cov_factor.dtype), 1.0)
            z = pyro.sample("z", prior.expand([self.latent_dim]).to_event(1))
            mean = self.loc.to(cov_factor) + z @ cov_factor.mT
            return pyro.sample("x", dist.Normal(mean, self.noise_scale).to_event(1), obs=x)
