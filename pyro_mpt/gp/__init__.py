"""GPyTorch objectives: masked pre-training, leave-p-out and conditional marginal likelihood.

Example:
    >>> from pyro_mpt.gp import (ConditionalMarginalLogLikelihood, LeavePOutPseudoLikelihood,
    ...                          MaskedPretrainingMLL)
"""

from .conditional_marginal_log_likelihood import ConditionalMarginalLogLikelihood
from .leave_p_out_pseudo_likelihood import LeavePOutPseudoLikelihood
from .masked_pretraining_mll import MaskedPretrainingMLL

__all__ = ["MaskedPretrainingMLL", "LeavePOutPseudoLikelihood", "ConditionalMarginalLogLikelihood"]
