"""Sphinx configuration for the pyro_mpt documentation.

Build with ``make docs`` (``sphinx-build -W -b html docs docs/_build/html``). Two pieces of the site
are generated at build time into ``docs/generated/`` (ignored by git) so that they follow the code
without anyone editing them:

* the API reference: one page per public module of ``pyro_mpt``, listing every name in the module's
  ``__all__`` (or, without ``__all__``, every public class and function it defines);
* the experiments page: every ``docs/results/*.md`` table written by ``pyro-mpt reproduce``.

The tutorials are the jupytext percent-format scripts in ``tutorials/``; myst-nb reads them through
the ``docs/tutorials`` symlink and executes them while building, so their figures are real output.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "generated"
sys.path.insert(0, str(ROOT))

project = "pyro_mpt"
author = "the pyro_mpt developers"
copyright = "2026, the pyro_mpt developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    # MathJax shipped with the docs, so the pages render equations without a network connection.
    "sphinx-mathjax-offline",
]

# Tutorials are Python scripts in jupytext's percent format; myst-nb reads them as notebooks.
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
source_suffix = {".md": "myst-nb", ".py": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = [
    "_build",
    "conf.py",
    "results/**",  # included through generated/results.md
    "**/.ipynb_checkpoints",
    "**/__pycache__",
    "tutorials/README*",
]
# Cached execution: a rebuild re-runs only the tutorials whose source changed.
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Result tables are written by the experiments, whose heading levels we do not control.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as :ivar: fields, so NamedTuple fields are not described twice.
napoleon_use_ivar = True

html_theme = "furo"
html_title = "pyro_mpt"
html_static_path: list[str] = []


# -- API reference -------------------------------------------------------------------------------


@functools.cache
def public_modules(package_name: str = "pyro_mpt") -> tuple[str, ...]:
    """Every importable module of the package whose dotted path has no private component."""
    package = importlib.import_module(package_name)
    names = [package_name]
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return tuple(sorted(names))


def public_names(module) -> list[str]:
    """The module's ``__all__``, else the public classes and functions it defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def home_module(obj, exporting_module: str) -> str:
    """The one public module a name is documented in; every other module exporting it links there.

    That is the shallowest subpackage on the path to where the object is defined that exports it
    in its ``__all__`` (the import path users see: ``pyro_mpt.gp.MaskedPretrainingMLL``, not
    ``pyro_mpt.gp.masked_pretraining_mll.MaskedPretrainingMLL``), else the defining module with
    its private parts dropped. Data (constants) live where they are exported.
    """
    defined_in = getattr(obj, "__module__", None)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not defined_in:
        return exporting_module
    if not defined_in.startswith("pyro_mpt"):
        return exporting_module
    name = obj.__name__
    for module_name in sorted(public_modules(), key=len):
        if module_name.count(".") < 1:
            continue  # the top-level package would swallow everything it re-exports
        if not (defined_in == module_name or defined_in.startswith(module_name + ".")):
            continue
        if f"{module_name}.{name}" in public_modules():
            continue  # a function named like its submodule: the module's page keeps the name
        module = importlib.import_module(module_name)
        if name in public_names(module) and getattr(module, name, None) is obj:
            return module_name
    parts = defined_in.split(".")
    while any(part.startswith("_") for part in parts):
        parts.pop()
    return ".".join(parts)


def directive_for(obj) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "autoexception"
        return "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def api_page(module_name: str) -> str:
    module = importlib.import_module(module_name)
    names = public_names(module)
    lines = [module_name, "=" * len(module_name), "", f".. automodule:: {module_name}", ""]
    if names:
        entries = []
        for name in names:
            obj = getattr(module, name)
            entries.append(f"{home_module(obj, module_name)}.{name}")
        # Full names from no current module: entries may live in this module or a submodule.
        lines += [".. currentmodule:: None", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {entry}" for entry in entries]
        lines.append("")
    for name in names:
        obj = getattr(module, name)
        if home_module(obj, module_name) != module_name:
            continue
        options = ["   :members:"] if inspect.isclass(obj) else []
        lines += [f".. {directive_for(obj)}:: {module_name}.{name}", *options, ""]
    return "\n".join(lines)


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change, so Sphinx's incremental build does not redo every page."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate_api() -> None:
    (GENERATED / "api").mkdir(parents=True, exist_ok=True)
    modules = public_modules()
    wanted = {f"{name}.rst" for name in modules}
    for stale in (GENERATED / "api").glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    for name in modules:
        write_if_changed(GENERATED / "api" / f"{name}.rst", api_page(name))


# -- Experiment results --------------------------------------------------------------------------


# E1-E6 in the paper's order (the experiments' names in ``pyro-mpt reproduce``), then the rest.
RESULTS_ORDER = [
    "convergence", "area", "training", "mlm", "binary", "selection", "arviz", "evidence",
]


def generate_results() -> None:
    GENERATED.mkdir(parents=True, exist_ok=True)
    tables = sorted(
        (DOCS / "results").glob("*.md"),
        key=lambda path: (RESULTS_ORDER.index(path.stem) if path.stem in RESULTS_ORDER
                          else len(RESULTS_ORDER), path.stem),
    )
    lines = [
        "# Reproduced experiments",
        "",
        "The paper's experiments (Moreno-Muñoz, Recasens & Hauberg, NeurIPS 2023), reproduced by "
        "`pyro-mpt reproduce NAME` (`make reproduce` runs them all). Each section below is the "
        "`results.md` an experiment wrote, as committed to `docs/results/`.",
        "",
    ]
    if not tables:
        lines.append("No result tables have been committed to `docs/results/` yet.")
    for table in tables:
        first = next((line for line in table.read_text().splitlines() if line.strip()), "")
        if not first.startswith("#"):
            lines += [f"## {table.stem}", ""]
        lines += [f"```{{include}} ../results/{table.name}", ":relative-images:"]
        if first.startswith("# "):
            lines.append(":heading-offset: 1")
        lines += ["```", ""]
    write_if_changed(GENERATED / "results.md", "\n".join(lines) + "\n")


generate_api()
generate_results()


# -- Coverage check ------------------------------------------------------------------------------


def check_api_coverage(app, exception) -> None:
    """Warn (an error under ``-W``) for each public name missing from the built API pages."""
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    pages = Path(app.outdir) / "generated" / "api"
    html = "\n".join(page.read_text() for page in pages.glob("*.html"))
    documented = 0
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in public_names(module):
            target = f"{home_module(getattr(module, name), module_name)}.{name}"
            if f'id="{target}"' in html:
                documented += 1
            else:
                logger.warning("public name %s has no entry in the API reference", target)
    logger.info("API reference: %d public names documented", documented)


def setup(app) -> None:
    app.connect("build-finished", check_api_coverage)
