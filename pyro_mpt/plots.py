"""Figures: training curves and masked-prediction curves (PNG, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .training import FitResult  # noqa: E402

__all__ = ["plot_training_curves"]


def plot_training_curves(
    histories: Mapping[str, FitResult],
    path: str | Path,
    optimum: float | None = None,
    ylabel: str = "exact log marginal likelihood per datum",
    title: str | None = None,
) -> Path:
    """Plot the tracked value (e.g. exact LML per datum) against step for several objectives.

    Args:
        histories: objective name -> :class:`~pyro_mpt.training.FitResult` with tracked values.
        path: where to write the PNG.
        optimum: a known optimum, drawn as a horizontal line.

    Example:
        >>> from pyro_mpt.training import FitResult
        >>> import tempfile, os
        >>> h = FitResult(tracked_steps=[0, 10], tracked=[-2.0, -1.0])
        >>> out = plot_training_curves({"exact": h}, os.path.join(tempfile.mkdtemp(), "c.png"))
        >>> out.exists()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot(history.tracked_steps, history.tracked, label=name, lw=1.6)
    if optimum is not None:
        ax.axhline(optimum, color="k", ls="--", lw=1, label=f"closed-form optimum ({optimum:.3f})")
    values = [v for h in histories.values() for v in h.tracked]
    if optimum is not None and values:
        # Zoom on the approach to the optimum; the first steps are far below it.
        final = min(h.tracked[-1] for h in histories.values() if h.tracked)
        span = max(optimum - final, 0.02 * abs(optimum))
        ax.set_ylim(final - 3 * span, optimum + span)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
