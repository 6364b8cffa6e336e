"""Model definitions shared by every objective (exact LML, ELBO, cumulative and fixed-rate MPT)."""

from .ppca import PPCA

__all__ = ["PPCA"]
