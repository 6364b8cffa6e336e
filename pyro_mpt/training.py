"""The optimisation loop shared by the CLI, tutorials and experiments.

:func:`minimize` minimises any loss over the tensors given; :func:`fit_svi` runs it on a Pyro
``ELBO``. To train a model of :mod:`pyro_mpt.models` by a named objective (exact LML, Trace_ELBO,
masked pre-training) use :func:`pyro_mpt.models.fit`, which calls these. (Experiment E3,
``pyro-mpt reproduce training``, is :mod:`pyro_mpt.experiments.training`.)

Stochastic objectives such as masked pre-training need a decaying step size to settle at the
optimum (a constant rate leaves them at a gradient-noise floor), so :func:`minimize` defaults to
Adam with a cosine-annealed learning rate from ``lr`` down to ``final_lr``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .threads import limited_threads

__all__ = ["FitResult", "minimize", "fit_svi"]


@dataclass
class FitResult:
    """History of a :func:`minimize`, :func:`fit_svi` or :func:`pyro_mpt.models.fit` run.

    Attributes:
        losses: the objective at every step.
        tracked_steps: steps at which ``track`` was evaluated (every ``track_every`` and the last).
        tracked: the values of ``track`` at those steps (e.g. exact LML per datum).
        wall_time: seconds spent, excluding the ``track`` evaluations.
    """

    losses: list[float] = field(default_factory=list)
    tracked_steps: list[int] = field(default_factory=list)
    tracked: list[float] = field(default_factory=list)
    wall_time: float = 0.0


def minimize(
    loss_fn: Callable[[], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    steps: int = 1500,
    lr: float = 0.05,
    final_lr: float = 1e-4,
    track: Callable[[], float] | None = None,
    track_every: int = 25,
    progress: bool = True,
    desc: str = "minimize",
) -> FitResult:
    """Minimise ``loss_fn()`` with Adam and a cosine learning-rate schedule, with tqdm progress.

    Args:
        loss_fn: returns the scalar loss to minimise (draw fresh masks inside it).
        parameters: the tensors to optimise.
        steps: number of optimiser steps.
        lr: initial learning rate; it decays along a cosine to ``final_lr`` (pass
            ``final_lr=lr`` for a constant rate).
        track: optional evaluation (e.g. exact LML per datum) run without gradients every
            ``track_every`` steps and at the end.
        progress: show a tqdm bar.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor(3.0))
        >>> result = minimize(lambda: (w - 1.0) ** 2, [w], steps=300, lr=0.1, progress=False)
        >>> round(w.item(), 3)
        1.0
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (lr > 0 and final_lr > 0):
        raise ValueError(f"lr and final_lr must be positive, got {lr!r} and {final_lr!r}")
    parameters = list(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=final_lr)
    result = FitResult()
    elapsed = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    with limited_threads():  # the steps' forward and backward: see pyro_mpt.threads
        for step in bar:
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {step}")
            loss.backward()
            optimizer.step()
            schedule.step()
            elapsed += time.perf_counter() - start
            result.losses.append(loss.item())
            if track is not None and (step % track_every == 0 or step == steps - 1):
                with torch.no_grad():
                    value = float(track())
                result.tracked_steps.append(step)
                result.tracked.append(value)
                bar.set_postfix(loss=f"{loss.item():.4g}", tracked=f"{value:.4g}")
    result.wall_time = elapsed
    return result


def fit_svi(
    model: Callable,
    guide: Callable,
    elbo,
    *args,
    steps: int = 1500,
    lr: float = 0.05,
    final_lr: float = 1e-4,
    track: Callable[[], float] | None = None,
    track_every: int = 25,
    progress: bool = True,
    desc: str = "svi",
    loss_scale: float = 1.0,
    batches: Callable[[], tuple[tuple, dict]] | None = None,
    **kwargs,
) -> FitResult:
    """Stochastic variational inference with any Pyro ``ELBO``, run by :func:`minimize`.

    The same loop as :func:`minimize` (Adam, cosine-annealed learning rate, tqdm), with the loss
    ``elbo.differentiable_loss(model, guide, *args, **kwargs)`` and the parameters found by tracing
    one evaluation (so ``pyro.param`` sites, ``PyroModule`` parameters and autoguide parameters
    are all trained).

    Args:
        model, guide: the Pyro model and guide.
        elbo: a ``pyro.infer.ELBO`` (``Trace_ELBO``, ``MaskedPretrainingELBO``, ...).
        *args: passed to the model and guide.
        **kwargs: passed to the model and guide.
        loss_scale: multiplies the loss (e.g. ``1 / N`` to record losses per datum).
        batches: optional callable returning ``(args, kwargs)`` for each step (mini-batches);
            overrides ``args`` and ``kwargs``.
        steps, lr, final_lr, track, track_every, progress, desc: as in :func:`minimize`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     loc = pyro.param("loc", torch.tensor(0.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
        >>> result = fit_svi(model, lambda x: None, pyro.infer.Trace_ELBO(),
        ...                  torch.full((10,), 2.0), steps=300, lr=0.1, progress=False)
        >>> round(pyro.param("loc").item(), 2)
        2.0
    """
    import pyro.poutine as poutine  # local: keep this module importable without Pyro's set-up cost

    def loss_fn() -> torch.Tensor:
        step_args, step_kwargs = (args, kwargs) if batches is None else batches()
        return elbo.differentiable_loss(model, guide, *step_args, **step_kwargs) * loss_scale

    with poutine.trace(param_only=True) as capture:
        loss_fn()
    parameters = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    if not parameters:
        raise ValueError("the model and guide have no parameters to fit (no pyro.param sites)")
    return minimize(
        loss_fn,
        parameters,
        steps=steps,
        lr=lr,
        final_lr=final_lr,
        track=track,
        track_every=track_every,
        progress=progress,
        desc=desc,
    )
