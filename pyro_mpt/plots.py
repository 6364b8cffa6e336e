"""Figures: training curves and masked-prediction curves (PNG, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# Figures are built without pyplot, so saving a PNG neither needs a display nor changes the
# backend or the figures of a user's session (e.g. a notebook).
from matplotlib.figure import Figure

from .scoring import MPTCurve
from .training import FitResult

__all__ = ["plot_training_curves", "plot_mpt_curve", "plot_convergence"]


def plot_training_curves(
    histories: Mapping[str, FitResult],
    path: str | Path,
    optimum: float | None = None,
    ylabel: str = "exact log marginal likelihood per datum",
    title: str | None = None,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Plot the tracked value (e.g. exact LML per datum) against step for several objectives.

    Args:
        histories: objective name -> :class:`~pyro_mpt.training.FitResult` with tracked values.
        path: where to write the PNG.
        optimum: a known optimum, drawn as a horizontal line.
        references: further labelled horizontal lines (e.g. the true model's LML).

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
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, history in histories.items():
        ax.plot(history.tracked_steps, history.tracked, label=name, lw=1.6)
    if optimum is not None:
        ax.axhline(optimum, color="k", ls="--", lw=1, label=f"closed-form optimum ({optimum:.3f})")
    for index, (name, value) in enumerate((references or {}).items()):
        style = [":", "-."][index % 2]
        ax.axhline(value, color="0.5", ls=style, lw=1, label=f"{name} ({value:.3f})")
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
    return path


def _per_datum(curve: MPTCurve) -> tuple[list[float], list[float]]:
    """Curve mean and standard error averaged over any batch (row) dimensions."""
    mean, stderr = curve.mean, curve.stderr
    if mean.dim() > 1:
        rows = mean[0].numel()
        mean = mean.reshape(len(mean), -1).mean(-1)
        stderr = stderr.reshape(len(stderr), -1).pow(2).sum(-1).sqrt() / rows
    return mean.tolist(), stderr.tolist()


def plot_mpt_curve(
    curves: MPTCurve | Mapping[str, MPTCurve],
    path: str | Path,
    lml: float | Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    r"""Plot :math:`S(x; m)` against % masked, with error bars, the area shaded and the LML printed.

    The area is :meth:`~pyro_mpt.scoring.MPTCurve.area` (the sum over every mask size, an
    estimate of :math:`\log p(x)`); curves with a batch of rows are averaged per datum.

    Args:
        curves: one curve, or name -> curve.
        path: where to write the PNG.
        lml: the exact log marginal likelihood per datum (one number, or one per curve name),
            printed next to the area.

    Example:
        >>> import tempfile, os, torch
        >>> from torch.distributions import MultivariateNormal
        >>> from pyro_mpt.scoring import mpt_curve
        >>> d = MultivariateNormal(torch.zeros(4), torch.eye(4) + 0.5)
        >>> curve = mpt_curve(d, d.sample((30,)), masks_per_rate=2, reduction="mean")
        >>> plot_mpt_curve(curve, os.path.join(tempfile.mkdtemp(), "c.png"), lml=-5.0).exists()
        True
    """
    if isinstance(curves, MPTCurve):
        curves = {"S(x; m)": curves}
    if not curves:
        raise ValueError("curves must contain at least one MPTCurve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lines = []
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index}"
        percent = (100 * curve.rates).tolist()
        mean, stderr = _per_datum(curve)
        ax.errorbar(percent, mean, yerr=stderr, color=color, lw=1.4, elinewidth=0.8, label=name)
        ax.fill_between(percent, mean, 0.0, color=color, alpha=0.15)
        area = curve.area()
        area_mean = area.mean.mean().item()
        area_se = area.stderr.pow(2).sum().sqrt().item() / max(1, area.stderr.numel())
        label = "area" if curve.complete else "interpolated area"
        text = f"{name}: {label} = {area_mean:.3f} ± {area_se:.3f}"
        exact = lml.get(name) if isinstance(lml, Mapping) else lml
        if exact is not None:
            text += f", exact LML = {exact:.3f}"
        lines.append(text)
    ax.text(0.02, 0.03, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    ax.set_xlabel("% masked (100 m / D)")
    ax.set_ylabel("S(x; m) per datum")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_convergence(
    masks: list[int],
    gaps: Mapping[str, list[float]],
    path: str | Path,
    per_seed: Mapping[str, list[list[float]]] | None = None,
    title: str | None = None,
) -> Path:
    r"""Log-log plot of an estimator's error against the number of masks, with a
    :math:`1/\sqrt{\text{masks}}` guide line.

    Args:
        masks: the x values (masks per size).
        gaps: name -> error at each x (e.g. mean over seeds of ``|LML - MPT|`` per datum).
        path: where to write the PNG.
        per_seed: name -> one list of errors per seed, drawn as faint points behind the mean.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "c.png")
        >>> plot_convergence([1, 4], {"a": [1.0, 0.5]}, path).exists()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for index, (name, values) in enumerate(gaps.items()):
        ax.plot(masks, values, marker="o", ms=3, color=f"C{index}", label=name)
        for seed_values in (per_seed or {}).get(name, []):
            ax.scatter(masks, seed_values, s=6, color=f"C{index}", alpha=0.3, lw=0)
    first = next(iter(gaps.values()))
    guide = [first[0] * (masks[0] / m) ** 0.5 for m in masks]
    ax.plot(masks, guide, "k:", lw=1, label="∝ 1/sqrt(masks)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("masks per size")
    ax.set_ylabel("|LML − MPT| per datum (nats)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
