"""Model definitions shared by every objective (exact LML, ELBO, cumulative and fixed-rate MPT)."""

from .bernoulli_latent import BernoulliLatentModel
from .bernoulli_latent_guide import BernoulliLatentGuide
from .factor_analysis import FactorAnalysis
from .fitting import fit, no_guide
from .linear_regression import BayesianLinearRegression
from .ppca import PPCA

__all__ = [
    "PPCA",
    "FactorAnalysis",
    "BayesianLinearRegression",
    "BernoulliLatentModel",
    "BernoulliLatentGuide",
    "fit",
    "no_guide",
]
