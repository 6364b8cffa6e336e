"""Fixtures for tests and doctests: one thread, fixed seeds, a clean Pyro param store."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread per test worker: the tests' tensors are small, and more threads than
    cores (two xdist workers on two cores) make torch's batched kernels spin, 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_clear():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
