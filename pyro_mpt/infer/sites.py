"""Which sites of a Pyro trace are data, and which latents are integrated per row.

The rules :class:`~pyro_mpt.infer.MaskedPretrainingELBO` applies before it scores anything:

* **data** are observed sample sites other than ``pyro.deterministic`` and ``pyro.factor`` (whose
  log-densities enter the loss as in Trace_ELBO);
* a latent is **local** to an observed site when it is not shared between that site's rows: it
  sits in every plate, vectorized or sequential (the same iteration), that indexes the rows. Local
  latents are integrated per row; every other latent is global and left to the guide;
* guide sites that belong to integrated latents, autoguide auxiliaries such as AutoNormal's
  ``z_unconstrained`` included, are not ELBO terms; ``AutoContinuous`` guides that draw local and
  global latents jointly are refused;
* observations may hold NaN only in rows that are masked out.
"""

from __future__ import annotations

import torch
from pyro.distributions import Unit
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.autoguide import AutoContinuous, AutoGuideList

from ..gaussian import _all_finite

__all__ = [
    "is_data",
    "data_sites",
    "observed_value",
    "row_frames",
    "local_latents",
    "local_auxiliary_sites",
    "check_joint_autoguide",
    "unmasked_fn",
    "row_mask",
]

# The plates MaskedPretrainingELBO adds (importance particles, mask draws) and Pyro's particle
# plate: they never index data rows.
IMPORTANCE_PLATE = "_mpt_importance"
MASK_PLATE = "_mpt_masks"
INTERNAL_PLATES = frozenset({"num_particles_vectorized", IMPORTANCE_PLATE, MASK_PLATE})


def unmasked_fn(site):
    """The site's distribution without the ``.mask()`` wrappers (masks are applied separately,
    through :func:`row_mask`)."""
    fn = site["fn"]
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    return fn


def row_mask(site):
    """The site's mask combined with any ``.mask()`` on its distribution."""
    mask, fn = site["mask"], site["fn"]
    while isinstance(fn, MaskedDistribution):
        mask = fn._mask if mask is None else mask & fn._mask
        fn = fn.base_dist
    return mask


def is_data(site) -> bool:
    """Observed sites that are data; ``pyro.deterministic`` and ``pyro.factor`` are not (their
    log-densities enter the loss exactly as in Trace_ELBO)."""
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic", False)
        and not isinstance(unmasked_fn(site), Unit)
    )


def data_sites(model_trace, guide_trace) -> list[str]:
    """Names of the observed data sites; clear errors for what the estimator cannot handle."""
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site["infer"].get("enumerate"):
                raise ValueError(
                    f"site '{name}' is marked for enumeration "
                    f"(infer={{'enumerate': {site['infer']['enumerate']!r}}}); "
                    "MaskedPretrainingELBO does not enumerate discrete latents: sum them out in "
                    "the model (e.g. with MixtureSameFamily)"
                )
    observed = []
    for name, site in model_trace.nodes.items():
        if not is_data(site):
            continue
        if not isinstance(site["value"], torch.Tensor):
            raise TypeError(
                f"observed site '{name}' has a non-tensor value {type(site['value']).__name__}"
            )
        observed.append(name)
    if not observed:
        raise ValueError(
            "the model has no observed sites (pyro.sample(..., obs=...)): masked pre-training "
            "has nothing to predict"
        )
    return observed


def observed_value(name: str, site) -> torch.Tensor:
    """The observation, with NaN allowed (and zeroed) only in rows that are masked out."""
    value = site["value"]
    if not value.is_floating_point() or _all_finite(value):
        return value
    missing = ~torch.isfinite(value)
    masked_rows = row_mask(site)
    event_dims = unmasked_fn(site).event_dim
    missing_rows = missing.flatten(value.dim() - event_dims).any(-1) if event_dims else missing
    kept = True if masked_rows is None else masked_rows
    if bool((missing_rows & kept).any()):
        raise ValueError(
            f"observed site '{name}' contains NaN or infinite values in rows that are scored; "
            "remove those rows, or leave them out with poutine.mask(mask=...) or the "
            "distribution's .mask(...) (rows masked out may hold NaN)"
        )
    # Masked-out rows are not scored; zero them so that no NaN reaches a gradient.
    return torch.where(missing, torch.zeros_like(value), value)


def row_frames(site, local_plates) -> frozenset:
    """The plates (vectorized or sequential) that index the rows of a site."""
    return frozenset(
        frame
        for frame in site["cond_indep_stack"]
        if frame.name not in INTERNAL_PLATES
        and (local_plates is None or frame.name in local_plates)
    )


def local_latents(model_trace, observed: list[str], local_plates) -> dict[str, list[str]]:
    """For each observed site, its local latents: latent sites in every plate of its rows.

    A latent inside every plate (vectorized or sequential, with the same iteration) that indexes
    the observed rows takes a separate value for each row, so it is integrated per row. A latent
    missing from one of them (a per-feature scale in a ``features`` plate while the rows are
    indexed by ``data`` and ``features``; a weight vector outside the data plate) is shared by
    several rows: it is global and handled by the guide, as in Trace_ELBO.
    """
    local: dict[str, list[str]] = {name: [] for name in observed}
    owner: dict[str, str] = {}
    frames = {name: row_frames(model_trace.nodes[name], local_plates) for name in observed}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        latent_frames = frozenset(site["cond_indep_stack"])
        for obs in observed:
            if not frames[obs] or not frames[obs] <= latent_frames:
                continue
            if name in owner:
                raise NotImplementedError(
                    f"local latent site '{name}' is shared by observed sites '{owner[name]}' "
                    f"and '{obs}'; MaskedPretrainingELBO masks one observed site at a time"
                )
            extra = sorted(
                f.name for f in latent_frames - frames[obs]
                if f.vectorized and f.name not in INTERNAL_PLATES
                and (local_plates is None or f.name in local_plates)
            )
            if extra:
                raise NotImplementedError(
                    f"local latent site '{name}' of observed site '{obs}' sits in plates {extra} "
                    f"that do not index the rows of '{obs}'; move them into the event shape "
                    "(.to_event) or name the data plates with local_plates="
                )
            owner[name] = obs
            local[obs].append(name)
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"local latent site '{name}' of observed site '{obs}' is discrete "
                    f"({type(site['fn']).__name__}) and would need enumeration; "
                    "MaskedPretrainingELBO does not enumerate: sum it out in the model "
                    "(e.g. with MixtureSameFamily)"
                )
    return local


def local_auxiliary_sites(guide, guide_trace, model_trace, local) -> frozenset[str]:
    """Guide-only (auxiliary) sites that belong to integrated-out latents, e.g. AutoNormal's
    ``z_unconstrained``: they sit in every row plate of an observed site with local latents."""
    frames_of_rows = [
        row_frames(model_trace.nodes[obs], None) for obs, latents in local.items() if latents
    ]
    if not frames_of_rows:
        return frozenset()
    check_joint_autoguide(guide, {name for latents in local.values() for name in latents})
    return frozenset(
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
        and name not in model_trace.nodes
        and any(frames <= frozenset(site["cond_indep_stack"]) for frames in frames_of_rows)
    )


def check_joint_autoguide(guide, local_names) -> None:
    """AutoContinuous guides (AutoDiagonalNormal, AutoLowRankMultivariateNormal, ...) draw every
    latent from one joint auxiliary site, whose entropy cannot be split into global and local."""
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    for part in parts:
        if isinstance(part, AutoContinuous) and part.prototype_trace is not None:
            covered = sorted(local_names & set(part.prototype_trace.nodes))
            if covered:
                raise NotImplementedError(
                    f"{type(part).__name__} draws the local latent sites {covered} jointly with "
                    "the global ones from one auxiliary site, so their entropy cannot be left out "
                    "of the masked pre-training loss. Hide the local latents from it, e.g. "
                    f"{type(part).__name__}(poutine.block(model, hide={covered!r})), or use "
                    "AutoNormal"
                )
