r"""Comparison rows for fitted Pyro models of one data set (:func:`evaluate_pyro_models`).

Every model observes the same :math:`n` values :math:`\mathbf y` at its one observed site (rows
hidden by ``poutine.mask`` or ``.mask()`` are not data, and may hold NaN). Columns are totals over
them (nats), each an estimate ± its standard error, with the estimator named in ``*_method``:

.. math::

    \mathrm{LML} = \log p(\mathbf y), \quad
    \mathrm{CLML} = \mathbb E_H \log p(\mathbf y_H \mid \mathbf y_C), \quad
    \mathrm{MPT} = \sum_{t} S(\mathbf y; t) = \log p(\mathbf y), \quad
    \mathrm{elpd}_{\mathrm{LOO}} = \sum_i \log p(y_i \mid \mathbf y_{-i}),

with :math:`H` a uniformly random set of :math:`p = \max(1, \lfloor (1 - c) n \rfloor)` of the n
values and C the others (a fraction c **conditioned on**, Lotfi et al.'s c = 0.9), and the ELBO
:math:`\mathbb E_q[\log p(\mathbf y, z) - \log q(z)]`. Which estimator fills which column
depends on the latents (a latent is *local* when it sits in every plate of the observed rows,
:func:`pyro_mpt.infer.sites.local_latents`; every other latent is *global*):

* **no latents**: LML and ELBO exact (the site's log-density); MPT and CLML on the common
  masks with exact conditionals (a Gaussian site) or the marginals (independent values);
* **local latents only** (rows independent given the parameters): LML from the model's own
  ``log_marginal`` when it has one (``exact``), else the MPT estimate (``mpt``): stratified masks
  per row, each conditional :math:`p(x_j \mid x_R)` by self-normalised importance sampling
  (SNIS) with the Laplace proposals of :class:`~pyro_mpt.infer.MaskedPretrainingELBO`
  (:meth:`~pyro_mpt.infer.MaskedPretrainingELBO.site_estimates`); CLML by the same SNIS on the
  common masks (``snis``); the ELBO from guide draws when a guide is given;
* **global latents** :math:`\theta` **with a guide** q: LML from ``log_marginal`` when there is
  one, else by importance sampling, :math:`\log \frac1S \sum_s p(\mathbf y, \theta_s) /
  q(\theta_s)`, :math:`\theta_s \sim q` (``importance``, delta-method standard error); CLML by
  SNIS over the same draws, weights :math:`p(\theta_s)\, p(\mathbf y_C \mid \theta_s) /
  q(\theta_s)` (``snis``); the ELBO as the mean of :math:`\log p(\mathbf y, \theta_s) - \log
  q(\theta_s)`; no MPT;
* **global and local latents**: LML from ``log_marginal`` only; ELBO and PSIS-LOO from the guide.

MPT is not estimated for global latents: a guide fitted to :math:`p(\theta \mid \mathbf y)` is no
proposal for :math:`p(\theta \mid \mathbf y_R)` when most of :math:`\mathbf y` is masked (the
importance-sampled LML is the estimate there). The SNIS conditionals are consistent; their
first-order bias is removed, and what is left, of order 1/K^2 (K particles), the standard errors
(Monte-Carlo over masks, or over importance draws) do not include; ``clml_ess`` reports the
smallest effective sample size over masks.

**Leave-one-out** is over *observations*: the rows of the observed site (its batch entries,
event dimensions summed), or for a site that is one event (a regression's N targets observed
jointly) its entries. Exact from the Gaussian conditionals of a one-event Gaussian site, or the
log-likelihood of independent observations (``exact``); for rows with only local latents the
rows are independent given the parameters, :math:`p(x_r \mid \mathbf x_{-r}) = p(x_r)`, the
per-row MPT estimates (``mpt``); with global latents PSIS-LOO from guide draws corrected for the
guide not being the posterior (``arviz_stats.loo_approximate_posterior``, ``psis``,
``pareto_k_max``). ``pseudo_ll`` is the same number.

**Common random numbers.** Every model is scored on the same CLML masks (drawn once over the n
values and laid out on each model's rows), the same keyed MPT masks and importance particles
(``MaskedPretrainingELBO(seed=...)``) and guide draws from the same seed, so the difference of
two models has a paired standard error (``pyro_mpt._scores``).

References:
    S. Lotfi, P. Izmailov, G. Benton, M. Goldblum, A. G. Wilson, "Bayesian Model Selection, the
    Marginal Likelihood, and Generalization", ICML 2022.
    M. Magnusson, M. R. Andersen, J. Jonasson, A. Vehtari, "Leave-One-Out Cross-Validation for
    Bayesian Model Comparison in Large Data", AISTATS 2020.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ._scores import Score, add_differences, rank_rows, replicates
from .gaussian import masked_conditional_log_prob
from .masks import MaskSample, MaskScheme, Stratified
from .threads import limited_threads

__all__ = ["PyroModel", "evaluate_pyro_models"]

KEYS = ("lml", "elbo", "clml", "mpt", "elpd_loo")
# Upper bound on masks x particles x values materialised at once by the SNIS CLML.
_CHUNK_ELEMENTS = 2**23


class PyroModel(NamedTuple):
    r"""A fitted Pyro model for :func:`~pyro_mpt.evaluate.compare_models`: the model, its guide
    and its arguments.

    Attributes:
        model: a Pyro model with **one** observed site whose value (through ``args``/``kwargs``)
            is the data: the rows of its batch (a plate), or the entries of one event (e.g. the
            N targets of a regression observed jointly).
        guide: the fitted guide (an autoguide or a function with the model's latent sites), or
            ``None`` for a model without latent sites, or with local latents only (they are
            integrated by importance sampling).
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


def as_pyro_model(entry: Any, data: Any) -> PyroModel | None:
    """``entry`` as a :class:`PyroModel` (``data``: default arguments); None if not Pyro."""
    if isinstance(entry, PyroModel):
        return entry if entry.args or data is None else entry._replace(args=_as_args(data))
    if (
        isinstance(entry, tuple)
        and 2 <= len(entry) <= 4
        and callable(entry[0])
        and not (isinstance(entry[0], torch.distributions.Distribution))
    ):
        model, guide, *rest = entry
        args = tuple(rest[0]) if rest else (_as_args(data) if data is not None else ())
        return PyroModel(model, guide, args, dict(rest[1]) if len(rest) > 1 else {})
    return None


def _as_args(data: Any) -> tuple:
    return tuple(data) if isinstance(data, (tuple, list)) else (data,)


def _no_guide(*args, **kwargs) -> None:
    """The guide of a model without global latents."""


# ------------------------------------------------------------------------ the observed site
class _Observed(NamedTuple):
    """One model's observed site: its values, which rows are data, and its latents."""

    name: str  # the site's name
    site: dict
    values: torch.Tensor  # (n,) the kept entries, rows first
    kept: torch.Tensor  # (*batch) bool: rows that are data
    size: int  # D, the entries of one row (1 without event dimensions)
    local: list[str]
    global_: list[str]
    log_prob: torch.Tensor  # log-density of every kept row (of the event), given the latents

    @property
    def one_event(self) -> bool:
        return self.kept.dim() == 0


def _observe(model_name: str, entry: PyroModel, seed: int) -> _Observed:
    import pyro.poutine as poutine

    from .infer.sites import is_data, local_latents, observed_value, row_mask, unmasked_fn
    from .inference_data import _is_latent

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trace = poutine.trace(entry.model).get_trace(*entry.args, **entry.kwargs)
    sites = [name for name, site in trace.nodes.items() if is_data(site)]
    if len(sites) != 1:
        raise ValueError(f"model {model_name!r} must have exactly one observed site, found {sites}")
    name = sites[0]
    site = trace.nodes[name]
    fn = unmasked_fn(site)
    if fn.event_dim > 1:
        raise ValueError(
            f"model {model_name!r}: observed site {name!r} has {fn.event_dim} event dimensions; "
            "compare_models masks the rightmost one: move the others into plates"
        )
    if not bool((torch.as_tensor(site["scale"]) == 1).all()):
        raise ValueError(
            f"model {model_name!r}: observed site {name!r} is scaled (poutine.scale or a "
            "subsampled plate); compare models on all of their data"
        )
    value = observed_value(name, site)
    batch_shape = value.shape[: value.dim() - fn.event_dim]
    rows = value if fn.event_dim else value.unsqueeze(-1)
    mask = row_mask(site)
    kept = torch.ones(batch_shape, dtype=torch.bool, device=value.device)
    if mask is not None:
        kept = kept & torch.as_tensor(mask, device=value.device)
    if not bool(kept.any()):
        raise ValueError(f"model {model_name!r}: every row of site {name!r} is masked out")
    local = local_latents(trace, [name], None)[name]
    latents = [n for n, s in trace.nodes.items() if _is_latent(s)]
    log_prob = fn.log_prob(value).expand(batch_shape)[kept].detach()
    return _Observed(
        name,
        site,
        rows[kept].reshape(-1).detach(),
        kept,
        rows.shape[-1],
        local,
        [n for n in latents if n not in local],
        log_prob,
    )


class _GivenMasks(MaskScheme):
    """One draw over the n values, laid out on a model's rows (kept rows only): the same CLML
    masks for every model, whatever its rows. A row that the draw leaves unmasked (``empty``)
    gets every entry masked instead, as every row must mask one: its sum is to be dropped."""

    def __init__(self, draw: MaskSample, kept: torch.Tensor, size: int):
        super().__init__()
        num = len(draw.masks)
        masks = torch.zeros(num, *kept.shape, size, dtype=torch.bool)
        masks[:, kept] = draw.masks.reshape(num, -1, size).cpu()
        self.empty = ~masks.any(-1)
        self.masks = masks | self.empty.unsqueeze(-1)
        self.weights = draw.weights.double().cpu().reshape(num, *[1] * kept.dim())
        self.strata = draw.strata.cpu()

    def _draw(self, event_size, row_shape, num_masks, source):
        if self.masks.shape[1:] != (*row_shape, event_size) or num_masks != 1:
            raise ValueError(
                f"the common masks are laid out on rows {tuple(self.masks.shape[1:-1])} of "
                f"{self.masks.shape[-1]} values, got rows {tuple(row_shape)} of {event_size}"
            )
        return self.masks, self.weights.expand(self.empty.shape), self.strata


# --------------------------------------------------------------------------- the estimators
def _elbo_estimate(
    entry: PyroModel, observed: _Observed, masks: MaskScheme, num_masks: int, settings: dict
) -> tuple[MaskSample, torch.Tensor]:
    """:meth:`MaskedPretrainingELBO.site_estimates` of a model without global latents: the draw
    and per-draw masked sums ``(S, *batch)``."""
    from .infer import MaskedPretrainingELBO

    elbo = MaskedPretrainingELBO(
        masks,
        num_masks=num_masks,
        seed=settings["seed"],
        num_importance_samples=settings["num_importance_samples"],
    )
    with warnings.catch_warnings():
        # Keyed draws that fall back to the generator are still common to every model.
        warnings.filterwarnings("ignore", message="MaskedPretrainingELBO\\(seed=...\\)")
        estimates = elbo.site_estimates(entry.model, _no_guide, *entry.args, **entry.kwargs)
    return estimates[observed.name]


def _guide_draws(entry: PyroModel, observed: _Observed, num_draws: int, seed: int):
    """Per guide draw :math:`z_s \\sim q`: :math:`\\log p(\\mathbf y, z_s)`, :math:`\\log
    q(z_s)` and the log-likelihood of every kept entry ``(S, n)``."""
    import pyro.poutine as poutine

    from .infer.site_terms import is_factorised, per_dimension_log_prob
    from .infer.sites import unmasked_fn

    log_p, log_q, entries = [], [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(num_draws):
            guide_trace = poutine.trace(entry.guide).get_trace(*entry.args, **entry.kwargs)
            model_trace = poutine.trace(poutine.replay(entry.model, trace=guide_trace)).get_trace(
                *entry.args, **entry.kwargs
            )
            site = model_trace.nodes[observed.name]
            fn = unmasked_fn(site)
            if not is_factorised(fn):
                raise ValueError(
                    f"observed site {observed.name!r} ({type(fn).__name__}) does not factorise "
                    "over its values given the latents: PSIS-LOO and the CLML need one "
                    "log-likelihood per value"
                )
            per_entry = per_dimension_log_prob(fn, site["value"].nan_to_num())
            per_entry = per_entry.expand(*observed.kept.shape, observed.size)
            entries.append(per_entry[observed.kept].reshape(-1))
            # The observed site's kept values only (rows masked out may hold NaN).
            others = model_trace.log_prob_sum(lambda name, _: name != observed.name)
            log_p.append(others + entries[-1].sum())
            log_q.append(guide_trace.log_prob_sum())
    return torch.stack(log_p), torch.stack(log_q), torch.stack(entries)


def _snis_clml(entries: torch.Tensor, log_weights: torch.Tensor, draw: MaskSample):
    r"""Per mask :math:`\sum_{j \in M} \log \sum_s \bar w_s(R)\, p(y_j \mid \theta_s)` and the
    smallest effective sample size (:mod:`pyro_mpt.infer.site_terms`)."""
    from .infer.site_terms import (
        effective_sample_size,
        importance_log_weights,
        weighted_conditional_log_prob,
    )

    num, n = entries.shape
    chunk = max(1, _CHUNK_ELEMENTS // (num * n))
    terms, ess = [], []
    log_lik = entries.unsqueeze(0)
    for masks in draw.masks.split(chunk):
        log_w = importance_log_weights(log_lik, masks, log_weights)
        ess.append(effective_sample_size(log_w))
        terms.append(weighted_conditional_log_prob(log_w, log_lik, masks).sum(-1))
    return torch.cat(terms), torch.cat(ess).min().item()


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
            tree,
            xr.DataArray(array(log_p), dims=sample_dims),
            xr.DataArray(array(log_q), dims=sample_dims),
            pointwise=True,
        )
    return torch.as_tensor(result.elpd_i.values, dtype=pointwise.dtype), result


def _per_observation(observed: _Observed, entries: torch.Tensor) -> torch.Tensor:
    """Entries ``(..., n)`` summed into observations: rows, or the entries of one event."""
    if observed.one_event:
        return entries
    return entries.reshape(*entries.shape[:-1], -1, observed.size).sum(-1)


def _exact_lml(entry: PyroModel, observed: _Observed) -> float | None:
    """The model's own ``log_marginal(*args)``: a total, or per row (kept rows summed)."""
    log_marginal = getattr(entry.model, "log_marginal", None)
    if not callable(log_marginal):
        return None
    value = torch.as_tensor(log_marginal(*entry.args, **entry.kwargs))
    if value.dim() == 0:
        return value.item() if bool(observed.kept.all()) else None
    if value.shape != observed.kept.shape:
        return None
    return value[observed.kept].sum().item()


def _score(entry: PyroModel, observed: _Observed, clml_draw: MaskSample, settings: dict):
    """The columns of one model (see the module docstring) and its diagnostics."""
    scores: dict[str, Score] = {}
    info: dict[str, Any] = {}
    exact = _exact_lml(entry, observed)
    if not observed.global_:
        # Rows independent given the parameters: the ELBO's per-row conditionals.
        method = "mpt" if observed.local else "exact"
        draw, sums = _elbo_estimate(entry, observed, Stratified(), settings["num_masks"], settings)
        scores["mpt"] = Score.from_draw(draw, sums, "snis" if observed.local else "exact")
        layout = _GivenMasks(clml_draw, observed.kept, observed.size)
        _, sums_c = _elbo_estimate(entry, observed, layout, 1, settings)
        sums_c = torch.where(layout.empty.to(sums_c.device), 0.0, sums_c)
        scores["clml"] = Score.from_draw(
            clml_draw,
            sums_c.reshape(len(sums_c), -1).sum(-1),
            "snis" if observed.local else "exact",
        )
        if not observed.local:
            scores["lml"] = scores["elbo"] = Score.exact(observed.log_prob.sum())
        else:
            scores["lml"] = (
                Score.exact(exact) if exact is not None else scores["mpt"]._replace(method="mpt")
            )
        if observed.one_event and not observed.local:
            scores["elpd_loo"] = Score.from_pointwise(_exact_loo(observed), "exact")
        elif not observed.local:
            scores["elpd_loo"] = Score.from_pointwise(observed.log_prob, "exact")
        else:
            per_row = draw.estimate(sums, summed=True).mean
            scores["elpd_loo"] = Score.from_pointwise(per_row[observed.kept], method)
    elif exact is not None:
        scores["lml"] = Score.exact(exact)
    if entry.guide is not None and (observed.global_ or observed.local):
        log_p, log_q, entries = _guide_draws(
            entry, observed, settings["num_draws"], settings["seed"]
        )
        scores["elbo"] = Score.from_draw(
            replicates(len(log_p), log_p.dtype), log_p - log_q, "draws"
        )
        if observed.global_:
            pointwise, result = _psis_loo(_per_observation(observed, entries), log_p, log_q)
            scores["elpd_loo"] = Score.from_pointwise(pointwise, "psis")
            info["pareto_k_max"] = float(result.pareto_k.max())
        if observed.global_ and not observed.local:
            if exact is None:
                scores["lml"] = Score.from_log_weights(log_p - log_q)
            # The latents' log prior (and any factor) over the guide's log-density.
            log_weights = log_p - entries.sum(-1) - log_q
            terms, info["clml_ess"] = _snis_clml(entries, log_weights, clml_draw)
            scores["clml"] = Score.from_draw(clml_draw, terms, "snis")
    return scores, info


def _exact_loo(observed: _Observed) -> torch.Tensor:
    """Exact leave-one-out of a one-event site without latents, per entry."""
    from .infer.site_terms import is_collapsed_gaussian, per_dimension_log_prob
    from .infer.sites import unmasked_fn

    fn = unmasked_fn(observed.site)
    values = observed.values
    if is_collapsed_gaussian(fn):
        eye = torch.eye(len(values), dtype=torch.bool, device=values.device)
        return masked_conditional_log_prob(fn, values, eye).diagonal()
    return per_dimension_log_prob(fn, values).reshape(-1)


def evaluate_pyro_models(
    models: Mapping[str, Any],
    data: Any = None,
    condition_fraction: float = 0.9,
    num_masks: int = 4,
    num_draws: int = 256,
    seed: int = 0,
    num_importance_samples: int = 256,
) -> list[dict[str, Any]]:
    r"""Comparison rows for Pyro models of one data set, with paired standard errors of
    differences (see the module docstring for every column's estimator).

    Args:
        models: name -> :class:`PyroModel` (or a tuple ``(model, guide)``, ``(model, guide,
            args)`` or ``(model, guide, args, kwargs)``; ``data`` gives the arguments of entries
            without any). Every model must observe the same values at its one observed site.
        condition_fraction: c, the fraction of the n values the CLML **conditions on**.
        num_masks: masks of every size (CLML: sizes 1..p over the n values; MPT: sizes 1..D of
            every row), at least 2 for a standard error.
        num_draws: guide draws (ELBO, PSIS-LOO, importance-sampled LML, SNIS CLML).
        seed: seed of every common random number (masks, importance particles, guide draws).
        num_importance_samples: K, importance particles per row and mask for local latents
            (fixed: the draws are keyed by ``seed``, common to every model).

    Returns:
        One dict per model, in the order given: ``model``, ``n`` (values), ``lml``,
        ``elbo``, ``clml``, ``mpt``, ``elpd_loo`` (each with ``_se``, ``_method``, ``_diff``
        to the best model by that column, ``_dse`` paired and ``_dse_unpaired``),
        ``exact_lml`` (the LML when exact, else ``None``), ``pseudo_ll`` (= ``elpd_loo``),
        ``clml_held_out`` (p), ``loo_method``, the diagnostics ``pareto_k_max`` and
        ``clml_ess``, and ``rank`` (by ``elpd_loo``, as ``arviz_stats.compare``, else ``lml``).

    Example:
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
    from .gp.conditional_marginal_log_likelihood import held_out_size, stratified_clml_masks
    from .masks import _check_positive_int

    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping of name -> PyroModel")
    if not isinstance(num_masks, int) or num_masks < 2:
        raise ValueError(f"num_masks must be at least 2 for a standard error, got {num_masks!r}")
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    _check_positive_int("num_importance_samples", num_importance_samples)
    entries = {}
    for name, entry in models.items():
        pyro_model = as_pyro_model(entry, data)
        if pyro_model is None:
            raise TypeError(
                f"model {name!r} is not a PyroModel or (model, guide[, args[, kwargs]]) tuple; "
                "do not mix Pyro models with distributions or GPs"
            )
        entries[name] = pyro_model
    settings = {
        "num_masks": num_masks,
        "num_draws": num_draws,
        "seed": seed,
        "num_importance_samples": num_importance_samples,
    }
    rows, scores = [], {}
    with torch.no_grad(), limited_threads():
        observed = {name: _observe(name, entry, seed) for name, entry in entries.items()}
        first_name, first = next(iter(observed.items()))
        for name, obs in observed.items():
            if obs.values.shape != first.values.shape or not torch.equal(obs.values, first.values):
                raise ValueError(
                    f"model {name!r} observes different data from {first_name!r}: compare "
                    "models on the same observations"
                )
        n = first.values.numel()
        held_out = held_out_size(condition_fraction, n)
        # Common random numbers: one set of CLML masks over the n values for every model.
        clml_draw = stratified_clml_masks(
            held_out, n, (), num_masks, torch.Generator().manual_seed(seed), first.values.dtype
        )
        for name, entry in entries.items():
            scores[name], info = _score(entry, observed[name], clml_draw, settings)
            row = {"model": name, "n": n, "clml_held_out": held_out}
            row.update({key + "_method": scores[name].get(key, Score()).method for key in KEYS})
            row.update(pareto_k_max=info.get("pareto_k_max"), clml_ess=info.get("clml_ess"))
            rows.append(row)
        add_differences(rows, scores, KEYS)
        for row in rows:
            row["exact_lml"] = row["lml"] if row["lml_method"] == "exact" else None
            row["pseudo_ll"] = row["elpd_loo"]
            row["loo_method"] = row["elpd_loo_method"]
        rank_rows(rows)
    return rows
