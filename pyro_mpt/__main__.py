"""``python -m pyro_mpt``: the ``pyro-mpt`` command line (:func:`pyro_mpt.cli.main`)."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
