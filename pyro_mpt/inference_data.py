r"""ArviZ bridge: Pyro posteriors to ``xarray.DataTree`` with pointwise log-likelihoods.

ArviZ 1.x (arviz-base + arviz-stats) has no ``from_pyro``, and Pyro has no per-observation
log-likelihood helper (pyro-ppl/pyro#3416, arviz-devs/arviz#1165). This module supplies both, so
that PSIS-LOO (``arviz_stats.loo``) and model comparison (``arviz_stats.compare``) work on Pyro
models. For posterior draws :math:`\theta^{(s)}` and every observed site with values
:math:`y_i` (one per element of the site's batch shape, i.e. per plate entry),

.. math::

    \ell_{si} = \log p(y_i \mid \theta^{(s)}),

computed by replaying the model with the latent sites conditioned on each draw
(``poutine.condition`` + ``poutine.trace``) and evaluating the observed site's distribution
``log_prob`` (event dimensions summed, batch dimensions kept). The DataTree gets the groups
``posterior`` (the draws), ``log_likelihood`` (:math:`\ell`, dims ``chain, draw, *obs``),
``observed_data`` and, optionally, ``mpt``: masked-pre-training scores :math:`S(x; m)` per mask
size and the MPT estimate of :math:`\log p(x)`. On the marginal of the observations, the
:math:`m = 1` point of that curve is the exact leave-one-out score that PSIS-LOO approximates.

Observations hidden by ``poutine.mask`` (or ``Distribution.mask``, or the observed part of
``obs_mask``) are not data. Pyro scores them as a log-density of 0, and left in the
``log_likelihood`` group they would look like points predicted with probability 1: PSIS-LOO fails
on them ("All tail values are the same") and would otherwise count them. :func:`log_likelihood`
marks them NaN, and :func:`from_pyro` drops them from ``log_likelihood`` and ``observed_data``.
A NaN left in place is no substitute: ``arviz_stats.loo`` 0.8 runs on it but returns
``elpd = nan``.

References:
    A. Vehtari, A. Gelman, J. Gabry, "Practical Bayesian model evaluation using leave-one-out
    cross-validation and WAIC", Statistics and Computing 27, 2017.
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro.poutine as poutine
import torch
import xarray as xr
from arviz_base import from_dict
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import site_is_subsample

from .masks import _check_positive_int
from .scoring import MPTCurve, MPTEstimate

__all__ = [
    "log_likelihood",
    "guide_samples",
    "mpt_dataset",
    "from_pyro",
    "from_gpytorch",
    "gp_loo",
]


def _is_latent(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary", False)
        and not site["infer"].get("_deterministic", False)
    )


def _is_observed(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic", False)
    )


def _num_samples(samples: Mapping[str, torch.Tensor]) -> int:
    if not isinstance(samples, Mapping) or not samples:
        raise ValueError("samples must be a non-empty mapping of site name -> (S, ...) tensor")
    sizes = {name: len(value) for name, value in samples.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"samples must share their leading (draw) dimension, got sizes {sizes}")
    return next(iter(sizes.values()))


def _traces(model: Callable, samples: Mapping[str, torch.Tensor], args, kwargs):
    """One model trace per draw, latent sites conditioned on the draw."""
    for index in range(_num_samples(samples)):
        draw = {name: value[index] for name, value in samples.items()}
        trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(*args, **kwargs)
        missing = [name for name, site in trace.nodes.items() if _is_latent(site)]
        missing = [name for name in missing if name not in draw]
        if missing:
            raise ValueError(
                f"samples lack the latent site(s) {missing}: the model would draw them from the "
                "prior, which is not the posterior predictive; pass draws of every latent site"
            )
        yield trace


def _kept(site: dict, log_prob: torch.Tensor) -> torch.Tensor:
    """Which entries of an observed site are data: False where a mask hides the observation.

    Two mechanisms hide observations: ``poutine.mask`` (and ``obs_mask``), which Pyro records in
    ``site["mask"]``, and ``Distribution.mask``, which wraps the distribution in a
    ``MaskedDistribution``, possibly under ``.to_event`` or ``.expand``. An observation whose
    event is only partly masked keeps the log-density of its visible part: it is still data.
    Returns a bool tensor shaped like ``log_prob``, on its device.
    """
    device = log_prob.device
    kept = torch.ones(log_prob.shape, dtype=torch.bool, device=device)
    if site["mask"] is not None:
        kept = kept & torch.as_tensor(site["mask"], device=device)
    fn, event_dims = site["fn"], 0
    while True:
        if isinstance(fn, MaskedDistribution):
            # Dims that an outer Independent reinterpreted belong to one observation: it is
            # data if any of its elements is visible.
            mask = torch.as_tensor(fn._mask, device=device).expand(fn.batch_shape)
            if event_dims:
                mask = mask.flatten(-event_dims).any(-1)
            kept = kept & mask
        if isinstance(fn, torch.distributions.Independent):
            event_dims += fn.reinterpreted_batch_ndims
        elif not isinstance(fn, (MaskedDistribution, ExpandedDistribution)):
            return kept
        fn = fn.base_dist


def _pointwise(
    model: Callable,
    samples: Mapping[str, torch.Tensor],
    args,
    kwargs,
    observed: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pointwise log-likelihoods ``(S, *batch)``, NaN where masked, and the mask of kept entries."""
    values: dict[str, list[torch.Tensor]] = {}
    kept: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for trace in _traces(model, samples, args, kwargs):
            for name, site in trace.nodes.items():
                # poutine.condition marks the conditioned latents as observed: skip them.
                if not _is_observed(site) or name in samples:
                    continue
                if observed is not None and name not in observed:
                    continue
                log_prob = site["fn"].log_prob(site["value"])
                site_kept = _kept(site, log_prob)
                if name not in kept:
                    kept[name] = site_kept
                elif not torch.equal(kept[name], site_kept):
                    # Then the data set itself would change from draw to draw: no LOO exists.
                    raise ValueError(
                        f"the mask of observed site {name!r} depends on the posterior draw; "
                        "mask observations with data, not with latent variables"
                    )
                values.setdefault(name, []).append(torch.where(site_kept, log_prob, torch.nan))
    if observed is not None and set(observed) - set(values):
        raise ValueError(f"observed site(s) {sorted(set(observed) - set(values))} not in model")
    return {name: torch.stack(value) for name, value in values.items()}, kept


def log_likelihood(
    model: Callable,
    samples: Mapping[str, torch.Tensor],
    *args,
    observed: Sequence[str] | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    r"""Pointwise log-likelihood :math:`\log p(y_i \mid \theta^{(s)})` of every observed site.

    Observations hidden by ``poutine.mask``, ``obs_mask`` or ``Distribution.mask`` are not data:
    their entries are NaN (Pyro's own log-density of 0 would read as a perfect prediction).

    Args:
        model: a Pyro model whose observations are given through ``obs=`` (via its arguments).
        samples: posterior draws, site name -> tensor with a leading draw dimension ``S`` (e.g.
            ``MCMC.get_samples()`` or :func:`guide_samples`); every latent site must be present.
        *args: the model's arguments (the same data it was fitted to).
        **kwargs: the model's keyword arguments.
        observed: the observed sites to keep (default: all).

    Returns:
        Site name -> tensor ``(S, *site.batch_shape)``: one value per draw and observation, on
        the device of the model's tensors.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y, keep=True):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)), pyro.poutine.mask(mask=keep):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([0.0, 1.0, 2.0])
        >>> ll = log_likelihood(model, {"mu": torch.tensor([0.0, 1.0])}, y)
        >>> ll["y"].shape
        torch.Size([2, 3])
        >>> keep = torch.tensor([True, False, True])
        >>> log_likelihood(model, {"mu": torch.tensor([0.0, 1.0])}, y, keep)["y"].isnan()
        tensor([[False,  True, False],
                [False,  True, False]])
    """
    return _pointwise(model, samples, args, kwargs, observed)[0]


def _observed_values(model: Callable, samples: Mapping[str, torch.Tensor], *args, **kwargs):
    """Values of the observed sites (from one replay of the model)."""
    first = {name: value[:1] for name, value in samples.items()}
    trace = next(_traces(model, first, args, kwargs))
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if _is_observed(site) and name not in samples
    }


def guide_samples(
    guide: Callable, num_samples: int, *args, generator_seed: int | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` posterior samples of every latent site from a (fitted) SVI guide.

    Auxiliary sites of autoguides (e.g. ``AutoMultivariateNormal``'s joint latent) are left out.

    Args:
        guide: the guide, called with ``*args, **kwargs`` (the model's arguments).
        num_samples: number of draws.
        generator_seed: if given, ``pyro.set_rng_seed`` is called with it first.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def guide(y):
        ...     pyro.sample("mu", dist.Normal(0.5, 0.1))
        >>> guide_samples(guide, 4, None)["mu"].shape
        torch.Size([4])
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if generator_seed is not None:
        import pyro

        pyro.set_rng_seed(generator_seed)
    draws: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for _ in range(num_samples):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            for name, site in trace.nodes.items():
                if _is_latent(site):
                    draws.setdefault(name, []).append(site["value"].detach())
    return {name: torch.stack(value) for name, value in draws.items()}


def mpt_dataset(
    curve: MPTCurve | None = None, estimate: MPTEstimate | None = None
) -> xr.Dataset:
    r"""Masked pre-training results as an ``xarray.Dataset`` (the DataTree's ``mpt`` group).

    Variables: ``score`` and ``score_se`` (:math:`S(x; m)`, dim ``mask_size`` plus any row dims,
    coordinate ``rate``), ``curve_area`` and ``curve_area_se`` (the sum over sizes), and
    ``lml_estimate`` and ``lml_estimate_se`` (``estimate`` if given, else the curve's area when
    the curve holds every size). The attribute ``curve_area`` says which: the area of a curve on
    a sparse grid of rates is interpolated, its interpolation error is not in ``curve_area_se``,
    and it is not stored as an LML estimate.

    Example:
        >>> ds = mpt_dataset(estimate=MPTEstimate(torch.tensor(-3.0), torch.tensor(0.1)))
        >>> float(ds["lml_estimate"])
        -3.0
    """
    if curve is None and estimate is None:
        raise ValueError("give an MPTCurve (curve=) and/or an MPTEstimate (estimate=)")
    variables: dict[str, Any] = {}
    coords: dict[str, Any] = {}

    def array(tensor: torch.Tensor, first: str | None) -> tuple[list[str], np.ndarray]:
        value = tensor.detach().cpu().numpy()
        dims = ([first] if first else []) + [f"row_dim_{i}" for i in range(value.ndim)]
        return dims[: value.ndim], value

    if curve is not None:
        if not isinstance(curve, MPTCurve):
            raise TypeError(f"curve must be an MPTCurve, got {type(curve).__name__}")
        variables["score"] = array(curve.mean, "mask_size")
        variables["score_se"] = array(curve.stderr, "mask_size")
        coords["mask_size"] = curve.sizes.cpu().numpy()
        coords["rate"] = ("mask_size", curve.rates.detach().cpu().numpy())
        area = curve.area()
        variables["curve_area"] = array(area.mean, None)
        variables["curve_area_se"] = array(area.stderr, None)
        attrs = {
            "event_size": curve.event_size,
            "curve_area": "sum over every mask size: an unbiased estimate of log p(x)"
            if curve.complete
            else f"interpolated from {len(curve.sizes)} of {curve.event_size} mask sizes: an "
            "approximation whose interpolation error is not in curve_area_se",
        }
        if estimate is None and curve.complete:
            estimate = area
    else:
        attrs = {}
    if estimate is not None:
        if not isinstance(estimate, MPTEstimate):
            raise TypeError(f"estimate must be an MPTEstimate, got {type(estimate).__name__}")
        variables["lml_estimate"] = array(estimate.mean, None)
        variables["lml_estimate_se"] = array(estimate.stderr, None)
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _select_kept(array: xr.DataArray, dims: Sequence[str], kept: np.ndarray) -> xr.DataArray:
    """The entries of ``array`` where ``kept`` (a bool array over ``dims``) is True.

    When the kept entries form a grid (whole plate entries masked out: the usual case), each of
    ``dims`` is subset and keeps its coordinate labels, so ``loo(...).elpd_i`` is labelled by the
    original observation indices. Otherwise (entries scattered over a multi-dimensional site,
    e.g. missing values) no rectangular array holds them, and NaN is no way out
    (``arviz_stats.loo`` gives ``elpd = nan``): ``dims`` are flattened, as PyMC does for imputed
    observations, into one dimension ``<site>_kept`` whose coordinates ``dims`` give each entry's
    original labels.
    """
    axes = [
        np.flatnonzero(kept.any(axis=tuple(other for other in range(kept.ndim) if other != i)))
        for i in range(kept.ndim)
    ]
    if kept[np.ix_(*axes)].all():
        return array.isel(dict(zip(dims, axes, strict=True)))
    flat = f"{array.name}_kept"
    array = array.stack({flat: list(dims)}).isel({flat: np.flatnonzero(kept)})
    # A plain dimension with one label coordinate per original dim: the MultiIndex that stack
    # builds does not round-trip through netCDF / zarr.
    leading = [dim for dim in array.dims if dim in ("chain", "draw")]
    return array.reset_index(flat).transpose(*leading, flat, ...)


def _drop_masked(group: xr.DataTree, kept: Mapping[str, np.ndarray], sample_ndim: int):
    """``group`` without the masked-out entries of its variables (see :func:`_select_kept`)."""
    arrays = []
    for name, array in group.to_dataset().data_vars.items():
        site_kept = kept.get(name)
        if site_kept is not None:
            if not site_kept.any():
                continue  # every observation of the site is masked out: no data at all
            dims = array.dims[sample_ndim : sample_ndim + site_kept.ndim]
            # An observed value that broadcasts against its distribution has fewer dims than
            # the log-density: leave that one whole.
            if array.shape[sample_ndim : sample_ndim + site_kept.ndim] == site_kept.shape:
                array = _select_kept(array, dims, site_kept)
        arrays.append(array)
    try:
        # join="exact": a dimension shared by two sites that keep different entries must not be
        # silently re-aligned (that would put NaN back in, or mislabel the kept entries).
        dataset = xr.merge(arrays, join="exact", combine_attrs="drop")
    except ValueError as exc:
        raise ValueError(
            f"observed sites that share a dimension mask out different observations ({exc}); "
            "give each of them its own dims"
        ) from exc
    return xr.DataTree(dataset.assign_attrs(group.attrs))


def from_pyro(
    posterior: Any,
    model: Callable | None = None,
    model_args: Sequence[Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    num_chains: int = 1,
    mpt: MPTCurve | MPTEstimate | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
) -> xr.DataTree:
    """Build an ArviZ ``DataTree`` (``posterior``, ``log_likelihood``, ``observed_data``, ``mpt``).

    Args:
        posterior: a ``pyro.infer.MCMC`` that has been run (its model and arguments are reused
            unless given), or a mapping site name -> draws with a leading draw dimension (e.g.
            :func:`guide_samples` of a fitted SVI guide, or exact posterior draws).
        model: the Pyro model (required with a mapping).
        model_args, model_kwargs: the model's arguments (the data it was fitted to).
        num_chains: with a mapping, split the draws into this many chains (in order).
        mpt: optional masked pre-training results for the ``mpt`` group (see :func:`mpt_dataset`).
        coords, dims: passed to ``arviz_base.from_dict`` (name the observation dimension, e.g.
            ``dims={"y": ["obs"]}``).

    Returns:
        An ``xarray.DataTree`` ready for ``arviz_stats.loo`` and ``arviz_stats.compare``.

    Observations hidden by ``poutine.mask``, ``obs_mask`` or ``Distribution.mask`` are not data:
    they are dropped from ``log_likelihood`` and ``observed_data`` (a site masked out entirely is
    left out). Whole plate entries masked out keep the layout, with the original coordinate
    labels of the entries kept; entries scattered over a multi-dimensional site are flattened into
    a dimension ``<site>_kept`` with the original labels as coordinates. The mask must not depend
    on the posterior draw.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([0.0, 1.0, 2.0])
        >>> dt = from_pyro({"mu": 0.1 * torch.randn(40)}, model, (y,), num_chains=2)
        >>> dict(dt["log_likelihood"]["y"].sizes)
        {'chain': 2, 'draw': 20, 'y_dim_0': 3}

        Masked-out observations are left out, so that PSIS-LOO scores only the data:

        >>> def masked(y, keep):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)), pyro.poutine.mask(mask=keep):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> keep = torch.tensor([True, False, True])
        >>> dt = from_pyro({"mu": 0.1 * torch.randn(40)}, masked, (y, keep), dims={"y": ["obs"]})
        >>> dt["log_likelihood"]["y"].coords["obs"].values.tolist()
        [0, 2]
    """
    if hasattr(posterior, "get_samples") and hasattr(posterior, "kernel"):
        grouped = posterior.get_samples(group_by_chain=True)
        num_chains = next(iter(grouped.values())).shape[0]
        samples = {name: value.flatten(0, 1) for name, value in grouped.items()}
        model = posterior.kernel.model if model is None else model
        model_args = posterior._args if model_args is None else model_args
        model_kwargs = posterior._kwargs if model_kwargs is None else model_kwargs
    elif isinstance(posterior, Mapping):
        samples = dict(posterior)
        if model is None:
            raise ValueError("model is required when posterior is a mapping of samples")
    else:
        raise TypeError(
            f"posterior must be a pyro.infer.MCMC or a mapping of samples, got "
            f"{type(posterior).__name__}"
        )
    model_args = tuple(model_args or ())
    model_kwargs = dict(model_kwargs or {})
    total = _num_samples(samples)
    if not isinstance(num_chains, int) or num_chains < 1 or total % num_chains:
        raise ValueError(f"num_chains={num_chains!r} must be a positive divisor of {total} draws")

    def by_chain(tensor: torch.Tensor) -> np.ndarray:
        value = tensor.detach().cpu().numpy()
        return value.reshape(num_chains, total // num_chains, *value.shape[1:])

    pointwise, kept = _pointwise(model, samples, model_args, model_kwargs)
    if not pointwise:
        raise ValueError("the model has no observed sites: pass its data through model_args")
    observed = _observed_values(model, samples, *model_args, **model_kwargs)
    tree = from_dict(
        {
            "posterior": {name: by_chain(value) for name, value in samples.items()},
            "log_likelihood": {name: by_chain(value) for name, value in pointwise.items()},
            "observed_data": {
                name: value.detach().cpu().numpy() for name, value in observed.items()
            },
        },
        coords=coords,
        dims=dims,
    )
    masked = {name: value.cpu().numpy() for name, value in kept.items() if not value.all()}
    if masked:
        tree["log_likelihood"] = _drop_masked(tree["log_likelihood"], masked, sample_ndim=2)
        tree["observed_data"] = _drop_masked(tree["observed_data"], masked, sample_ndim=0)
        if not tree["log_likelihood"].data_vars:
            raise ValueError("every observation of the model is masked out: nothing to score")
    if mpt is not None:
        if isinstance(mpt, MPTCurve):
            tree["mpt"] = xr.DataTree(mpt_dataset(curve=mpt))
        else:
            tree["mpt"] = xr.DataTree(mpt_dataset(estimate=mpt))
    return tree


def _gp_training_data(model):
    if model.train_inputs is None or model.train_targets is None:
        raise ValueError("the ExactGP must hold its training data (set_train_data)")
    target = model.train_targets
    if target.dim() != 1:
        raise ValueError("only single-output, unbatched ExactGPs are supported")
    return model.train_inputs, target


def _gp_posterior(model):
    """Posterior mean and covariance of f at the training inputs, and the noise variances."""
    inputs, target = _gp_training_data(model)
    likelihood = model.likelihood
    noise = getattr(likelihood, "noise", None)
    if noise is None:
        raise TypeError("the GP's likelihood must be a Gaussian likelihood with a .noise")
    model.eval()
    likelihood.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The posterior at the training inputs is what is wanted here.
            warnings.filterwarnings("ignore", message="The input matches the stored training")
            posterior = model(*inputs)
            mean, cov = posterior.mean, posterior.covariance_matrix
    finally:
        model.train()
        likelihood.train()
    return target, mean, cov, noise.detach().reshape(-1).expand_as(target)


def gp_loo(model, name: str = "y"):
    r"""Exact leave-one-out of an ``ExactGP`` as an ``arviz_stats`` ``ELPDData`` (``kind="loo"``).

    ``elpd_i`` is :math:`\log p(y_i \mid \mathbf y_{-i})` from one Cholesky factor
    (:func:`pyro_mpt.evaluate.gp_pointwise_loo`), ``se`` is :math:`\sqrt{n\,\mathrm{Var}_i}` and
    ``p`` the effective number of parameters :math:`\sum_i \log p(y_i \mid \mathbf y) -
    \mathrm{elpd}`, as in PSIS-LOO. Exact, so no Pareto k. ``arviz_stats.compare`` takes a dict of
    these (and ``DataTree``\ s).

    Example:
        >>> import gpytorch
        >>> x = torch.linspace(0, 1, 8, dtype=torch.float64).unsqueeze(-1)
        >>> class GP(gpytorch.models.ExactGP):
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(
        ...             torch.zeros(x.shape[:-1], dtype=x.dtype),
        ...             gpytorch.kernels.RBFKernel().double()(x))
        >>> gp = GP(x, torch.sin(6 * x[:, 0]), gpytorch.likelihoods.GaussianLikelihood().double())
        >>> elpd = gp_loo(gp)
        >>> elpd.kind, elpd.n_data_points, round(elpd.elpd - float(elpd.elpd_i.sum()), 12)
        ('loo', 8, 0.0)
    """
    from arviz_stats.utils import ELPDData

    from .evaluate import gp_pointwise_loo

    elpd_i = gp_pointwise_loo(model).cpu().numpy()
    target, mean, cov, noise = _gp_posterior(model)
    predictive = torch.distributions.Normal(mean, (cov.diagonal() + noise).sqrt())
    lppd = predictive.log_prob(target).sum().item()
    n = len(elpd_i)
    elpd = float(elpd_i.sum())
    return ELPDData(
        kind="loo",
        elpd=elpd,
        se=float(np.sqrt(n * elpd_i.var())),  # ddof 0, as arviz_stats.loo
        p=lppd - elpd,
        n_samples=0,
        n_data_points=n,
        scale="log",
        warning=False,
        good_k=0.7,
        elpd_i=xr.DataArray(elpd_i, dims=[f"{name}_dim_0"], name=name),
    )


def from_gpytorch(
    model, num_draws: int = 1000, generator: torch.Generator | None = None, name: str = "y"
) -> xr.DataTree:
    r"""An ``ExactGP``'s posterior over f at its training inputs as an ArviZ ``DataTree``.

    ``posterior`` holds ``num_draws`` joint draws :math:`f^{(s)} \sim p(\mathbf f \mid \mathbf y)`
    (hyperparameters fixed at their current values), ``log_likelihood`` the pointwise
    :math:`\log \mathcal N(y_i; f^{(s)}_i, \sigma^2_i)` and ``observed_data`` the targets, so
    ``arviz_stats.loo`` (PSIS-LOO) and ``compare`` run on GPs; :func:`gp_loo` is the exact LOO
    that PSIS-LOO approximates.

    Example:
        >>> import arviz_stats, gpytorch
        >>> x = torch.linspace(0, 1, 8, dtype=torch.float64).unsqueeze(-1)
        >>> class GP(gpytorch.models.ExactGP):
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(
        ...             torch.zeros(x.shape[:-1], dtype=x.dtype),
        ...             gpytorch.kernels.RBFKernel().double()(x))
        >>> gp = GP(x, torch.sin(6 * x[:, 0]), gpytorch.likelihoods.GaussianLikelihood().double())
        >>> dt = from_gpytorch(gp, 400, torch.Generator().manual_seed(0))
        >>> dict(dt["log_likelihood"]["y"].sizes)
        {'chain': 1, 'draw': 400, 'y_dim_0': 8}
    """
    _check_positive_int("num_draws", num_draws)
    target, mean, cov, noise = _gp_posterior(model)
    eye = torch.eye(len(mean), dtype=mean.dtype, device=mean.device)
    jitter = 1e-10 * cov.diagonal().mean()
    factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
    while bool(info):
        jitter = jitter * 10
        factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
    noise_draw = torch.randn(num_draws, len(mean), generator=generator, dtype=mean.dtype)
    draws = mean + noise_draw.to(mean.device) @ factor.mT
    log_lik = torch.distributions.Normal(draws, noise.sqrt()).log_prob(target)
    return from_dict(
        {
            "posterior": {"f": draws.cpu().numpy()[None]},
            "log_likelihood": {name: log_lik.cpu().numpy()[None]},
            "observed_data": {name: target.detach().cpu().numpy()},
        },
        dims={"f": [f"{name}_dim_0"], name: [f"{name}_dim_0"]},
    )
