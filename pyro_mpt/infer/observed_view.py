r"""What a guide may see of an observed site while it proposes local latents for masked prediction.

When :class:`~pyro_mpt.infer.MaskedPretrainingELBO` runs with ``proposal="guide"`` it estimates
:math:`p(x_j \mid x_R) = \int p(x_j \mid z)\, p(z \mid x_R)\, dz` by self-normalised importance
sampling with the guide as proposal :math:`q(z \mid x_R)`. The guide must then see only the
visible part :math:`x_R`: a guide that reads the full observation would propose from a
distribution that has already seen the values it is about to be scored on. Guides get the
visible part through :func:`observed_view`, and the ELBO refuses to use a guide that never asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch

__all__ = ["ObservedView", "observed_view", "masked_observations"]


class ObservedView(NamedTuple):
    """The part of an observed site a guide may read.

    Attributes:
        value: the observation with every masked (hidden) entry set to zero, broadcast to the
            shape of ``mask`` when there is one.
        mask: boolean tensor, ``True`` at hidden entries, or ``None`` when nothing is hidden
            (ordinary inference: the guide sees the whole observation).
    """

    value: torch.Tensor
    mask: torch.Tensor | None


class _Views:
    def __init__(self, views: Mapping[str, ObservedView]):
        self.views = dict(views)
        self.read: set[str] = set()


_CURRENT: ContextVar[_Views | None] = ContextVar("pyro_mpt_observed_views", default=None)


def observed_view(name: str, value: torch.Tensor) -> ObservedView:
    """The visible part of observed site ``name`` whose full value is ``value``.

    Call it in a guide wherever the guide would read the observation of site ``name``. Outside
    masked prediction it returns ``ObservedView(value, None)``; while
    :class:`~pyro_mpt.infer.MaskedPretrainingELBO` draws importance samples from the guide it
    returns the observation with the masked entries zeroed and the mask, whose leading dimensions
    (one per mask draw and importance sample) broadcast against the guide's plates.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> observed_view("x", x).mask is None
        True
        >>> with masked_observations({"x": torch.tensor([[False, True, False]])}, {"x": x}):
        ...     observed_view("x", x).value
        tensor([[1., 0., 3.]])
    """
    views = _CURRENT.get()
    if views is None or name not in views.views:
        return ObservedView(value, None)
    views.read.add(name)
    return views.views[name]


@contextmanager
def masked_observations(
    masks: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> Iterator[set[str]]:
    """Within the block, :func:`observed_view` hides the ``masks`` of the named sites.

    Yields the set of site names whose view was read, so that the caller can check that a guide
    asked before trusting it as a proposal.

    Example:
        >>> x = torch.ones(2, 3)
        >>> with masked_observations({"x": torch.eye(3, dtype=torch.bool)[:2]}, {"x": x}) as read:
        ...     _ = observed_view("x", x)
        >>> read
        {'x'}
    """
    views = {}
    for name, mask in masks.items():
        value = values[name]
        views[name] = ObservedView(torch.where(mask, torch.zeros_like(value), value), mask)
    state = _Views(views)
    token = _CURRENT.set(state)
    try:
        yield state.read
    finally:
        _CURRENT.reset(token)
