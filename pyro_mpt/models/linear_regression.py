r"""Bayesian linear regression, collapsed or with latent weights.

.. math::

    w \sim \mathcal{N}(0, \alpha^2 I_P), \quad
    y = X w + \varepsilon, \quad \varepsilon \sim \mathcal{N}(0, \sigma^2 I_N)
    \quad\Longrightarrow\quad y \sim \mathcal{N}(0, \alpha^2 X X^\top + \sigma^2 I_N).

The masked dimension is the N observations (as for a Gaussian process): masked pre-training hides
targets and predicts them from the others, and its cumulative score is the log evidence
:math:`\log p(y \mid X)`, the quantity type-II maximum likelihood maximises over
:math:`(\alpha, \sigma)`. The collapsed form observes the marginal as a
``LowRankMultivariateNormal`` (rank P, Woodbury); the latent form samples ``"weights"`` and observes
``Normal(Xw, sigma).to_event(1)``, which given :math:`w` factorises over observations.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from ._module import InstanceModule

__all__ = ["BayesianLinearRegression"]


class BayesianLinearRegression(InstanceModule):
    r"""Bayesian linear regression with learned prior scale :math:`\alpha` and noise :math:`\sigma`.

    Args:
        input_dim: P, the number of input features.
        prior_scale: initial :math:`\alpha`.
        noise_scale: initial :math:`\sigma`.
        collapsed: observe the marginal of ``y`` (default) or sample ``"weights"`` and observe
            ``y`` given them.

    Example:
        >>> model = BayesianLinearRegression(input_dim=3)
        >>> inputs, targets = torch.randn(20, 3), torch.randn(20)
        >>> model.log_marginal(inputs, targets).shape
        torch.Size([])
    """

    def __init__(
        self,
        input_dim: int,
        prior_scale: float = 1.0,
        noise_scale: float = 1.0,
        collapsed: bool = True,
    ):
        super().__init__()
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        for name, value in [("prior_scale", prior_scale), ("noise_scale", noise_scale)]:
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.input_dim, self.collapsed = input_dim, bool(collapsed)
        self.prior_scale = PyroParam(torch.tensor(float(prior_scale)), dist.constraints.positive)
        self.noise_scale = PyroParam(torch.tensor(float(noise_scale)), dist.constraints.positive)

    def _check_inputs(self, inputs: torch.Tensor) -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
            is_tensor = isinstance(inputs, torch.Tensor)
            shape = tuple(inputs.shape) if is_tensor else type(inputs).__name__
            raise ValueError(f"inputs must be a 2-D tensor (N, P), got {shape}")
        if inputs.shape[-1] != self.input_dim:
            raise ValueError(
                f"inputs must have {self.input_dim} columns (input_dim), got {inputs.shape[-1]}"
            )

    def marginal(self, inputs: torch.Tensor) -> dist.LowRankMultivariateNormal:
        r"""The distribution of the targets, :math:`\mathcal{N}(0, \alpha^2 XX^\top + \sigma^2 I)`.

        Example:
            >>> BayesianLinearRegression(2).marginal(torch.ones(4, 2)).event_shape
            torch.Size([4])
        """
        self._check_inputs(inputs)
        scale = self.prior_scale.to(inputs)
        cov_diag = self.noise_scale.to(inputs).pow(2).expand(len(inputs))
        loc = inputs.new_zeros(len(inputs))
        return dist.LowRankMultivariateNormal(loc, scale * inputs, cov_diag)

    def log_marginal(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Exact log evidence :math:`\\log p(y \\mid X)` (a scalar; divide by N for per datum).

        Example:
            >>> BayesianLinearRegression(2).log_marginal(torch.ones(4, 2), torch.zeros(4)).shape
            torch.Size([])
        """
        return self.marginal(inputs).log_prob(targets)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None):
        """Pyro model: the targets observed jointly at site ``"y"`` (event shape ``(N,)``).

        Example:
            >>> BayesianLinearRegression(2)(torch.ones(4, 2)).shape
            torch.Size([4])
        """
        if self.collapsed:
            return pyro.sample("y", self.marginal(inputs), obs=targets)
        self._check_inputs(inputs)
        prior = dist.Normal(inputs.new_zeros(()), self.prior_scale.to(inputs))
        weights = pyro.sample("weights", prior.expand([self.input_dim]).to_event(1))
        mean = (inputs @ weights.unsqueeze(-1)).squeeze(-1)
        return pyro.sample("y", dist.Normal(mean, self.noise_scale).to_event(1), obs=targets)
