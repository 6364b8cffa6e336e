r"""E2: the area under the masked-prediction curve is the log marginal likelihood.

PPCA with the true loading matrix on the paper's synthetic data (D = 200, N = 1000, K = 5;
``--full`` adds K = 50). For every mask size m = 1..D the score

.. math::

    S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_R)

is estimated with independent random masks per row (:func:`~pyro_mpt.scoring.mpt_curve`), and
its sum over m (:meth:`~pyro_mpt.scoring.MPTCurve.area`) is compared with the exact
:math:`\log p(x)`, per datum. The curve falls from the leave-one-out score (m = 1, lots of context)
to the prior marginals (m = D, none); any single rate, e.g. BERT's 15%, scaled by D, misses the
LML.

Reference: Moreno-Muñoz, Recasens, Hauberg, "On Masked Pre-training and the Marginal Likelihood",
NeurIPS 2023, Fig. 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..datasets import synthetic_ppca, synthetic_ppca_marginal
from ..plots import plot_mpt_curve
from ..scoring import MPTCurve, mpt_curve
from ._report import Timer, markdown_table, single_threaded, timing_line, write_results

__all__ = ["run"]

NOISE_PRECISION = 5.0
REPORTED_RATES = (0.01, 0.15, 0.5, 0.85, 1.0)


def run(out: Path, full: bool = False, seed: int = 0, **sizes) -> dict:
    """Run E2 and write ``curve.png``, ``results.json`` and ``results.md`` into ``out``.

    Args:
        out: output folder.
        full: K = 5 and K = 50, 8 masks per size and row.
        seed: seeds the data and the masks.
        **sizes: ``data_dim`` (200), ``num_data`` (1000), ``latent_dims`` ((5,)),
            ``masks_per_size`` (2), ``progress`` (True).

    Example:
        >>> import tempfile
        >>> r = run(Path(tempfile.mkdtemp()), data_dim=6, num_data=20, progress=False)
        >>> r["rows"][0]["latent_dim"]
        5
    """
    with single_threaded():
        return _run(Path(out), full, seed, **sizes)


def _curve_row(curve: MPTCurve, exact: float, latent_dim: int) -> dict:
    area = curve.area()
    size = curve.event_size
    row = {
        "latent_dim": latent_dim,
        "exact_lml": exact,
        "area": area.mean.item(),
        "area_se": area.stderr.item(),
        "z": (area.mean.item() - exact) / area.stderr.item(),
    }
    for rate in REPORTED_RATES:
        m = min(size, max(1, round(rate * size)))
        index = int((curve.sizes == m).nonzero()[0, 0])
        # D * S(x; m): what a fixed-rate objective at this rate reports for log p(x).
        row[f"D*S(m={m})"] = size * curve.mean[index].item()
    return row


def _run(
    out: Path,
    full: bool,
    seed: int,
    *,
    data_dim: int = 200,
    num_data: int = 1000,
    latent_dims: Sequence[int] | None = None,
    masks_per_size: int | None = None,
    progress: bool = True,
) -> dict:
    latent_dims = ((5, 50) if full else (5,)) if latent_dims is None else tuple(latent_dims)
    masks_per_size = (8 if full else 2) if masks_per_size is None else masks_per_size
    if masks_per_size < 2:
        raise ValueError(f"masks_per_size must be at least 2 (for a standard error), got "
                         f"{masks_per_size}")
    timer = Timer()
    curves, exact, rows = {}, {}, []
    for latent_dim in tqdm(latent_dims, desc="area", disable=not progress):
        generator = torch.Generator().manual_seed(seed)
        data, cov_factor = synthetic_ppca(
            num_data, data_dim, latent_dim, NOISE_PRECISION, generator, dtype=torch.float64
        )
        model = synthetic_ppca_marginal(cov_factor, NOISE_PRECISION)
        with torch.no_grad():
            curve = mpt_curve(
                model, data, masks_per_rate=masks_per_size, generator=generator, reduction="mean"
            )
            lml = model.log_prob(data).mean().item()
        name = f"K={latent_dim}"
        curves[name], exact[name] = curve, lml
        rows.append(_curve_row(curve, lml, latent_dim))
    out.mkdir(parents=True, exist_ok=True)
    plot_mpt_curve(
        curves,
        out / "curve.png",
        lml=exact,
        title=f"E2: PPCA, D={data_dim}, N={num_data}: S(x; m) per datum, area = log p(x)",
    )
    results = {
        "experiment": "E2 area under the MPT curve equals the LML",
        "config": {
            "data_dim": data_dim,
            "num_data": num_data,
            "latent_dims": list(latent_dims),
            "noise_precision": NOISE_PRECISION,
            "masks_per_size_per_row": masks_per_size,
            "seed": seed,
            "full": full,
        },
        "rows": rows,
        "curves": {
            name: {
                "sizes": curve.sizes.tolist(),
                "rates": curve.rates.tolist(),
                "score": curve.mean.tolist(),
                "score_se": curve.stderr.tolist(),
            }
            for name, curve in curves.items()
        },
        "figures": ["curve.png"],
    }
    return write_results(out, results, timer, format_markdown)


def format_markdown(results: dict) -> str:
    """The E2 results as Markdown."""
    config = results["config"]
    fixed = [key for key in results["rows"][0] if key.startswith("D*S")]
    header = ["K", "exact LML", "area (sum of S(x; m))", "(area − LML) / s.e.", *fixed]
    rows = [
        [
            row["latent_dim"],
            f"{row['exact_lml']:.3f}",
            f"{row['area']:.3f} ± {row['area_se']:.3f}",
            f"{row['z']:+.2f}",
            *[f"{row[key]:.2f}" for key in fixed],
        ]
        for row in results["rows"]
    ]
    return "\n".join(
        [
            "# E2: the area under the masked-prediction curve is the log marginal likelihood",
            "",
            f"PPCA with the true W, synthetic data D={config['data_dim']}, "
            f"N={config['num_data']}, noise precision {config['noise_precision']} (independent per "
            f"dimension), seed {config['seed']}; {config['masks_per_size_per_row']} random masks "
            "of every size m = 1..D per row. All values in nats per datum. `D*S(m)` is what a "
            "fixed-rate objective at that mask size reports as log p(x): m = 1 is the "
            "pseudo-likelihood, m = D the product of prior marginals.",
            "",
            markdown_table(header, rows),
            "",
            "![curve](curve.png)",
            "",
            timing_line(results),
        ]
    )
