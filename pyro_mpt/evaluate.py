r"""Comparison tables for fitted models: exact LML, MPT estimates and masked-prediction scores.

For a model with a Gaussian marginal :math:`p(x)` (exact conditionals from
:mod:`pyro_mpt.gaussian`), or any model with its own ``log_marginal(x)`` and
``conditional_log_prob(x, mask)`` (e.g. the Bernoulli latent model, by quadrature), and data
:math:`X = (x_1..x_N)`, every column is reported **per datum** (averaged over rows):

- ``exact_lml``: :math:`\frac1N\sum_n \log p(x_n)` (closed form);
- ``mpt`` ± ``mpt_se``: the cumulative masked pre-training estimate of the same with its
  Monte-Carlo standard error (:func:`~pyro_mpt.scoring.mpt_score`);
- ``pseudo_ll``: :math:`\frac1N\sum_n \sum_{j} \log p(x_{nj} \mid x_{n,-j}) = D\,S(x; 1)`, the
  leave-one-out (m = 1) score, computed exactly with all D single-dimension masks;
- ``rate_<ρ>%`` ± ``rate_<ρ>%_se``: :math:`D\,S(x; \mathrm{round}(\rho D))`, the fixed-rate
  objective (BERT's 15%), biased for :math:`\log p(x)`.

The identity :math:`\log p(x) = \sum_{m=1}^{D} S(x; m)` (Moreno-Muñoz et al., 2023; Fong & Holmes,
2020) makes ``exact_lml`` and ``mpt`` agree up to Monte-Carlo error; the other columns show how far
single-rate scores are from it.

**Exact GPs** (``gpytorch.models.ExactGP`` in training mode, holding their training data): the n
observations are one draw of the GP, so every column is a total over the n points (nats, as
``arviz_stats.compare`` reports elpd), from one Cholesky factor per model
(:func:`evaluate_gps`):

- ``exact_lml``: :math:`\log p(\mathbf y \mid \theta)` (no hyperprior);
- ``clml`` ± ``clml_se``: the conditional marginal likelihood :math:`\mathbb E_H \log
  p(\mathbf y_H \mid \mathbf y_C)`, a fraction c conditioned on
  (:class:`~pyro_mpt.gp.ConditionalMarginalLogLikelihood`, masked estimator);
- ``elpd_loo`` ± ``elpd_loo_se``: exact leave-one-out :math:`\sum_i \log p(y_i \mid
  \mathbf y_{-i})` with arviz's standard error :math:`\sqrt{n\,\mathrm{Var}_i}`; for a GP it is
  also the pseudo-likelihood (``pseudo_ll``);
- ``*_diff`` and ``*_dse``: the difference to the best model by that column and its standard
  error. Every model is scored on the **same masks** (common random numbers), so the CLML
  difference has a paired Monte-Carlo standard error, smaller than the unpaired
  :math:`\sqrt{se_a^2 + se_b^2}` (``clml_dse_unpaired``); the LOO ``dse`` is arviz's
  :math:`\sqrt{n\,\mathrm{Var}_i(\mathrm{elpd}^a_i - \mathrm{elpd}^b_i)}`.

**Evidence per row of Pyro models with local latents** (a VAE, the Bernoulli latent model; no
hand-written conditionals needed): :func:`mpt_log_marginal` is the masked pre-training estimate
of :math:`\log p(x_n)` per row ± s.e. from
:meth:`~pyro_mpt.infer.MaskedPretrainingELBO.site_estimates` (the training path: its
self-normalised importance sampling, with the guide or Laplace proposals),
:func:`importance_log_marginal` plain importance sampling with the guide as proposal; for the
evidence itself use the latter (:mod:`pyro_mpt.infer.evidence` says why, with measurements).

**Pyro models** (:class:`~pyro_mpt.evaluate_pyro.PyroModel`,
:func:`~pyro_mpt.evaluate_pyro.evaluate_pyro_models`): the same columns and differences for the n
values of one observed site, plus the ELBO of the guide; ``lml`` is exact (the model's
``log_marginal``, or a model without latents), the MPT estimate (local latents only: masks per
row, importance-sampled conditionals) or importance-sampled with the guide (global latents), and
``lml_method`` says which; see :mod:`pyro_mpt.evaluate_pyro` for every column's estimator.
Paired standard errors of differences, measured (4 masks per size, seed 0): scikit-learn's
diabetes data (n = 442), Bayesian linear regression on 3 features against all 10 (type-II ML
hyperparameters, collapsed): CLML 0.25 paired against 1.04 unpaired, MPT 0.31 against 1.08, LOO
5.1 against 18.8; latent PPCA on 40 rows of D = 6 (local latents, no ``log_marginal``), K = 2
against K = 3: MPT (the LML column) 0.64 against 4.5, CLML 0.21 against 0.99. Importance
sampling and the ELBO gain from common draws only when the guides' noise is shared: for guides
over different weight vectors paired and unpaired errors are about equal (0.087 against 0.085).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch

from ._scores import Score, add_differences, rank_rows
from .distributed import gather_rows
from .evaluate_pyro import PyroModel, as_pyro_model, evaluate_pyro_models
from .gaussian import event_size, masked_conditional_log_prob, normal_log_prob
from .infer.evidence import importance_log_marginal, mpt_log_marginal
from .masks import FixedRate, MaskScheme, MPTEstimate, Stratified, fold_in, size_for_rate
from .threads import limited_threads

__all__ = [
    "as_distribution",
    "pseudo_log_likelihood",
    "rate_key",
    "evaluate_model",
    "mpt_log_marginal",
    "importance_log_marginal",
    "compare_models",
    "evaluate_gps",
    "PyroModel",
    "evaluate_pyro_models",
    "gp_pointwise_loo",
    "as_dataframe",
    "plot_comparison",
    "format_table",
]

# Upper bound on mask-rows x D elements materialised at once by :func:`pseudo_log_likelihood`.
_CHUNK_ELEMENTS = 2**22


def as_distribution(model: Any):
    """The Gaussian marginal of ``model``: its ``.marginal()`` if it has one, else ``model`` itself.

    Example:
        >>> from pyro_mpt.models import PPCA
        >>> type(as_distribution(PPCA(4, 1))).__name__
        'LowRankMultivariateNormal'
    """
    if hasattr(model, "marginal") and callable(model.marginal):
        return model.marginal()
    if isinstance(model, torch.distributions.Distribution):
        return model
    raise TypeError(
        "model must be a torch/pyro Gaussian distribution, have a .marginal() method returning "
        "one, or have .log_marginal(x) and .conditional_log_prob(x, mask) methods; got "
        f"{type(model).__name__}"
    )


class _Scores(NamedTuple):
    """How to score one model: exact log p(x) per row and masked conditionals per mask."""

    exact: Callable[[torch.Tensor], torch.Tensor]
    masked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (S, *batch, D) masks
    size: int | None


def _scores(model: Any) -> _Scores:
    if callable(getattr(model, "conditional_log_prob", None)) and callable(
        getattr(model, "log_marginal", None)
    ):
        # Non-Gaussian models (e.g. BernoulliLatentModel): their own exact or quadrature scores.
        def masked(data, masks):
            return torch.stack([model.conditional_log_prob(data, mask) for mask in masks])

        return _Scores(model.log_marginal, masked, getattr(model, "data_dim", None))
    dist = as_distribution(model)
    return _Scores(
        dist.log_prob, partial(masked_conditional_log_prob, dist), event_size(dist)
    )


def _pseudo_log_likelihood(scores: _Scores, data: torch.Tensor) -> torch.Tensor:
    size = data.shape[-1]
    masks = torch.eye(size, dtype=torch.bool, device=data.device)
    masks = masks.reshape(size, *[1] * (data.dim() - 1), size)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, data.numel()))
    total = torch.zeros(data.shape[:-1], dtype=data.dtype, device=data.device)
    for start in range(0, size, chunk):
        total = total + scores.masked(data, masks[start : start + chunk]).sum((0, -1))
    return total


def pseudo_log_likelihood(model: Any, data: torch.Tensor) -> torch.Tensor:
    r"""Exact leave-one-out score :math:`\sum_j \log p(x_{j} \mid x_{-j})` for every row.

    This is :math:`D\,S(x; 1)`, the first point of the masked-prediction curve, computed with
    all D single-dimension masks (no Monte-Carlo error).

    Args:
        model: a Gaussian distribution, a model with ``.marginal()``, or a model with
            ``.log_marginal(x)`` and ``.conditional_log_prob(x, mask)``.
        data: ``(..., D)`` rows.

    Example:
        >>> from torch.distributions import MultivariateNormal, Normal
        >>> d = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> x = torch.tensor([[0.0, 1.0]])
        >>> torch.allclose(pseudo_log_likelihood(d, x), Normal(0.0, 1.0).log_prob(x).sum(-1))
        True
    """
    scores = _scores(model)
    _check_data(data, scores.size, dims=None)
    return _pseudo_log_likelihood(scores, data)


def _check_data(data, size: int | None, dims: int | None = 2) -> None:
    if (
        not isinstance(data, torch.Tensor)
        or data.dim() < 1
        or (dims is not None and data.dim() != dims)
        or (size is not None and data.shape[-1] != size)
    ):
        shape = getattr(data, "shape", type(data).__name__)
        expected = "(N, D)" if dims == 2 else "(..., D)"
        raise ValueError(f"data must be an {expected} tensor with D={size}, got {shape}")


def _estimate(
    scores, data, scheme: MaskScheme, num_masks: int, generator, keys=None, gather=False
) -> MPTEstimate:
    """Per-datum estimate of the scheme's target and its standard error."""
    draw = scheme.sample(
        data.shape[-1], data.shape[:-1], num_masks, generator, data.dtype, data.device, keys=keys
    )
    return draw.estimate(scores.masked(data, draw.masks), reduction="mean", gather=gather)


def rate_key(rate: float) -> str:
    """Column name of a fixed masking rate, e.g. ``rate_15%`` for 0.15.

    Example:
        >>> rate_key(0.15)
        'rate_15%'
    """
    return f"rate_{100 * rate:g}%"


def evaluate_model(
    model: Any,
    data: torch.Tensor,
    rates: Sequence[float] = (0.15, 0.5, 0.85),
    masks: MaskScheme | None = None,
    num_masks: int = 4,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
    gather: bool = False,
) -> dict[str, float]:
    r"""Per-datum exact LML, MPT estimate ± s.e., pseudo-likelihood and fixed-rate scores.

    Args:
        model: a Gaussian distribution, a model with ``.marginal()`` returning one (e.g.
            :class:`~pyro_mpt.models.PPCA`), or a model with ``.log_marginal(x)`` and
            ``.conditional_log_prob(x, mask)`` (e.g. :class:`~pyro_mpt.models.BernoulliLatentModel`,
            by quadrature).
        data: ``(N, D)`` rows.
        rates: fixed masking rates to score.
        masks: scheme for the LML estimate (default ``Stratified(2)``, two masks of every size
            per row: unbiased, with a standard error).
        num_masks: replicates of each scheme's draw.
        generator: ``torch.Generator`` for the masks.
        keys: instead of ``generator``, one int64 key per row (see
            :func:`~pyro_mpt.masks.fold_in`), e.g. from a seed and the global row indices; each
            column draws from ``fold_in(keys, column)``.
        gather: the rows are spread over processes (``torch.distributed``): every column is
            computed from all processes' rows (:mod:`pyro_mpt.distributed`), standard errors
            from the gathered per-row values; ``"N"`` is the total. The same row on every
            process.

    Returns:
        A flat dict of floats (see the module docstring for the keys), plus ``"D"`` and ``"N"``.

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> d = MultivariateNormal(torch.zeros(3), torch.eye(3) + 0.5)
        >>> x = d.sample((50,))
        >>> row = evaluate_model(d, x, generator=torch.Generator().manual_seed(0))
        >>> abs(row["mpt"] - row["exact_lml"]) < 4 * row["mpt_se"] + 1e-6
        True
    """
    for rate in rates:
        if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
            raise ValueError(f"rates must be numbers in (0, 1], got {rate!r}")
    scores = _scores(model)
    _check_data(data, scores.size)
    size = data.shape[-1]
    masks = Stratified(2) if masks is None else masks

    def rows(values: torch.Tensor) -> torch.Tensor:
        return gather_rows(values) if gather else values

    def column_keys(column: int):
        return None if keys is None else fold_in(keys, column)

    with torch.no_grad(), limited_threads():
        exact = rows(scores.exact(data))
        row: dict[str, float] = {"N": len(exact), "D": size}
        row["exact_lml"] = exact.mean().item()
        estimate = _estimate(scores, data, masks, num_masks, generator, column_keys(0), gather)
        row["mpt"], row["mpt_se"] = estimate.mean.item(), estimate.stderr.item()
        row["pseudo_ll"] = rows(_pseudo_log_likelihood(scores, data)).mean().item()
        for column, rate in enumerate(rates, start=1):
            # At least two draws so that the standard error exists.
            fixed = _estimate(
                scores, data, FixedRate(rate), max(2, num_masks), generator, column_keys(column),
                gather,
            )
            row[rate_key(rate)] = fixed.mean.item()
            row[rate_key(rate) + "_se"] = fixed.stderr.item()
            row[rate_key(rate) + "_m"] = size_for_rate(rate, size)
    return row


def compare_models(
    models: Mapping[str, Any],
    data: torch.Tensor | None = None,
    rates: Sequence[float] = (0.15, 0.5, 0.85),
    masks: MaskScheme | None = None,
    num_masks: int = 4,
    generator: torch.Generator | None = None,
    condition_fraction: float = 0.9,
) -> list[dict[str, Any]]:
    """:func:`evaluate_model` for every named model on the same data: a list of table rows.

    When every model is a ``gpytorch.models.ExactGP`` the rows are :func:`evaluate_gps`'s (the
    GPs hold their data; ``data`` may be omitted, or given as the common targets). When the
    models are Pyro models with guides (:class:`PyroModel`, or ``(model, guide)`` tuples with
    ``data`` their common arguments) the rows are :func:`evaluate_pyro_models`'s. Both compute
    differences to the best model with paired standard errors (common masks, common draws).

    Example:
        >>> from torch.distributions import MultivariateNormal
        >>> good = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> bad = MultivariateNormal(torch.zeros(2), 9 * torch.eye(2))
        >>> rows = compare_models({"good": good, "bad": bad}, good.sample((20,)))
        >>> [r["model"] for r in rows], rows[0]["exact_lml"] > rows[1]["exact_lml"]
        (['good', 'bad'], True)
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping of name -> model")
    seed = 0 if generator is None else int(generator.initial_seed())
    if all(_is_exact_gp(model) for model in models.values()):
        return evaluate_gps(models, data, condition_fraction, num_masks, seed)
    if any(as_pyro_model(model, data) is not None for model in models.values()):
        return evaluate_pyro_models(models, data, condition_fraction, num_masks, seed=seed)
    if data is None:
        raise ValueError("data is required unless every model is a gpytorch ExactGP")
    return [
        {"model": name, **evaluate_model(model, data, rates, masks, num_masks, generator)}
        for name, model in models.items()
    ]


def _is_exact_gp(model: Any) -> bool:
    try:
        from gpytorch.models import ExactGP
    except ImportError:  # pragma: no cover - gpytorch is a dependency
        return False
    return isinstance(model, ExactGP)


def _gp_output(model, data: torch.Tensor | None):
    if model.train_inputs is None or model.train_targets is None:
        raise ValueError("every ExactGP must hold its training data (set_train_data)")
    target = model.train_targets if data is None else data
    if target.shape != model.train_targets.shape:
        raise ValueError(
            f"data must have the GPs' target shape {tuple(model.train_targets.shape)}, got "
            f"{tuple(target.shape)}"
        )
    model.train()
    model.likelihood.train()
    return model(*model.train_inputs), target


def gp_pointwise_loo(model, data: torch.Tensor | None = None) -> torch.Tensor:
    r"""Exact leave-one-out log predictive densities :math:`\log p(y_i \mid \mathbf y_{-i})`
    of an ``ExactGP`` (its training data, or ``data`` as targets), shape ``(n,)``.

    The conditionals come from :class:`~pyro_mpt.gp.LeavePOutPseudoLikelihood` (GPyTorch's
    Cholesky factor, one mask per point), so their mean is ``LeaveOneOutPseudoLikelihood``.

    Example:
        >>> import gpytorch
        >>> x = torch.linspace(0, 1, 8, dtype=torch.float64).unsqueeze(-1)
        >>> class GP(gpytorch.models.ExactGP):
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(
        ...             torch.zeros(x.shape[:-1], dtype=x.dtype),
        ...             gpytorch.kernels.RBFKernel().double()(x))
        >>> gp = GP(x, torch.sin(6 * x[:, 0]), gpytorch.likelihoods.GaussianLikelihood().double())
        >>> loo = gpytorch.mlls.LeaveOneOutPseudoLikelihood(gp.likelihood, gp)
        >>> elpd_i = gp_pointwise_loo(gp)
        >>> torch.allclose(elpd_i.mean(), loo(gp(x), gp.train_targets))
        True
    """
    from .gp import LeavePOutPseudoLikelihood

    with torch.no_grad():
        output, target = _gp_output(model, data)
        n = target.shape[-1]
        if target.dim() != 1:
            raise ValueError("gp_pointwise_loo needs a single-output, unbatched GP")
        loo = LeavePOutPseudoLikelihood(model.likelihood, model, rate=1 / n)
        eye = torch.eye(n, dtype=torch.bool, device=target.device)
        mean, var = loo.conditionals(output, target, eye)
        return normal_log_prob(target - mean.diagonal(), var.diagonal(),
                               torch.ones(n, dtype=torch.bool, device=target.device))


def evaluate_gps(
    models: Mapping[str, Any],
    data: torch.Tensor | None = None,
    condition_fraction: float = 0.9,
    num_masks: int = 4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    r"""Comparison rows for exact GPs on one data set, with standard errors of differences.

    Every model is scored on the same masks (one ``torch.Generator`` seeded with ``seed`` per
    model), so CLML differences are paired. Columns (totals over the n points, nats): ``lml``
    (exact, also ``exact_lml``), ``clml`` ± ``clml_se``, ``elpd_loo`` ± ``elpd_loo_se``,
    ``pseudo_ll``, and for each of ``lml``, ``clml``, ``elpd_loo`` the difference to the best
    model ``*_diff`` with its standard error ``*_dse`` (``*_dse_unpaired`` for comparison;
    ``pyro_mpt._scores``). Rows are ordered as given; ``rank`` is the position by
    ``elpd_loo`` (as ``arviz_stats.compare``).

    Args:
        models: name -> ``gpytorch.models.ExactGP`` (with its likelihood and training data).
        data: targets shared by every GP (default: each GP's ``train_targets``).
        condition_fraction: c of the CLML (fraction of the data conditioned on).
        num_masks: masks of every size 1..p (at least 2, for a standard error).
        seed: seed of the common masks.
    """
    from .gp import ConditionalMarginalLogLikelihood

    if num_masks < 2:
        raise ValueError(f"num_masks must be at least 2 for a standard error, got {num_masks}")
    rows, scores, draws = [], {}, []
    with torch.no_grad(), limited_threads():
        for name, model in models.items():
            output, target = _gp_output(model, data)
            clml = ConditionalMarginalLogLikelihood(
                model.likelihood, model, condition_fraction, "masked", num_masks,
                generator=torch.Generator().manual_seed(seed),
            )
            draw, terms = clml.contributions(output, target)
            draws.append(draw)
            elpd_i = gp_pointwise_loo(model, data)
            scores[name] = {
                "lml": Score.exact(model.likelihood(output).log_prob(target)),
                "clml": Score.from_draw(draw, terms, "exact"),
                "elpd_loo": Score.from_pointwise(elpd_i, "exact"),
            }
            rows.append({"model": name, "n": elpd_i.numel(),
                         "clml_held_out": clml.held_out_size(elpd_i.numel())})
        if any(not torch.equal(d.masks, draws[0].masks) for d in draws):
            raise ValueError("the GPs do not share their masks: give them the same data size")
        add_differences(rows, scores, ("lml", "clml", "elpd_loo"))
        for row in rows:
            row["exact_lml"], row["pseudo_ll"] = row["lml"], row["elpd_loo"]
            row["lml_method"] = row["clml_method"] = row["loo_method"] = "exact"
        rank_rows(rows, ("elpd_loo",))
    return rows


def as_dataframe(rows: Sequence[Mapping[str, Any]]):
    """Rows of :func:`compare_models` as a ``pandas.DataFrame`` indexed by model.

    Example:
        >>> as_dataframe([{"model": "a", "exact_lml": -1.0}]).loc["a", "exact_lml"]
        np.float64(-1.0)
    """
    import pandas as pd

    return pd.DataFrame(list(rows)).set_index("model")


def plot_comparison(rows: Sequence[Mapping[str, Any]], path=None, columns: Sequence[str] | None
                    = None):
    """Scores of :func:`compare_models` rows with ± one standard error bars, one panel per
    column (default: every score column the rows have); saved to ``path``
    (PNG) when given. Returns the figure."""
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows must contain at least one row")
    if columns is None:
        # lml and elpd_loo, where rows have them, repeat exact_lml and pseudo_ll.
        keys = ("lml", "elbo", "mpt", "clml", "elpd_loo") if "lml" in rows[0] else (
            "exact_lml", "mpt", "pseudo_ll")
        columns = [key for key in keys if any(row.get(key) is not None for row in rows)]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.2), squeeze=False)
    names = [str(row["model"]) for row in rows]
    for ax, key in zip(axes[0], columns, strict=True):
        values = [math.nan if row.get(key) is None else row[key] for row in rows]
        errors = [row.get(key + "_se") or 0.0 for row in rows]
        ax.errorbar(values, range(len(rows)), xerr=errors, fmt="o", capsize=3)
        ax.set_yticks(range(len(rows)), names)
        ax.set_title(key)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def format_table(rows: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """Rows of :func:`compare_models` as a Markdown table (per-datum values, ± one s.e.).

    Example:
        >>> print(format_table([{"model": "a", "exact_lml": -1.0, "mpt": -1.01, "mpt_se": 0.02,
        ...                      "pseudo_ll": -0.9}]))
        | model | exact LML | cumulative MPT | m = 1 (pseudo-LL) |
        |---|---|---|---|
        | a | -1.000 | -1.010 ± 0.020 | -0.900 |
    """
    if not rows:
        raise ValueError("rows must contain at least one row")
    if "clml" in rows[0]:
        return _format_gp_table(rows, digits)
    rates = [key for key in rows[0] if key.startswith("rate_") and key.endswith("%")]
    header = ["model", "exact LML", "cumulative MPT", "m = 1 (pseudo-LL)"]
    header += [f"fixed {key[5:]}" for key in rates]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def with_se(row, key) -> str:
        se = row.get(key + "_se")
        return number(row.get(key)) + ("" if se is None else f" ± {se:.{digits}f}")

    for row in rows:
        cells = [str(row.get("model", "")), number(row.get("exact_lml")), with_se(row, "mpt"),
                 number(row.get("pseudo_ll"))]
        cells += [with_se(row, key) for key in rates]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# How a column was estimated, when it is not exact (see :mod:`pyro_mpt.evaluate_pyro`).
_TAGS = {"importance": "IS", "mpt": "MPT", "snis": "SNIS", "psis": "PSIS"}


def _format_gp_table(rows: Sequence[Mapping[str, Any]], digits: int) -> str:
    """:func:`evaluate_gps` and :func:`evaluate_pyro_models` rows: totals ± s.e. (tagged with
    the estimator when it is not exact: IS, MPT, SNIS, PSIS) and the difference to the best
    model ± its paired s.e.; columns no row has are left out."""
    first = rows[0]

    def cell(value, se=None, method=None) -> str:
        if value is None:
            return "n/a"
        text = f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se else "")
        return text + (f" ({_TAGS[method]})" if method in _TAGS else "")

    clml = "CLML"
    if all(row["clml_held_out"] == first["clml_held_out"] and row["n"] == first["n"]
           for row in rows):
        clml = f"CLML (p = {first['clml_held_out']} of {first['n']})"
    columns = [("LML", "lml"), ("ELBO", "elbo"), ("MPT", "mpt"), (clml, "clml"),
               ("elpd LOO", "elpd_loo")]
    columns = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    header = ["model"]
    for title, _ in columns:
        header += [title, f"Δ {title.split(' (')[0]} ± dse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["model"])]
        for _, key in columns:
            cells.append(cell(row.get(key), row.get(key + "_se"), row.get(key + "_method")))
            cells.append(cell(row.get(key + "_diff"), row.get(key + "_dse")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
