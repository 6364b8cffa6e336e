"""pyro_mpt: train, score and compare probabilistic models by masked pre-training.

Example:
    >>> import pyro_mpt
    >>> pyro_mpt.__version__ == __import__("importlib.metadata").metadata.version("pyro_mpt")
    True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyro_mpt")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
