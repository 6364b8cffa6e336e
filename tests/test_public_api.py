"""The public API: one name per concept across modules, and a light top-level package."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from collections import defaultdict

import pytest

import pyro_mpt

# Optional extras: a module that needs one is checked only where it is installed.
OPTIONAL = {"transformers", "tokenizers", "accelerate", "lightning"}

# Names that several modules define on purpose, each a protocol a caller looks up by module:
# every experiment is a module of pyro_mpt.experiments with a ``run`` that `pyro-mpt reproduce
# NAME` calls (see pyro_mpt.experiments.EXPERIMENTS).
PROTOCOLS = {"run": "pyro_mpt.experiments."}


def _modules():
    names = ["pyro_mpt"]
    for info in pkgutil.walk_packages(pyro_mpt.__path__, "pyro_mpt."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it runs the command line
            names.append(info.name)
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] in OPTIONAL:
                continue
            raise
    return modules


MODULES = _modules()


def test_every_module_declares_its_public_names():
    missing = [module.__name__ for module in MODULES if not hasattr(module, "__all__")]
    assert not missing, f"modules without __all__: {missing}"
    for module in MODULES:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ lists {name!r}, undefined"
        assert len(set(module.__all__)) == len(module.__all__), module.__name__


def test_no_two_public_functions_or_classes_share_a_name():
    # name -> {id(object): (object, [modules exporting it])}; a re-export is the same object.
    exported: dict[str, dict[int, tuple[object, list[str]]]] = defaultdict(dict)
    for module in MODULES:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                exported[name].setdefault(id(value), (value, []))[1].append(module.__name__)
    clashes = {}
    for name, objects in exported.items():
        if len(objects) < 2:
            continue
        where = sorted(f"{value.__module__}.{value.__qualname__}" for value, _ in objects.values())
        prefix = PROTOCOLS.get(name)
        if prefix is not None and all(place.startswith(prefix) for place in where):
            continue
        clashes[name] = where
    assert not clashes, f"one public name, several objects: {clashes}"


def test_the_top_level_names_are_the_submodules_objects():
    assert pyro_mpt.__all__[0] == "__version__"
    listing = dir(pyro_mpt)
    for name in pyro_mpt.__all__[1:]:
        assert name in listing
        home = importlib.import_module(pyro_mpt._EXPORTS[name])
        assert getattr(pyro_mpt, name) is getattr(home, name)
        assert name in home.__all__
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        pyro_mpt.fitt  # noqa: B018


def test_import_pyro_mpt_is_light():
    # A fresh interpreter: torch, Pyro, GPyTorch and transformers are imported when a name that
    # needs them is first used, not by `import pyro_mpt`.
    code = (
        "import sys\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules}\n"
        "                      & {'torch', 'pyro', 'gpytorch', 'transformers'})\n"
        "import pyro_mpt\n"
        "print(heavy())\n"
        "pyro_mpt.Cumulative, pyro_mpt.MaskedPretrainingELBO, pyro_mpt.MaskedPredictor\n"
        "print(heavy())\n"
        "pyro_mpt.MaskedPretrainingMLL\n"
        "print(heavy())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    assert run.stdout.split("\n")[:3] == [
        "[]",
        "['pyro', 'torch']",
        "['gpytorch', 'pyro', 'torch']",
    ], run.stdout
