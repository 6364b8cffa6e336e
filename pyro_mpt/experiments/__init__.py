"""The paper's experiments, reproduced (``pyro-mpt reproduce NAME``).

Each experiment is a module ``pyro_mpt.experiments.NAME`` with a function
``run(out: pathlib.Path, full: bool = False, seed: int = 0) -> dict`` that writes its figures (PNG),
``results.json`` and a ``results.md`` table into ``out`` and returns the results. The CLI finds
them by name through :data:`EXPERIMENTS`.
"""

EXPERIMENTS = {
    # name -> (module, one-line description); modules are imported lazily by the CLI.
    "mlm": (
        "pyro_mpt.experiments.mlm",
        "E4: masked LM trained from scratch vs untrained, MPT curve over masking rates",
    ),
}
