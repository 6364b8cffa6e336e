r"""Masked pre-training as a Pyro ELBO: Trace_ELBO with MPT estimates of the log-likelihoods.

For global latents :math:`\theta` with guide :math:`q(\theta)` and rows :math:`x_n \in \mathbb{R}^D`
observed at a sample site, :class:`~pyro.infer.Trace_ELBO` estimates

.. math::

    \mathcal{L} = \mathbb{E}_{q(\theta)}\Big[\log p(\theta) - \log q(\theta)
        + \sum_n \log p(x_n \mid \theta)\Big].

:class:`MaskedPretrainingELBO` keeps the first two terms and replaces each
:math:`\log p(x_n \mid \theta)` by the masked pre-training estimate (Moreno-Muñoz et al., 2023)

.. math::

    \hat L(x_n) = \sum_{s} w_s \sum_{j \in M_s} \log p(x_{nj} \mid x_{nR_s}, \theta),
    \qquad R_s = \{1..D\} \setminus M_s,

with masks :math:`M_s` and weights :math:`w_s` drawn by a :mod:`~pyro_mpt.masks` scheme. With the
:class:`~pyro_mpt.masks.Cumulative` scheme (:math:`m \sim U\{1..D\}`, :math:`w = D/m`),
:math:`\mathbb{E}_M[\hat L(x_n)] = \log p(x_n \mid \theta)` by the chain rule averaged over
orderings (Fong & Holmes, 2020), so the expected loss equals Trace_ELBO's; with no latent sites
(only ``pyro.param``) training is type-II maximum likelihood by self-supervision. The
conditionals are computed per site:

1. **Collapsed Gaussian sites** (``MultivariateNormal``, ``LowRankMultivariateNormal``): exact
   conditionals from one factorisation (:func:`pyro_mpt.gaussian.masked_conditional_log_prob`).
2. **Sites with local latents** :math:`z_n` (e.g. ``Bernoulli(logits=f(z_n)).to_event(1)``): a
   latent is *local* to an observed site when it is not shared between that site's rows, i.e. it
   sits in every plate, vectorized or sequential (same iteration), that indexes the rows;
   ``local_plates=`` restricts which plates count. A latent missing from one of those plates (a
   per-feature scale in a ``features`` plate observed through ``x`` in ``data`` x ``features``, a
   weight outside the data plate) is *global*: the guide handles it as in Trace_ELBO. Local
   latents are integrated under their posterior given the *visible* part,
   :math:`p(x_j \mid x_R) = \int p(x_j \mid z)\, p(z \mid x_R)\, dz`, by self-normalised importance
   sampling with :math:`K` particles (:func:`~pyro_mpt.infer.site_terms.snis_conditional_log_prob`),
   weights :math:`p(z_k)\, p(x_R \mid z_k) / q(z_k)`. The proposal is the prior
   (``proposal="prior"``, weights :math:`p(x_R \mid z_k)`) or the guide (``proposal="guide"``),
   which must read the observation through :func:`~pyro_mpt.infer.observed_view` so that it sees
   only :math:`x_R`; the ELBO raises if a guide never asked. Guide sites of local latents,
   autoguide auxiliaries such as AutoNormal's ``z_unconstrained`` included, contribute no
   :math:`\log p(z_n) - \log q(z_n)` term (the latents are integrated out); with the prior as
   proposal they are unused, which is reported once. ``AutoContinuous`` guides (AutoDiagonalNormal,
   AutoLowRankMultivariateNormal) that draw local and global latents jointly are refused: block
   the local ones from them. Guide proposals are held fixed (no gradient flows into them). The
   estimate is consistent in :math:`K` with :math:`O(1/K)` bias.
3. **Factorised sites without local latents** (``Normal(...).to_event(1)``, ``Bernoulli``, any
   site without event dimensions): the conditionals equal the marginals, so
   :math:`\hat L(x_n)` is replaced by its expectation, the plain log-likelihood, whenever the scheme
   targets :math:`\log p(x)` (cumulative, stratified, exhaustive); other schemes (fixed rate, rate
   range) use their masked estimate, whose expectation is a multiple of it.

The masked dimension is the **rightmost event dimension** of the observed site (a site without event
dimensions is one dimension, :math:`D = 1`). To mask another dimension, move it rightmost in the
model (e.g. ``x.transpose(-1, -2)`` with the matching ``.to_event``); a ``features`` plate makes
each element its own row. Plate subsampling scales, ``poutine.scale`` and ``poutine.mask`` apply to
:math:`\hat L(x_n)` exactly as they apply to the log-likelihood in Trace_ELBO, and rows masked out
may hold NaN. ``pyro.deterministic`` and ``pyro.factor`` sites are not data: their log-densities
enter the loss as in Trace_ELBO. Integer and boolean observations are promoted to the model's
floating dtype.

References:
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
    E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 107(2), 2020.
    D. Wingate, T. Weber, "Automated Variational Inference in Probabilistic Programming", 2013.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Unit
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.autoguide import AutoContinuous, AutoGuideList
from pyro.infer.elbo import ELBO
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan

from ..gaussian import as_value, masked_conditional_log_prob
from ..masks import Cumulative, MaskSample, MaskScheme
from ..threads import limit_threads_in_backward, limited_threads
from .observed_view import masked_observations
from .site_terms import (
    is_collapsed_gaussian,
    is_factorised,
    per_dimension_log_prob,
    snis_conditional_log_prob,
    targets_log_marginal,
)

__all__ = ["MaskedPretrainingELBO"]

_IMPORTANCE_PLATE = "_mpt_importance"
_MASK_PLATE = "_mpt_masks"
_INTERNAL_PLATES = frozenset({"num_particles_vectorized", _IMPORTANCE_PLATE, _MASK_PLATE})
_SUPPORTED = (
    "MultivariateNormal, LowRankMultivariateNormal, or a distribution that factorises over its "
    "rightmost event dimension (e.g. Normal(...).to_event(1), Bernoulli(...).to_event(1))"
)


class MaskedPretrainingELBO(ELBO):
    r"""Trace_ELBO with each observed log-likelihood replaced by a masked pre-training estimate.

    See the module docstring for the estimator. Works with :class:`~pyro.infer.SVI` (``loss``,
    ``loss_and_grads``), :class:`~pyro.infer.elbo.ELBOModule` (``elbo(model, guide)``) and
    :func:`pyro.contrib.gp.util.train` (``differentiable_loss``).

    Args:
        masks: the mask scheme (default :class:`~pyro_mpt.masks.Cumulative`: unbiased for the log
            likelihood).
        num_masks: mask draws per row and particle.
        num_particles: guide samples of the global latents, as in Trace_ELBO.
        num_importance_samples: K, importance particles per row for sites with local latents.
        proposal: ``"prior"`` (default) or ``"guide"``: where local-latent particles come from. A
            guide proposal must read the observation through
            :func:`~pyro_mpt.infer.observed_view`.
        local_plates: names of the plates that index data rows. A latent site is *local* to an
            observed site when it sits in every one of these plates that the observed site is
            in. Default: every plate (vectorized or sequential) of the observed site.
        generator: ``torch.Generator`` for the masks (deterministic under a seed). Latent samples
            (guide and importance particles) use Pyro's global RNG (``pyro.set_rng_seed``).
        max_plate_nesting: as in :class:`~pyro.infer.ELBO`, and so are ``vectorize_particles``,
            ``strict_enumeration_warning``, ``ignore_jit_warnings`` and ``retain_graph``.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):
        ...     scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        ...     cov = scale * torch.eye(3) + 0.5
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), cov), obs=x)
        >>> elbo = MaskedPretrainingELBO(generator=torch.Generator().manual_seed(0))
        >>> svi = pyro.infer.SVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.01}), elbo)
        >>> loss = svi.step(torch.randn(10, 3))
    """

    def __init__(
        self,
        masks: MaskScheme | None = None,
        num_masks: int = 1,
        num_particles: int = 1,
        num_importance_samples: int = 256,
        proposal: str = "prior",
        local_plates: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: bool | None = None,
    ):
        masks = Cumulative() if masks is None else masks
        if not isinstance(masks, MaskScheme):
            raise TypeError(
                f"masks must be a pyro_mpt.masks.MaskScheme, got {type(masks).__name__}"
            )
        for name, value in [
            ("num_masks", num_masks),
            ("num_particles", num_particles),
            ("num_importance_samples", num_importance_samples),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if proposal not in ("prior", "guide"):
            raise ValueError(f"proposal must be 'prior' or 'guide', got {proposal!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )
        self.masks = masks
        self.num_masks = num_masks
        self.num_importance_samples = num_importance_samples
        self.proposal = proposal
        self.local_plates = None if local_plates is None else frozenset(local_plates)
        self.generator = generator
        self._warned_unused_guide = False

    # ----------------------------------------------------------------------------------- traces
    def _get_trace(self, model, guide, args, kwargs):
        """One guide trace and the model replayed against it, with MPT terms at observed sites.

        Returns ``(model_trace, guide_trace, local_sites)``; each observed site carries
        ``"mpt_log_prob"`` (scaled and masked, shape of its batch) and ``"mpt_log_prob_sum"``.
        """
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            raise NotImplementedError(
                "MaskedPretrainingELBO does not support GuideMessenger guides"
            )
        full_guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        full_model_trace = poutine.trace(poutine.replay(model, trace=full_guide_trace)).get_trace(
            *args, **kwargs
        )
        guide_trace = prune_subsample_sites(full_guide_trace)
        model_trace = prune_subsample_sites(full_model_trace)
        observed = _check_sites(model_trace, guide_trace)
        local = _local_sites(model_trace, observed, self.local_plates)
        all_local = frozenset(name for names in local.values() for name in names)
        # Guide sites of integrated-out latents, autoguide auxiliaries included, are not ELBO terms.
        integrated = all_local | _local_auxiliary_sites(guide, guide_trace, model_trace, local)
        if is_validation_enabled():
            check_model_guide_match(
                _without(model_trace, integrated), _without(guide_trace, integrated)
            )
        self._warn_if_guide_is_unused(guide_trace, integrated)

        model_trace.compute_log_prob(
            site_filter=lambda name, site: name not in observed and name not in all_local
        )
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and "log_prob" in site:
                        check_site_shape(site, self.max_plate_nesting)

        nesting = _plate_nesting(full_model_trace, full_guide_trace)
        prior_particles = None
        for name in observed:
            site = model_trace.nodes[name]
            value = _observed_value(name, site)
            if not local[name]:
                estimate = self._exact_conditional_term(name, site, value)
            elif self.proposal == "prior":
                if prior_particles is None:  # one trace serves every observed site
                    prior_particles = self._prior_particles(
                        model, args, kwargs, full_model_trace, all_local, nesting
                    )
                estimate = self._prior_proposal_term(name, site, value, prior_particles)
            else:
                estimate = self._guide_proposal_term(
                    name, site, value, local[name], integrated, model, guide, args, kwargs,
                    full_model_trace, full_guide_trace, nesting,
                )
            site["mpt_log_prob"] = scale_and_mask(estimate, site["scale"], _row_mask(site))
            site["mpt_log_prob_sum"] = site["mpt_log_prob"].sum()
            if is_validation_enabled():
                warn_if_nan(site["mpt_log_prob_sum"], f"masked pre-training term at site '{name}'")
        return model_trace, guide_trace, integrated

    def _warn_if_guide_is_unused(self, guide_trace, integrated) -> None:
        if self.proposal != "prior" or self._warned_unused_guide:
            return
        unused = sorted(
            name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and name in integrated
        )
        if unused:
            self._warned_unused_guide = True
            warnings.warn(
                f"the guide's sites {unused} belong to local latents, which "
                "MaskedPretrainingELBO(proposal='prior') integrates against the prior by "
                "importance sampling: they are not used and their parameters are not trained. "
                "To use the guide as the proposal, pass proposal='guide' and read the observation "
                "in the guide through pyro_mpt.infer.observed_view; otherwise leave the local "
                "latents out of the guide (e.g. AutoNormal(poutine.block(model, hide=[...]))).",
                UserWarning,
                stacklevel=4,
            )

    def _draw(self, size: int, batch_shape: torch.Size, like: torch.Tensor) -> MaskSample:
        return self.masks.sample(
            size, batch_shape, self.num_masks, self.generator, like.dtype, like.device
        )

    def _exact_conditional_term(self, name: str, site: dict, value: torch.Tensor) -> torch.Tensor:
        """Sites without local latents: exact Gaussian conditionals, or factorised marginals."""
        fn = _unmasked_fn(site)
        if is_collapsed_gaussian(fn):
            value = as_value(fn, value)
            batch_shape = torch.broadcast_shapes(value.shape[:-1], fn.batch_shape)
            draw = self._draw(value.shape[-1], batch_shape, value)
            conditionals = masked_conditional_log_prob(fn, value, draw.masks)  # zero where unmasked
            return draw.weighted_sums(conditionals.sum(-1), summed=True).sum(0)
        if not is_factorised(fn):
            raise TypeError(
                f"observed site '{name}' has an unsupported distribution {type(fn).__name__}; "
                f"MaskedPretrainingELBO supports {_SUPPORTED}"
            )
        if targets_log_marginal(self.masks):
            # Conditionals equal marginals, so the scheme's expectation is the log-likelihood.
            return fn.log_prob(value)
        per_dim = per_dimension_log_prob(fn, value)
        draw = self._draw(per_dim.shape[-1], per_dim.shape[:-1], per_dim)
        return draw.weighted_sums(per_dim).sum(0)

    def _prior_particles(self, model, args, kwargs, full_model_trace, all_local, nesting):
        """The model re-run with K prior particles of every local latent, in one trace."""
        replay = _without(full_model_trace, all_local)
        with pyro.plate(_IMPORTANCE_PLATE, self.num_importance_samples, dim=-(nesting + 1)):
            return poutine.trace(poutine.replay(model, trace=replay)).get_trace(*args, **kwargs)

    def _factorised_fn(self, name, site, local):
        fn = _unmasked_fn(site)
        if not is_factorised(fn):
            raise TypeError(
                f"observed site '{name}' depends on local latent sites {sorted(local)} but its "
                f"distribution {type(fn).__name__} does not factorise over its rightmost event "
                "dimension given them; use Independent(...) over that dimension (e.g. "
                "Bernoulli(...).to_event(1))"
            )
        return fn

    def _prior_proposal_term(self, name, site, value, particles) -> torch.Tensor:
        """SNIS conditionals given the visible part, with prior particles (weights p(x_R | z))."""
        per_dim = per_dimension_log_prob(self._factorised_fn(name, site, ()), value)
        batch_shape, size = per_dim.shape[:-1], per_dim.shape[-1]
        draw = self._draw(size, batch_shape, per_dim)
        log_lik = per_dimension_log_prob(_unmasked_fn(particles.nodes[name]), value)
        log_lik = _align(log_lik, (self.num_importance_samples,), batch_shape, size).unsqueeze(0)
        return draw.weighted_sums(snis_conditional_log_prob(log_lik, draw.masks)).sum(0)

    def _guide_proposal_term(
        self, name, site, value, local, integrated, model, guide, args, kwargs,
        full_model_trace, full_guide_trace, nesting,
    ) -> torch.Tensor:
        """SNIS conditionals given the visible part, with the guide (reading x_R) as proposal."""
        per_dim = per_dimension_log_prob(self._factorised_fn(name, site, local), value)
        batch_shape, size = per_dim.shape[:-1], per_dim.shape[-1]
        draw = self._draw(size, batch_shape, per_dim)
        num = self.num_importance_samples
        dim = -(nesting + 1)
        num_draws = draw.masks.shape[0]
        pad = (1,) * (nesting - len(batch_shape))
        view_mask = draw.masks.reshape(num_draws, 1, *pad, *batch_shape, size)
        if per_dim.dim() == value.dim() + 1:  # a site without event dimensions: D = 1
            view_mask = view_mask.squeeze(-1)
        replay = _without(full_guide_trace, integrated)
        with (
            masked_observations({name: view_mask}, {name: value}) as read,
            pyro.plate(_MASK_PLATE, num_draws, dim=dim - 1),
            pyro.plate(_IMPORTANCE_PLATE, num, dim=dim),
        ):
            proposal = poutine.trace(poutine.replay(guide, trace=replay)).get_trace(
                *args, **kwargs
            )
            # The proposal is held fixed: its samples enter the model as data.
            for latent in local:
                if latent not in proposal.nodes:
                    raise ValueError(
                        f"proposal='guide' but the guide has no site '{latent}', a local latent of "
                        f"observed site '{name}'; add it to the guide or use proposal='prior'"
                    )
                proposal.nodes[latent]["value"] = proposal.nodes[latent]["value"].detach()
            for node_name, node in full_model_trace.nodes.items():
                if site_is_subsample(node) and node_name not in proposal.nodes:
                    proposal.add_node(node_name, **node)
            particles = poutine.trace(poutine.replay(model, trace=proposal)).get_trace(
                *args, **kwargs
            )
        if name not in read:
            raise ValueError(
                f"proposal='guide' but the guide never read observed site '{name}' through "
                "pyro_mpt.infer.observed_view, so it may have seen the masked values it would be "
                "scored on; read the observation with observed_view(name, value) or use "
                "proposal='prior'"
            )
        log_weights = 0.0
        for latent in local:
            prior_site, proposal_site = particles.nodes[latent], proposal.nodes[latent]
            with torch.no_grad():
                log_q = proposal_site["fn"].log_prob(proposal_site["value"])
            log_weights = log_weights + prior_site["fn"].log_prob(prior_site["value"]) - log_q
        lead = (num_draws, num)
        log_weights = _align(log_weights.unsqueeze(-1), lead, batch_shape, 1).squeeze(-1)
        log_lik = per_dimension_log_prob(_unmasked_fn(particles.nodes[name]), value)
        log_lik = _align(log_lik, lead, batch_shape, size)
        conditionals = snis_conditional_log_prob(log_lik, draw.masks, log_weights)
        return draw.weighted_sums(conditionals).sum(0)

    # ------------------------------------------------------------------------------ estimators
    def _differentiable_loss_particle(self, model_trace, guide_trace, local):
        elbo_particle = 0.0
        surrogate_elbo_particle = 0.0
        log_r = None
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or name in local:
                continue
            term = site["mpt_log_prob_sum"] if "mpt_log_prob_sum" in site else site["log_prob_sum"]
            elbo_particle = elbo_particle + torch_item(term)
            surrogate_elbo_particle = surrogate_elbo_particle + term

        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or name in local:
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                surrogate_elbo_particle = surrogate_elbo_particle - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace, local)
                downstream = log_r.sum_to(site["cond_indep_stack"])
                surrogate_elbo_particle = (
                    surrogate_elbo_particle + (downstream * score_function_term).sum()
                )
        return -elbo_particle, -surrogate_elbo_particle

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the loss (negative MPT-ELBO) from ``num_particles`` particles.

        Example:
            >>> loss = MaskedPretrainingELBO().loss(  # doctest: +SKIP
            ...     model, guide, data)
        """
        loss = 0.0
        with torch.no_grad(), limited_threads():
            for model_trace, guide_trace, local in self._get_traces(model, guide, args, kwargs):
                loss_particle, _ = self._differentiable_loss_particle(
                    model_trace, guide_trace, local
                )
                loss += torch_item(loss_particle) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a tensor whose gradient is the estimator's (surrogate) gradient.

        Example:
            >>> loss = MaskedPretrainingELBO().differentiable_loss(  # doctest: +SKIP
            ...     model, guide, data)
            >>> loss.backward()  # doctest: +SKIP
        """
        with limited_threads():
            loss = 0.0
            surrogate_loss = 0.0
            for model_trace, guide_trace, local in self._get_traces(model, guide, args, kwargs):
                loss_particle, surrogate_loss_particle = self._differentiable_loss_particle(
                    model_trace, guide_trace, local
                )
                surrogate_loss = surrogate_loss + surrogate_loss_particle / self.num_particles
                loss = loss + loss_particle / self.num_particles
            warn_if_nan(surrogate_loss, "loss")
            loss = loss + (surrogate_loss - torch_item(surrogate_loss))
        # The caller's backward pass runs the same small batched kernels: limit it too.
        return limit_threads_in_backward(loss) if isinstance(loss, torch.Tensor) else loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after back-propagating the surrogate into the parameters.

        Example:
            >>> loss = MaskedPretrainingELBO().loss_and_grads(  # doctest: +SKIP
            ...     model, guide, data)
        """
        loss = 0.0
        with limited_threads():
            for model_trace, guide_trace, local in self._get_traces(model, guide, args, kwargs):
                loss_particle, surrogate_loss_particle = self._differentiable_loss_particle(
                    model_trace, guide_trace, local
                )
                loss += torch_item(loss_particle) / self.num_particles
                trainable_params = any(
                    site["type"] == "param"
                    for trace in (model_trace, guide_trace)
                    for site in trace.nodes.values()
                )
                if trainable_params and getattr(surrogate_loss_particle, "requires_grad", False):
                    surrogate_loss_particle = surrogate_loss_particle / self.num_particles
                    surrogate_loss_particle.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(masks={self.masks!r}, num_masks={self.num_masks}, "
            f"num_particles={self.num_particles}, "
            f"num_importance_samples={self.num_importance_samples}, proposal={self.proposal!r})"
        )


# ---------------------------------------------------------------------------------- helpers
def _is_data(site) -> bool:
    """Observed sites that are data; ``pyro.deterministic`` and ``pyro.factor`` are not (their
    log-densities enter the loss exactly as in Trace_ELBO)."""
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic", False)
        and not isinstance(_unmasked_fn(site), Unit)
    )


def _check_sites(model_trace, guide_trace) -> list[str]:
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
        if not _is_data(site):
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


def _observed_value(name: str, site) -> torch.Tensor:
    """The observation, with NaN allowed (and zeroed) only in rows that are masked out."""
    value = site["value"]
    if not value.is_floating_point():
        return value
    missing = ~torch.isfinite(value)
    if not bool(missing.any()):
        return value
    row_mask = _row_mask(site)
    event_dims = _unmasked_fn(site).event_dim
    missing_rows = missing.flatten(value.dim() - event_dims).any(-1) if event_dims else missing
    kept = True if row_mask is None else row_mask
    if bool((missing_rows & kept).any()):
        raise ValueError(
            f"observed site '{name}' contains NaN or infinite values in rows that are scored; "
            "remove those rows, or leave them out with poutine.mask(mask=...) or the "
            "distribution's .mask(...) (rows masked out may hold NaN)"
        )
    # Masked-out rows are not scored; zero them so that no NaN reaches a gradient.
    return torch.where(missing, torch.zeros_like(value), value)


def _row_frames(site, local_plates) -> frozenset:
    """The plates (vectorized or sequential) that index the rows of a site."""
    return frozenset(
        frame
        for frame in site["cond_indep_stack"]
        if frame.name not in _INTERNAL_PLATES
        and (local_plates is None or frame.name in local_plates)
    )


def _local_sites(model_trace, observed: list[str], local_plates) -> dict[str, list[str]]:
    """For each observed site, its local latents: latent sites in every plate of its rows.

    A latent inside every plate (vectorized or sequential, with the same iteration) that indexes
    the observed rows takes a separate value for each row, so it is integrated per row. A latent
    missing from one of them (a per-feature scale in a ``features`` plate while the rows are
    indexed by ``data`` and ``features``; a weight vector outside the data plate) is shared by
    several rows: it is global and handled by the guide, as in Trace_ELBO.
    """
    local: dict[str, list[str]] = {name: [] for name in observed}
    owner: dict[str, str] = {}
    frames = {name: _row_frames(model_trace.nodes[name], local_plates) for name in observed}
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
                if f.vectorized and f.name not in _INTERNAL_PLATES
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


def _local_auxiliary_sites(guide, guide_trace, model_trace, local) -> frozenset[str]:
    """Guide-only (auxiliary) sites that belong to integrated-out latents, e.g. AutoNormal's
    ``z_unconstrained``: they sit in every row plate of an observed site with local latents."""
    row_frames = [
        _row_frames(model_trace.nodes[obs], None) for obs, latents in local.items() if latents
    ]
    if not row_frames:
        return frozenset()
    _check_joint_autoguide(guide, {name for latents in local.values() for name in latents})
    return frozenset(
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
        and name not in model_trace.nodes
        and any(frames <= frozenset(site["cond_indep_stack"]) for frames in row_frames)
    )


def _check_joint_autoguide(guide, local_names) -> None:
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


def _plate_nesting(*traces) -> int:
    """How many batch dimensions the traced sites use (plates and batch shapes)."""
    nesting = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
            nesting = max(nesting, len(site["fn"].batch_shape))
    return nesting


def _without(trace, names: Iterable[str]):
    trace = trace.copy()
    for name in names:
        if name in trace.nodes:
            trace.remove_node(name)
    return trace


def _unmasked_fn(site):
    fn = site["fn"]
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    return fn


def _row_mask(site):
    """The site's mask combined with any ``.mask()`` on its distribution."""
    mask, fn = site["mask"], site["fn"]
    while isinstance(fn, MaskedDistribution):
        mask = fn._mask if mask is None else mask & fn._mask
        fn = fn.base_dist
    return mask


def _align(tensor: torch.Tensor, lead: tuple, batch_shape: torch.Size, size: int) -> torch.Tensor:
    """Reshape ``(*lead, *plate_padding, *batch, size)`` to ``(*lead, *batch_shape, size)``."""
    body = tensor.shape[len(lead) : -1]
    extra = len(body) - len(batch_shape)
    if extra > 0:
        if any(s != 1 for s in body[:extra]):
            raise RuntimeError(
                f"unexpected particle batch shape {tuple(tensor.shape)} for site batch shape "
                f"{tuple(batch_shape)}: the model must broadcast over extra leading batch "
                "dimensions (as vectorize_particles requires)"
            )
        tensor = tensor.reshape(*tensor.shape[: len(lead)], *body[extra:], tensor.shape[-1])
    elif extra < 0:
        tensor = tensor.reshape(*tensor.shape[: len(lead)], *(1,) * -extra, *body, tensor.shape[-1])
    return tensor.expand(*lead, *batch_shape, size)


def _compute_log_r(model_trace, guide_trace, local) -> MultiFrameTensor:
    """Trace_ELBO's downstream costs, with MPT terms at observed sites and locals left out."""
    log_r = MultiFrameTensor()
    stacks = get_plate_stacks(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or name in local:
            continue
        if "mpt_log_prob" in site:
            term = site["mpt_log_prob"]
        elif name in guide_trace.nodes:
            term = site["log_prob"] - guide_trace.nodes[name]["log_prob"]
        else:
            term = site["log_prob"]
        log_r.add((stacks[name], term.detach()))
    return log_r
