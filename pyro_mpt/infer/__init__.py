"""Pyro inference by masked pre-training: :class:`MaskedPretrainingELBO` and guide helpers."""

from .masked_pretraining_elbo import MaskedPretrainingELBO
from .observed_view import ObservedView, masked_observations, observed_view

__all__ = ["MaskedPretrainingELBO", "ObservedView", "observed_view", "masked_observations"]
