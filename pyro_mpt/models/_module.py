"""The base class of the models in :mod:`pyro_mpt.models`: a ``PyroModule`` with its own parameters.

Pyro's param store is one global dictionary keyed by name, and a root ``PyroModule`` names its
parameters after its ``name`` argument (default ``""``): the ``PyroParam`` ``noise_scale`` of
``PPCA()`` is stored as ``"noise_scale"``. When a second root module with the same name runs under a
Pyro handler that reads parameters (``SVI``, ``Trace_ELBO``, :func:`~pyro_mpt.models.fit`),
``PyroModule.__getattr__`` finds the name already in the store and *adopts the tensor it finds
there* (store -> module synchronisation, pyro/nn/module.py). Two fresh ``PPCA`` objects trained one
after the other would then share, and keep training, a single set of parameters, without an error.

Naming each instance differently (``"PPCA_0"``, ``"PPCA_1"``, ...) keeps everything else about the
store as Pyro users know it (parameters are listed, saved, loaded and cleared by name) and makes
instances independent, as ``torch.nn.Module`` instances are. Pyro's alternative,
``pyro.settings.set(module_local_params=True)``, is a process-wide switch that changes the
behaviour of every ``PyroModule``: not a library's to flip for its users.
"""

from __future__ import annotations

import itertools
from typing import Any

from pyro.nn import PyroModule

__all__ = ["InstanceModule"]

# One counter for every class, so that names are unique even for two classes that share a
# ``__name__`` (a user's subclass ``PPCA`` of ours). ``next`` on ``itertools.count`` is atomic.
_instances = itertools.count()


def _fresh_name(module: PyroModule) -> str:
    return f"{type(module).__name__}_{next(_instances)}"


class InstanceModule(PyroModule):
    """A ``PyroModule`` that names its Pyro parameters per instance: ``"PPCA_3.noise_scale"``.

    Every model of :mod:`pyro_mpt.models` derives from it, so that two instances never share
    parameters through Pyro's global param store, whatever trains them. A copy
    (``copy.deepcopy``, or unpickling) is a new instance and gets a new name. A model assigned as an
    attribute of another ``PyroModule`` takes the name Pyro gives it there (``"parent.model"``), as
    any sub-``PyroModule`` does.

    Only *parameter* names carry the prefix. Sample sites, which guides, ``poutine.condition`` and
    :class:`~pyro_mpt.infer.MaskedPretrainingELBO` refer to, keep fixed names: the models write
    them as ``pyro.sample("x", ...)`` in ``forward`` rather than as ``PyroSample`` attributes, which
    would be prefixed too.

    Example:
        >>> import pyro, torch
        >>> from pyro.nn import PyroParam
        >>> class Shift(InstanceModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.loc = PyroParam(torch.zeros(()))
        ...     def forward(self):
        ...         return self.loc
        >>> first, second = Shift(), Shift()
        >>> _ = first(), second()  # running under Pyro puts each parameter in the param store
        >>> store = pyro.get_param_store()
        >>> [store.param_name(module.loc_unconstrained) for module in (first, second)]
        ... # doctest: +ELLIPSIS
        ['Shift_....loc', 'Shift_....loc']
        >>> len(store.keys())
        2
    """

    def __init__(self) -> None:
        name = _fresh_name(self)
        super().__init__(name=name)
        # Remembered to tell our own name from one a parent PyroModule assigned (see __setstate__).
        self._instance_name = name

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A copy with the original's name would adopt the original's parameters from the store the
        # first time it runs. Renaming is only ours to do while the module is a root: a
        # sub-module's name belongs to its parent.
        if self._pyro_name == self._instance_name:
            self._pyro_name = self._instance_name = _fresh_name(self)
