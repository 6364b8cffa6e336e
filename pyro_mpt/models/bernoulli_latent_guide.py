r"""Amortised linear guide for :class:`~pyro_mpt.models.BernoulliLatentModel`.

.. math::

    q(z_n \mid x_n) = \mathcal{N}\big(A^\top e_n + a,\
        \mathrm{diag}(\mathrm{softplus}(B^\top e_n + c))^2\big),
    \qquad e_{nj} = (2 x_{nj} - 1)\,[j \text{ visible}],

the paper's encoder (linear in the pixels). Hidden pixels encode as 0, half-way between the codes
of 0 (-1) and 1 (+1), so the same guide serves as a proposal :math:`q(z \mid x_R)` for masked
prediction: it reads the observation through :func:`~pyro_mpt.infer.observed_view`, which hides
the masked pixels when :class:`~pyro_mpt.infer.MaskedPretrainingELBO` runs with
``proposal="guide"``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroParam

from ..infer.observed_view import observed_view
from ._module import InstanceModule

__all__ = ["BernoulliLatentGuide"]


class BernoulliLatentGuide(InstanceModule):
    """Amortised linear Gaussian guide for the latent ``"z"`` of each row.

    Args:
        data_dim: D.
        latent_dim: L.
        site: name of the observed site the guide reads (default ``"x"``).

    Example:
        >>> guide = BernoulliLatentGuide(data_dim=6)
        >>> trace = pyro.poutine.trace(guide).get_trace(torch.zeros(3, 6))
        >>> trace.nodes["z"]["value"].shape
        torch.Size([3, 2])
    """

    def __init__(self, data_dim: int, latent_dim: int = 2, site: str = "x"):
        super().__init__()
        if not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.site = site
        self.loc_weight = PyroParam(torch.zeros(data_dim, latent_dim))
        self.loc_bias = PyroParam(torch.zeros(latent_dim))
        self.scale_weight = PyroParam(torch.zeros(data_dim, latent_dim))
        # softplus(0.5413) = 1: start at the prior's scale.
        self.scale_bias = PyroParam(torch.full((latent_dim,), 0.5413))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of :math:`q(z \\mid x)` from what is visible of ``x``."""
        view = observed_view(self.site, x)
        code = 2.0 * view.value - 1.0
        if view.mask is not None:
            code = torch.where(view.mask, torch.zeros_like(code), code)
        loc = code @ self.loc_weight + self.loc_bias
        scale = F.softplus(code @ self.scale_weight + self.scale_bias) + 1e-4
        return loc, scale

    def forward(
        self, x: torch.Tensor, num_data: int | None = None, subsample: torch.Tensor | None = None
    ):
        """Pyro guide with the model's signature: samples ``"z"`` in the ``"data"`` plate."""
        size = num_data if num_data is not None else len(x)
        subsample_size = None if subsample is not None else len(x)
        with pyro.plate("data", size, subsample_size=subsample_size, subsample=subsample):
            loc, scale = self.encode(x)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))
