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

**Pyro models with local latents** (a VAE, the Bernoulli latent model; no hand-written
conditionals needed): :func:`mpt_log_marginal` is the masked pre-training estimate of
:math:`\log p(x_n)` per row ± s.e. through :class:`~pyro_mpt.infer.MaskedPretrainingELBO`'s own
self-normalised importance sampling, :func:`importance_log_marginal` plain importance sampling
with the guide as proposal; for the evidence itself use the latter
(:mod:`pyro_mpt.infer.evidence` says why, with measurements).

**Pyro models with guides** (:class:`PyroModel`, :func:`evaluate_pyro_models`): the same columns
and differences for the N observations of one observed site, plus the ELBO of the guide, with
exact LML from the model's ``log_marginal`` and exact LOO, CLML and MPT from a Gaussian observed
site, else PSIS-LOO from guide draws (``arviz_stats.loo_approximate_posterior``). Measured on
scikit-learn's diabetes data (N = 442, Bayesian linear regression on 3 features vs all 10,
type-II ML hyperparameters, 4 masks per size): the CLML difference has a paired standard error
of 0.25-0.29 nats against 0.83-1.04 unpaired, the LOO difference 5.1 against 18.8. The ELBO
gains from common draws only when the guides' noise is shared (same structure): for guides
over different weight vectors the paired and unpaired errors are about equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch

from .distributed import gather_rows
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
    if any(_as_pyro_model(model, data) is not None for model in models.values()):
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
    model), so CLML differences are paired. Columns (totals over the n points, nats):
    ``exact_lml``, ``clml`` ± ``clml_se``, ``elpd_loo`` ± ``elpd_loo_se``, ``pseudo_ll``, and
    for each of ``exact_lml``, ``clml``, ``elpd_loo`` the difference to the best model
    ``*_diff`` with its standard error ``*_dse`` (``clml_dse_unpaired`` for comparison). Rows
    are ordered as given; ``rank`` is the position by ``elpd_loo`` (as ``arviz_stats.compare``).

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
    rows, draws, pointwise, clml_terms = [], [], {}, {}
    with torch.no_grad(), limited_threads():
        for name, model in models.items():
            output, target = _gp_output(model, data)
            clml = ConditionalMarginalLogLikelihood(
                model.likelihood, model, condition_fraction, "masked", num_masks,
                generator=torch.Generator().manual_seed(seed),
            )
            draw, terms = clml.contributions(output, target)
            draws.append(draw)
            estimate = draw.estimate(terms, summed=True)
            elpd_i = gp_pointwise_loo(model, data)
            n = elpd_i.numel()
            pointwise[name], clml_terms[name] = elpd_i, terms
            rows.append({
                "model": name,
                "n": n,
                "exact_lml": model.likelihood(output).log_prob(target).item(),
                "clml": estimate.mean.item(),
                "clml_se": estimate.stderr.item(),
                "clml_held_out": clml.held_out_size(n),
                "elpd_loo": elpd_i.sum().item(),
                "elpd_loo_se": (n * elpd_i.var(unbiased=False)).sqrt().item(),
                "pseudo_ll": elpd_i.sum().item(),
            })
        if any(not torch.equal(d.masks, draws[0].masks) for d in draws):
            raise ValueError("the GPs do not share their masks: give them the same data size")
        draw = draws[0]
        best = {key: max(rows, key=lambda r, key=key: r[key])
                for key in ("exact_lml", "clml", "elpd_loo")}
        for row in rows:
            name = row["model"]
            row["exact_lml_diff"] = best["exact_lml"]["exact_lml"] - row["exact_lml"]
            row["exact_lml_dse"] = 0.0
            reference = best["clml"]["model"]
            paired = draw.estimate(clml_terms[reference] - clml_terms[name], summed=True)
            row["clml_diff"] = paired.mean.item()
            row["clml_dse"] = paired.stderr.item()
            row["clml_dse_unpaired"] = (
                0.0 if name == reference
                else math.hypot(row["clml_se"], best["clml"]["clml_se"])
            )
            difference = pointwise[best["elpd_loo"]["model"]] - pointwise[name]
            row["elpd_loo_diff"] = difference.sum().item()
            row["elpd_loo_dse"] = (
                difference.numel() * difference.var(unbiased=False)
            ).sqrt().item()
        order = sorted(rows, key=lambda r: -r["elpd_loo"])
        for rank, row in enumerate(order):
            row["rank"] = rank
    return rows


class PyroModel(NamedTuple):
    r"""A fitted Pyro model for :func:`compare_models`: the model, its guide and its arguments.

    Attributes:
        model: a Pyro model with **one** observed site whose value (through ``args``/``kwargs``)
            is the data; its observations are the entries of that site (batch and event
            dimensions together, e.g. the N targets of a regression observed as one event).
        guide: the fitted guide (an autoguide or a function with the model's latent sites), or
            ``None`` for a model without latent sites (e.g. a collapsed Gaussian model).
        args, kwargs: the model's (and guide's) arguments, including the data. Different models
            may take different inputs (feature subsets) but must observe the same values.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     pyro.sample("y", dist.Normal(torch.zeros(len(y)), 1.0).to_event(1), obs=y)
        >>> PyroModel(model, args=(torch.zeros(3),)).guide is None
        True
    """

    model: Callable
    guide: Callable | None = None
    args: tuple = ()
    kwargs: Mapping[str, Any] = {}


def _as_pyro_model(entry: Any, data: Any) -> PyroModel | None:
    """``entry`` as a :class:`PyroModel` (``data``: default arguments); None if not Pyro."""
    if isinstance(entry, PyroModel):
        return entry if entry.args or data is None else entry._replace(args=_as_args(data))
    if isinstance(entry, tuple) and 2 <= len(entry) <= 4 and callable(entry[0]) and not (
        isinstance(entry[0], torch.distributions.Distribution)
    ):
        model, guide, *rest = entry
        args = tuple(rest[0]) if rest else (_as_args(data) if data is not None else ())
        return PyroModel(model, guide, args, dict(rest[1]) if len(rest) > 1 else {})
    return None


def _as_args(data: Any) -> tuple:
    return tuple(data) if isinstance(data, (tuple, list)) else (data,)


class _PyroScores(NamedTuple):
    """What :func:`evaluate_pyro_models` computed for one model before the differences."""

    row: dict[str, Any]
    values: torch.Tensor  # the observed values, flattened (N,)
    marginal: Any  # the Gaussian marginal of the observations, or None
    elbo: torch.Tensor | None  # per draw
    pointwise_loo: torch.Tensor | None  # (N,)


def _observed_site(trace, name: str) -> dict:
    from .inference_data import _is_observed

    sites = [site for site in trace.nodes.values() if _is_observed(site)]
    if len(sites) != 1:
        found = [site["name"] for site in sites]
        raise ValueError(f"model {name!r} must have exactly one observed site, found {found}")
    site = sites[0]
    if site["mask"] is not None:
        raise ValueError(f"model {name!r}: masked observations are not supported here")
    return site


def _gaussian_marginal(site: dict, has_latents: bool):
    """The observed site's distribution when it is the Gaussian marginal of the observations."""
    from .infer.site_terms import is_collapsed_gaussian

    fn = site["fn"]
    if has_latents or fn.batch_shape != torch.Size() or len(fn.event_shape) != 1:
        return None
    return fn if is_collapsed_gaussian(fn) else None


def _pointwise_log_lik(site: dict) -> torch.Tensor:
    """Log-density of every observation of a site that factorises over them, flattened."""
    from .infer.site_terms import is_factorised, per_dimension_log_prob

    fn, value = site["fn"], site["value"]
    if not is_factorised(fn):
        raise ValueError(
            f"observed site {site['name']!r} ({type(fn).__name__}) does not factorise over its "
            "observations given the latents: PSIS-LOO needs one log-likelihood per observation"
        )
    if len(fn.event_shape) > 0:
        log_lik = per_dimension_log_prob(fn, value)
        log_lik = log_lik.expand(*fn.batch_shape, log_lik.shape[-1])
    else:
        log_lik = fn.log_prob(value).expand(fn.batch_shape)
    return log_lik.reshape(-1)


def _guide_draws(entry: PyroModel, num_draws: int):
    """Per guide draw: the ELBO term log p(y, z) - log q(z), log p(y, z), log q(z), and the
    pointwise log-likelihood (num_draws, N)."""
    import pyro.poutine as poutine

    elbo, log_p, log_q, pointwise = [], [], [], []
    for _ in range(num_draws):
        guide_trace = poutine.trace(entry.guide).get_trace(*entry.args, **entry.kwargs)
        model_trace = poutine.trace(poutine.replay(entry.model, trace=guide_trace)).get_trace(
            *entry.args, **entry.kwargs
        )
        joint, proposal = model_trace.log_prob_sum(), guide_trace.log_prob_sum()
        log_p.append(joint)
        log_q.append(proposal)
        elbo.append(joint - proposal)
        pointwise.append(_pointwise_log_lik(_observed_site(model_trace, "")))
    return torch.stack(elbo), torch.stack(log_p), torch.stack(log_q), torch.stack(pointwise)


def _psis_loo(pointwise: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor):
    """PSIS-LOO for draws from an approximate posterior q: the pointwise elpd ``(N,)`` and
    ``arviz_stats.loo_approximate_posterior``'s result (Magnusson et al., 2019)."""
    import arviz_stats
    import xarray as xr
    from arviz_base import from_dict

    def array(tensor):
        return tensor.detach().cpu().double().numpy()[None]

    tree = from_dict({"log_likelihood": {"y": array(pointwise)}}, dims={"y": ["obs"]})
    sample_dims = ["chain", "draw"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k warnings are reported in the row instead
        result = arviz_stats.loo_approximate_posterior(
            tree, xr.DataArray(array(log_p), dims=sample_dims),
            xr.DataArray(array(log_q), dims=sample_dims), pointwise=True,
        )
    return torch.as_tensor(result.elpd_i.values, dtype=pointwise.dtype), result


def _score_pyro_model(name, entry, clml_draw, mpt_draw, num_draws, seed) -> _PyroScores:
    import pyro.poutine as poutine

    from .inference_data import _is_latent

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trace = poutine.trace(entry.model).get_trace(*entry.args, **entry.kwargs)
        site = _observed_site(trace, name)
        values = site["value"].detach()
        has_latents = any(_is_latent(s) for s in trace.nodes.values())
        marginal = _gaussian_marginal(site, has_latents)
        n = values.numel()
        row: dict[str, Any] = {"model": name, "n": n,
                               "clml_held_out": int(clml_draw.strata.max()) + 1}
        log_marginal = getattr(entry.model, "log_marginal", None)
        if callable(log_marginal):
            row["exact_lml"] = float(log_marginal(*entry.args, **entry.kwargs))
        elif not has_latents:
            row["exact_lml"] = float(trace.log_prob_sum())
        else:
            row["exact_lml"] = None
        elbo = pointwise_loo = None
        row.update(elbo=None, elbo_se=None, clml=None, clml_se=None, mpt=None, mpt_se=None,
                   elpd_loo=None, elpd_loo_se=None, loo_method=None, pareto_k_max=None)
        if marginal is not None:
            # No latents: the ELBO is log p(y) itself, and every masked score is exact per mask.
            elbo = float(trace.log_prob_sum()) * torch.ones(num_draws, dtype=values.dtype)
            for key, draw in (("clml", clml_draw), ("mpt", mpt_draw)):
                terms = masked_conditional_log_prob(marginal, values, draw.masks).sum(-1)
                estimate = draw.estimate(terms, summed=True)
                row[key], row[key + "_se"] = estimate.mean.item(), estimate.stderr.item()
                row[key + "_terms"] = terms
            eye = torch.eye(n, dtype=torch.bool, device=values.device)
            pointwise_loo = masked_conditional_log_prob(marginal, values, eye).diagonal()
            row["loo_method"] = "exact"
        elif not has_latents:
            # Independent observations without latents: p(y_i | y_-i) = p(y_i).
            elbo = float(trace.log_prob_sum()) * torch.ones(num_draws, dtype=values.dtype)
            pointwise_loo = _pointwise_log_lik(site)
            row["loo_method"] = "exact"
        elif entry.guide is not None:
            elbo, log_p, log_q, pointwise = _guide_draws(entry, num_draws)
            pointwise_loo, result = _psis_loo(pointwise, log_p, log_q)
            row["loo_method"] = "psis"
            row["pareto_k_max"] = float(result.pareto_k.max())
        if elbo is not None:
            row["elbo"] = elbo.mean().item()
            row["elbo_se"] = (elbo.std() / math.sqrt(len(elbo))).item()
        if pointwise_loo is not None:
            row["elpd_loo"] = pointwise_loo.sum().item()
            row["elpd_loo_se"] = (n * pointwise_loo.var(unbiased=False)).sqrt().item()
        row["pseudo_ll"] = row["elpd_loo"]
    return _PyroScores(row, values.reshape(-1), marginal, elbo, pointwise_loo)


def evaluate_pyro_models(
    models: Mapping[str, Any],
    data: Any = None,
    condition_fraction: float = 0.9,
    num_masks: int = 4,
    num_draws: int = 256,
    seed: int = 0,
) -> list[dict[str, Any]]:
    r"""Comparison rows for Pyro models of one data set, with paired standard errors of differences.

    Each model is a :class:`PyroModel` (or a tuple ``(model, guide)``, ``(model, guide, args)``
    or ``(model, guide, args, kwargs)``; ``data`` gives the arguments of entries without any).
    Every model must observe the same N values at its one observed site. Columns are totals over
    the N observations (nats), as in :func:`evaluate_gps`:

    - ``exact_lml``: :math:`\log p(\mathbf y)` from the model's own ``log_marginal(*args)`` (e.g.
      :class:`~pyro_mpt.models.BayesianLinearRegression`, collapsed or not), else the
      log-density of a model without latents; ``None`` otherwise (no estimate yet).
    - ``elbo`` ± ``elbo_se``: the mean of ``num_draws`` single-particle Trace_ELBO terms
      :math:`\log p(\mathbf y, z) - \log q(z)`, :math:`z \sim q` (exactly
      :math:`\log p(\mathbf y)` for a model without latents).
    - ``clml`` ± ``clml_se``: :math:`\mathbb E_H \log p(\mathbf y_H \mid \mathbf y_C)` with a
      fraction ``condition_fraction`` = c **conditioned on** (Lotfi et al.'s c = 0.9) and
      :math:`p = \max(1, \lfloor (1 - c) N \rfloor)` held out; the masked estimator of
      :class:`~pyro_mpt.gp.ConditionalMarginalLogLikelihood` (``num_masks`` masks of every size
      1..p). ``mpt`` ± ``mpt_se``: the stratified masked pre-training estimate of
      :math:`\log p(\mathbf y)` (``num_masks`` masks of every size 1..N), which the exact
      ``exact_lml`` checks. Both need the Gaussian marginal of the observations (``None``
      otherwise).
    - ``elpd_loo`` ± ``elpd_loo_se``: leave-one-out :math:`\sum_i \log p(y_i \mid
      \mathbf y_{-i})`, exact from the Gaussian marginal (``loo_method = "exact"``), else
      PSIS-LOO from ``num_draws`` guide draws corrected for the guide not being the posterior
      (``arviz_stats.loo_approximate_posterior``, ``loo_method = "psis"``, ``pareto_k_max``);
      ``pseudo_ll`` is the same number (the m = 1 masked score).
    - ``*_diff`` ± ``*_dse`` for ``exact_lml, elbo, clml, mpt, elpd_loo``: the difference to the
      best model by that column and its standard error from **paired** differences: the masks
      are drawn once and shared by every model, guide draws use the same seed, and LOO pairs
      observations as ``arviz_stats.compare`` does. ``*_dse_unpaired`` is
      :math:`\sqrt{se_a^2 + se_b^2}`, what independent estimates would give.

    ``rank`` orders by ``elpd_loo`` (as ``arviz_stats.compare``), else by ``exact_lml``.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro_mpt.models import BayesianLinearRegression
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
        >>> y = x @ torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) + 0.3 * torch.randn(
        ...     60, generator=gen, dtype=torch.float64)
        >>> models = {"all": PyroModel(BayesianLinearRegression(3), None, (x, y)),
        ...           "first": PyroModel(BayesianLinearRegression(1), None, (x[:, :1], y))}
        >>> rows = evaluate_pyro_models(models)
        >>> [row["rank"] for row in rows], rows[1]["clml_dse"] < rows[1]["clml_dse_unpaired"]
        ([0, 1], True)
    """
    import pyro.poutine as poutine

    from .gp.conditional_marginal_log_likelihood import held_out_size, stratified_clml_masks

    if num_masks < 2:
        raise ValueError(f"num_masks must be at least 2 for a standard error, got {num_masks}")
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    entries = {}
    for name, entry in models.items():
        pyro_model = _as_pyro_model(entry, data)
        if pyro_model is None:
            raise TypeError(
                f"model {name!r} is not a PyroModel or (model, guide[, args[, kwargs]]) tuple; "
                "do not mix Pyro models with distributions or GPs"
            )
        entries[name] = pyro_model
    scores: dict[str, _PyroScores] = {}
    clml_draw = mpt_draw = None
    with torch.no_grad(), limited_threads():
        for name, entry in entries.items():
            if clml_draw is None:
                # Common random numbers: one set of masks, drawn from the first model's data.
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    trace = poutine.trace(entry.model).get_trace(*entry.args, **entry.kwargs)
                trace_values = _observed_site(trace, name)["value"]
                n = trace_values.numel()
                generator = torch.Generator().manual_seed(seed)
                dtype = trace_values.dtype
                clml_draw = stratified_clml_masks(
                    held_out_size(condition_fraction, n), n, (), num_masks, generator, dtype)
                mpt_draw = stratified_clml_masks(n, n, (), num_masks, generator, dtype)
            scores[name] = _score_pyro_model(name, entry, clml_draw, mpt_draw, num_draws, seed)
        first = next(iter(scores.values()))
        for name, score in scores.items():
            if not torch.equal(score.values, first.values):
                raise ValueError(
                    f"model {name!r} observes different data from {next(iter(scores))!r}: "
                    "compare models on the same observations"
                )
        rows = [score.row for score in scores.values()]
        _paired_differences(rows, scores, {"clml": clml_draw, "mpt": mpt_draw})
    return rows


def _paired_differences(rows, scores, draws) -> None:
    """``*_diff``, ``*_dse`` (paired) and ``*_dse_unpaired`` to the best model of each column."""
    for key in ("exact_lml", "elbo", "clml", "mpt", "elpd_loo"):
        available = [row for row in rows if row[key] is not None]
        best = max(available, key=lambda r: r[key]) if available else None
        for row in rows:
            if best is None or row[key] is None:
                row[key + "_diff"] = row[key + "_dse"] = row[key + "_dse_unpaired"] = None
                continue
            row[key + "_diff"] = best[key] - row[key]
            if key == "exact_lml":
                row[key + "_dse"] = row[key + "_dse_unpaired"] = 0.0
                continue
            reference, this = scores[best["model"]], scores[row["model"]]
            if key in draws:
                paired = draws[key].estimate(
                    best[key + "_terms"] - row[key + "_terms"], summed=True).stderr.item()
            elif key == "elbo":
                difference = reference.elbo - this.elbo
                paired = (difference.std() / math.sqrt(len(difference))).item()
            else:
                difference = reference.pointwise_loo - this.pointwise_loo
                paired = (difference.numel() * difference.var(unbiased=False)).sqrt().item()
            row[key + "_dse"] = paired
            row[key + "_dse_unpaired"] = (
                0.0 if row is best else math.hypot(row[key + "_se"], best[key + "_se"]))
    for row in rows:
        for key in ("clml", "mpt"):
            row.pop(key + "_terms", None)
    ranked = sorted(rows, key=lambda r: -(r["elpd_loo"] if r["elpd_loo"] is not None
                                          else r["exact_lml"] if r["exact_lml"] is not None
                                          else -math.inf))
    for rank, row in enumerate(ranked):
        row["rank"] = rank


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
    column (default: every column that has a ``_se``, plus ``exact_lml``); saved to ``path``
    (PNG) when given. Returns the figure."""
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows must contain at least one row")
    if columns is None:
        columns = [key for key in ("exact_lml", "elbo", "mpt", "clml", "elpd_loo", "pseudo_ll")
                   if any(row.get(key) is not None for row in rows)]
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


def _format_gp_table(rows: Sequence[Mapping[str, Any]], digits: int) -> str:
    """:func:`evaluate_gps` and :func:`evaluate_pyro_models` rows: totals ± s.e. and the
    difference to the best model ± its (paired) s.e.; columns no row has are left out."""
    first = rows[0]

    def number(value, se=None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    columns = [
        ("exact LML", "exact_lml", False),
        ("ELBO", "elbo", True),
        ("MPT (stratified)", "mpt", True),
        (f"CLML (p = {first['clml_held_out']} of {first['n']})", "clml", True),
        ("elpd LOO", "elpd_loo", True),
    ]
    columns = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    header = ["model"]
    for title, key, _ in columns:
        header += [title, "Δ LML" if key == "exact_lml" else f"Δ {title.split(' (')[0]} ± dse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["model"])]
        for _, key, with_se in columns:
            cells.append(number(row.get(key), row.get(key + "_se") if with_se else None))
            cells.append(number(row.get(key + "_diff"),
                                row.get(key + "_dse") if key != "exact_lml" else None))
        if row.get("loo_method") == "psis":
            cells[-2] += " (PSIS)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
