"""SVI step time: MaskedPretrainingELBO against Trace_ELBO on PPCA (digits, K = 10).

* collapsed PPCA (``LowRankMultivariateNormal`` site): MPT's exact Woodbury conditionals with one
  mask per row (and with one mask shared by all rows) against Trace_ELBO's exact log-likelihood;
* latent-z PPCA (``z_n`` sampled per row): MPT integrates ``z_n`` by self-normalised importance
  sampling (K = 256 particles per row: the default two adaptive rounds, and prior particles
  alone) against Trace_ELBO with an ``AutoNormal`` guide.

One SVI step (guide, model, loss, backward, Adam) on all 1797 rows; best of 5 after a warm-up.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from benchmarks.timing import best_time, row
from pyro_mpt.datasets import load_digits
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Cumulative
from pyro_mpt.models import PPCA, no_guide


def _step_time(model, guide, elbo, x, repeat=5) -> float:
    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    return best_time(lambda: svi.step(x), repeat=repeat)


def run() -> list[dict]:
    pyro.set_rng_seed(0)
    x = load_digits()
    rows = []
    collapsed = PPCA(64, 10, generator=torch.Generator().manual_seed(0))
    anchor = _step_time(collapsed, no_guide, Trace_ELBO(), x)
    for case, masks in [("one mask per row", Cumulative()), ("shared mask", Cumulative(True))]:
        elbo = MaskedPretrainingELBO(masks, generator=torch.Generator().manual_seed(0))
        ours = _step_time(collapsed, no_guide, elbo, x)
        rows.append(row("pyro SVI step", f"collapsed PPCA, {case}", ours, anchor, "Trace_ELBO"))

    latent = PPCA(64, 10, generator=torch.Generator().manual_seed(0), collapsed=False)
    anchor = _step_time(latent, AutoNormal(latent), Trace_ELBO(), x)
    for case, adapt_steps in [("adaptive SNIS K=256 (default)", 2), ("prior SNIS K=256", 0)]:
        elbo = MaskedPretrainingELBO(
            adapt_steps=adapt_steps, generator=torch.Generator().manual_seed(0)
        )
        ours = _step_time(latent, no_guide, elbo, x, repeat=2)
        rows.append(
            row("pyro SVI step", f"latent-z PPCA, {case}", ours, anchor, "Trace_ELBO + AutoNormal")
        )
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
