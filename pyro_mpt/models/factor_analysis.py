r"""Factor analysis: PPCA with a separate noise variance per dimension.

.. math::

    x_n = \mu + W z_n + \varepsilon_n, \quad z_n \sim \mathcal{N}(0, I_K),
    \quad \varepsilon_n \sim \mathcal{N}(0, \mathrm{diag}(\psi))
    \quad\Longrightarrow\quad x_n \sim \mathcal{N}(\mu, WW^\top + \mathrm{diag}(\psi)).

The maximum-likelihood fit is ``sklearn.decomposition.FactorAnalysis`` (its ``score`` is the average
log-likelihood), reached iteratively rather than in closed form.
"""

from __future__ import annotations

import torch

from .ppca import PPCA

__all__ = ["FactorAnalysis"]


class FactorAnalysis(PPCA):
    r"""Factor analysis; ``noise_scale`` is a vector :math:`\sqrt{\psi}` of length D.

    Takes the same arguments as :class:`~pyro_mpt.models.PPCA` (collapsed or latent form, optional
    prior on :math:`W`); ``noise_scale`` initialises every dimension.

    Example:
        >>> model = FactorAnalysis(data_dim=5, latent_dim=2)
        >>> model.noise_scale.shape, model.log_marginal(torch.zeros(3, 5)).shape
        (torch.Size([5]), torch.Size([3]))
    """

    def _initial_noise(self, noise_scale: float) -> torch.Tensor:
        return torch.full((self.data_dim,), float(noise_scale))
