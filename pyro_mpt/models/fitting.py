"""Fit any model of :mod:`pyro_mpt.models` by exact LML, Trace_ELBO or masked pre-training.

One helper for the CLI, tutorials and experiments, so that every objective is run the same way
(Adam with a cosine-annealed learning rate, :func:`pyro_mpt.training.minimize`) and scored the
same way (the model's own ``log_marginal``: exact where closed form, quadrature for the Bernoulli
model).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO

from ..infer import MaskedPretrainingELBO
from ..masks import MaskScheme
from ..training import FitResult, fit_svi, minimize

__all__ = ["fit", "no_guide"]

OBJECTIVES = ("mpt", "elbo", "exact")


def no_guide(*args, **kwargs) -> None:
    """A guide with no sites: for models whose only latents are integrated by the objective."""


def fit(
    model: torch.nn.Module,
    *args: torch.Tensor,
    objective: str | ELBO = "mpt",
    guide: Callable | None = None,
    masks: MaskScheme | None = None,
    num_masks: int = 1,
    steps: int = 1000,
    lr: float = 0.05,
    final_lr: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = None,
    track: str | Callable[[], float] | None = "log_marginal",
    track_every: int = 25,
    progress: bool = True,
    desc: str | None = None,
    **elbo_options,
) -> FitResult:
    """Train ``model`` on ``args`` (its ``forward`` arguments) and record LML per datum.

    Args:
        model: a model of :mod:`pyro_mpt.models` (anything with ``forward(*args)`` and
            ``log_marginal(*args)``).
        *args: the data, as ``forward`` takes it (``x`` for PPCA-like models, ``inputs, targets``
            for regression); the first one's length is the number of data points N.
        objective: ``"mpt"`` (:class:`~pyro_mpt.infer.MaskedPretrainingELBO` with ``masks``),
            ``"elbo"`` (``Trace_ELBO``), ``"exact"`` (minus the exact/quadrature
            ``log_marginal``), or any ``pyro.infer.ELBO`` instance.
        guide: the guide (default :func:`no_guide`: right when the model's latents are local and
            integrated by MPT, or absent).
        masks, num_masks: the MPT mask scheme (default cumulative) and draws per row.
        steps, lr, final_lr: Adam with a cosine-annealed learning rate from ``lr`` to ``final_lr``.
        seed: seeds Pyro's RNG (``pyro.set_rng_seed``: Pyro's samplers draw from the global torch
            RNG, which it reseeds, with numpy's and ``random``'s), the masks and the mini-batches.
            The model's initial values are drawn when it is built: pass it a seeded
            ``generator`` (e.g. ``PPCA(..., generator=torch.Generator().manual_seed(0))``).
        batch_size: train on random mini-batches of rows (models with ``forward(x, num_data)``).
        track: ``"log_marginal"`` (LML per datum), a callable, or ``None``.
        **elbo_options: passed to the ELBO (e.g. ``num_importance_samples``, ``num_particles``).

    Returns:
        A :class:`~pyro_mpt.training.FitResult`; ``losses`` are per datum, ``tracked`` the LML per
        datum at ``tracked_steps``.

    Example:
        >>> from pyro_mpt.models import PPCA
        >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> model = PPCA(4, 1, generator=torch.Generator().manual_seed(1))
        >>> result = fit(model, x, steps=20, progress=False)
        >>> len(result.losses), len(result.tracked) > 0
        (20, True)
    """
    if not args:
        raise ValueError("fit needs the data as positional arguments (e.g. fit(model, x))")
    num_data = len(args[0])
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= num_data):
        raise ValueError(f"batch_size must be an integer in 1..{num_data}, got {batch_size!r}")
    pyro.set_rng_seed(seed)
    name = objective if isinstance(objective, str) else type(objective).__name__
    desc = desc or name
    if track == "log_marginal":
        track_fn = lambda: model.log_marginal(*args).sum() / num_data  # noqa: E731
    elif track is None or callable(track):
        track_fn = track
    else:
        raise ValueError(f"track must be 'log_marginal', a callable or None, got {track!r}")
    options = dict(track=track_fn, track_every=track_every, progress=progress, desc=desc)

    if objective == "exact":
        if batch_size is not None:
            raise ValueError("batch_size is for the stochastic objectives, not objective='exact'")
        return minimize(
            lambda: -model.log_marginal(*args).sum() / num_data,
            model.parameters(),
            steps=steps,
            lr=lr,
            final_lr=final_lr,
            **options,
        )
    if objective == "mpt":
        elbo = MaskedPretrainingELBO(
            masks=masks,
            num_masks=num_masks,
            generator=torch.Generator().manual_seed(seed),
            **elbo_options,
        )
    elif objective == "elbo":
        elbo = Trace_ELBO(**elbo_options)
    elif isinstance(objective, ELBO):
        elbo = objective
    else:
        raise ValueError(
            f"objective must be one of {OBJECTIVES} or a pyro.infer.ELBO, got {objective!r}"
        )

    batches = None
    if batch_size is not None:
        generator = torch.Generator().manual_seed(seed + 1)

        def batches():
            rows = torch.randperm(num_data, generator=generator)[:batch_size]
            return (args[0][rows], *args[1:]), {"num_data": num_data}

    return fit_svi(
        model,
        guide if guide is not None else no_guide,
        elbo,
        *args,
        steps=steps,
        lr=lr,
        final_lr=final_lr,
        loss_scale=1.0 / num_data,
        batches=batches,
        **options,
    )
