"""pyro_mpt limits intra-op threads in its own forward and backward work, and restores them."""

import subprocess
import sys
import time

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import threads
from pyro_mpt.gp import MaskedPretrainingMLL
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.scoring import mpt_score
from pyro_mpt.threads import (
    CpuReading,
    free_cores,
    limit_threads_in_backward,
    limited_threads,
    set_thread_limit,
)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
    set_thread_limit("auto")


def test_elbo_limits_forward_and_the_callers_backward(two_threads):
    loc = torch.zeros(3, requires_grad=True)
    forward_threads, backward_threads = [], []

    def model(x):
        forward_threads.append(torch.get_num_threads())
        shifted = loc + 0.0
        shifted.register_hook(lambda grad: backward_threads.append(torch.get_num_threads()))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.MultivariateNormal(shifted, torch.eye(3) + 0.5), obs=x)

    loss = MaskedPretrainingELBO().differentiable_loss(model, lambda x: None, torch.randn(5, 3))
    assert torch.get_num_threads() == 2
    loss.backward()
    assert forward_threads == [1] and backward_threads == [1]
    assert torch.get_num_threads() == 2  # restored when the backward pass ended
    assert loc.grad is not None


def test_gp_objective_and_mpt_score_limit_threads(two_threads):
    x = torch.linspace(0, 1, 20)
    y = torch.sin(6 * x)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.RBFKernel()

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs))

    model = GP()
    output = model(x)
    seen = []
    output.loc.register_hook(lambda grad: seen.append(torch.get_num_threads()))
    (-MaskedPretrainingMLL(model.likelihood, model)(output, y)).backward()
    assert len(seen) == 1 and torch.get_num_threads() == 2

    scale = torch.ones(3, requires_grad=True)
    d = dist.Normal(torch.zeros(3), scale).to_event(1)
    mpt_score(d, torch.randn(4, 3)).mean.sum().backward()
    assert torch.get_num_threads() == 2 and scale.grad is not None


def test_the_limit_can_be_lifted(two_threads):
    set_thread_limit(None)
    x = torch.ones(2, requires_grad=True)
    seen = []
    y = 2 * x
    y.register_hook(lambda grad: seen.append(torch.get_num_threads()))
    limit_threads_in_backward(y.sum()).backward()
    assert seen == [2]
    with pytest.raises(ValueError, match="limit must be a positive integer, None or 'auto'"):
        set_thread_limit(0)
    set_thread_limit(1)
    with limited_threads(dense=True):
        assert torch.get_num_threads() == 1


def test_free_cores_leave_out_this_process_and_count_the_others():
    start = CpuReading(busy=10.0, total=20.0, own=3.0)
    # 2 s on 4 cores (8 core-seconds): 7 busy, 4 of them ours: others used 1.5 cores.
    assert free_cores(start, CpuReading(17.0, 28.0, 7.0), cores=4) == pytest.approx(2.5)
    # Busy only with our own threads: every core is free for us.
    assert free_cores(start, CpuReading(18.0, 28.0, 11.0), cores=4) == 4.0
    # Others saturate the machine (and a clock that did not advance changes nothing).
    assert free_cores(start, CpuReading(18.0, 28.0, 3.0), cores=4) == 0.0
    assert free_cores(start, start, cores=4) == 4.0


def test_dense_work_yields_the_cores_another_process_takes(two_threads):
    """Under "auto", dense work (an exact GP) takes the cores other processes leave idle: with a
    process spinning on every core but one, that is one thread. (The idle-machine half, two
    threads, cannot be tested on a shared CI machine.)"""
    if threads._read_cpu(frozenset({0})) is None:
        pytest.skip("needs /proc/stat")
    cores = torch.get_num_threads()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(cores - 1)]
    try:
        time.sleep(0.5)
        threads._idle_cores()  # start an interval
        time.sleep(1.0)
        with limited_threads(dense=True):
            assert torch.get_num_threads() == 1
        with limited_threads():  # small batched work: one thread whatever the load
            assert torch.get_num_threads() == 1
    finally:
        for spinner in spinners:
            spinner.kill()
