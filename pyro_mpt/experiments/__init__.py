"""The paper's experiments, reproduced (``pyro-mpt reproduce NAME``).

Each experiment is a module ``pyro_mpt.experiments.NAME`` with a function
``run(out: pathlib.Path, full: bool = False, seed: int = 0) -> dict`` that writes its figures (PNG),
``results.json`` and a ``results.md`` table into ``out`` and returns the results. The CLI finds
them by name through :data:`EXPERIMENTS`.
"""

__all__ = ["EXPERIMENTS"]

#: Experiment name (as in ``pyro-mpt reproduce NAME``) -> (module, one-line description), in the
#: paper's order E1-E6. The CLI imports a module only when its experiment runs.
EXPERIMENTS = {
    "convergence": (
        "pyro_mpt.experiments.convergence",
        "E1: |LML - cumulative MPT| per datum against masks per size, PPCA, D = 5 and 50",
    ),
    "area": (
        "pyro_mpt.experiments.area",
        "E2: S(x; m) against % masked for PPCA, D = 200; area vs exact LML",
    ),
    "training": (
        "pyro_mpt.experiments.training",
        "E3: PPCA W trained by cumulative vs fixed 20%/80% MPT; exact LML per epoch",
    ),
    "mlm": (
        "pyro_mpt.experiments.mlm",
        "E4: masked LM trained from scratch vs untrained, MPT curve over masking rates",
    ),
    "binary": (
        "pyro_mpt.experiments.binary",
        "E5: Bernoulli latent model on binarised digits: LML, ELBO, cumulative MPT (SNIS with a "
        "learned proposal, and quadrature), 15% MPT",
    ),
    "selection": (
        "pyro_mpt.experiments.selection",
        "E6: GP hyperparameters by LML, CLML (split, masked) and LOO; test NLL and RMSE",
    ),
    "evidence": (
        "pyro_mpt.experiments.evidence",
        "evidence of a latent-variable model: MPT through SNIS vs importance sampling",
    ),
}
