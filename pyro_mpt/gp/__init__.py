"""GPyTorch objectives: masked pre-training and leave-p-out cross-validation for exact GPs.

Example:
    >>> from pyro_mpt.gp import LeavePOutPseudoLikelihood, MaskedPretrainingMLL
"""

from .leave_p_out_pseudo_likelihood import LeavePOutPseudoLikelihood
from .masked_pretraining_mll import MaskedPretrainingMLL

__all__ = ["MaskedPretrainingMLL", "LeavePOutPseudoLikelihood"]
