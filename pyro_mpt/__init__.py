"""pyro_mpt: train, score and compare probabilistic models by masked pre-training.

The names most programs need are importable from the package itself, in the order of its layout:
the mask schemes and scores of the Gaussian core, the Pyro and GPyTorch objectives and the
language-model scorer, the models with their training helper, and model comparison. Each is
defined in a submodule (``pyro_mpt.masks``, ``pyro_mpt.scoring``, ``pyro_mpt.infer``,
``pyro_mpt.gp``, ``pyro_mpt.lm``, ``pyro_mpt.models``, ``pyro_mpt.evaluate``,
``pyro_mpt.inference_data``) and documented there; ``from pyro_mpt.gp import
MaskedPretrainingMLL`` and ``from pyro_mpt import MaskedPretrainingMLL`` give the same class.

``import pyro_mpt`` itself is light: a name's submodule, and with it torch, Pyro, GPyTorch or
transformers, is imported the first time the name is used (PEP 562).

Example:
    >>> import pyro_mpt
    >>> pyro_mpt.__version__ == __import__("importlib.metadata").metadata.version("pyro_mpt")
    True
    >>> from pyro_mpt.infer import MaskedPretrainingELBO
    >>> pyro_mpt.MaskedPretrainingELBO is MaskedPretrainingELBO
    True
    >>> "MaskedPretrainingMLL" in dir(pyro_mpt)
    True
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyro_mpt")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the submodule that exports it (and documents it).
_EXPORTS = {
    # mask schemes and scores (the Gaussian core)
    "MaskScheme": "pyro_mpt.masks",
    "Cumulative": "pyro_mpt.masks",
    "Stratified": "pyro_mpt.masks",
    "FixedRate": "pyro_mpt.masks",
    "RateRange": "pyro_mpt.masks",
    "Exhaustive": "pyro_mpt.masks",
    "MPTEstimate": "pyro_mpt.scoring",
    "MPTCurve": "pyro_mpt.scoring",
    "mpt_score": "pyro_mpt.scoring",
    "mpt_curve": "pyro_mpt.scoring",
    # adapters: Pyro, GPyTorch, language models
    "MaskedPretrainingELBO": "pyro_mpt.infer",
    "MaskedPretrainingMLL": "pyro_mpt.gp",
    "LeavePOutPseudoLikelihood": "pyro_mpt.gp",
    "ConditionalMarginalLogLikelihood": "pyro_mpt.gp",
    "MaskedPredictor": "pyro_mpt.lm",
    "score_texts": "pyro_mpt.lm",
    # models and the helper that trains them by any objective
    "PPCA": "pyro_mpt.models",
    "FactorAnalysis": "pyro_mpt.models",
    "BayesianLinearRegression": "pyro_mpt.models",
    "BernoulliLatentModel": "pyro_mpt.models",
    "BernoulliLatentGuide": "pyro_mpt.models",
    "fit": "pyro_mpt.models",
    "no_guide": "pyro_mpt.models",
    # evaluation and the ArviZ bridge
    "compare_models": "pyro_mpt.evaluate",
    "from_pyro": "pyro_mpt.inference_data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name's submodule on first use (PEP 562), then keep the name here."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
