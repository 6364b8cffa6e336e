"""Standard errors across processes (issue #13): estimated from the gathered per-row values, the
same as one process computes on the same rows, never an average of per-process standard errors.

Two gloo processes (``torch.distributed``, one thread each) hold unequal shards of the rows."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_mpt.distributed import gather_rows, is_distributed
from pyro_mpt.evaluate import evaluate_model
from pyro_mpt.masks import Stratified, fold_in
from pyro_mpt.scoring import mpt_score

SHARDS = [torch.tensor([4, 0, 7]), torch.tensor([1, 8, 2, 6, 3, 5, 9, 10])]


def _problem():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 2, generator=g)
    d = torch.distributions.LowRankMultivariateNormal(torch.zeros(6), factor, torch.ones(6))
    x = torch.randn(11, 6, generator=g) * 2  # a poor fit: rows differ in their mask noise
    return d, x


def _scores(d, x, rows):
    keys = fold_in(fold_in(0, 17), rows)
    gathered = mpt_score(d, x[rows], Stratified(2), keys=keys, reduction="mean", gather=True)
    own = mpt_score(d, x[rows], Stratified(2), keys=keys, reduction="mean")
    table = evaluate_model(d, x[rows], keys=keys, gather=True)
    return gathered, own, table


def _worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SHARDS)
    )
    try:
        d, x = _problem()
        gathered, own, table = _scores(d, x, SHARDS[rank])
        rows = gather_rows(x[SHARDS[rank]].T, dim=1).T  # rank order: shard 0, then shard 1
        torch.save(
            {"gathered": tuple(gathered), "own": tuple(own), "table": table, "rows": rows,
             "distributed": is_distributed()},
            f"{path}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_standard_errors_equal_the_one_process_ones(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=len(SHARDS))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(SHARDS))]
    d, x = _problem()
    union = torch.cat(SHARDS)
    assert torch.equal(results[0]["rows"], x[union]) and results[0]["distributed"]

    # One process, the same rows, the same keyed masks.
    single, _, table = _scores(d, x, union)
    for result in results:  # every process reports the same
        mean, stderr, dof = result["gathered"]
        assert torch.allclose(mean, single.mean, rtol=1e-6)
        assert torch.allclose(stderr, single.stderr, rtol=1e-5)
        assert torch.allclose(torch.as_tensor(dof), torch.as_tensor(single.dof), rtol=1e-5)
        for key, value in table.items():
            assert result["table"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert results[0]["table"]["N"] == len(union)

    # Averaging the per-process standard errors gives another number (0.781 against 0.733
    # here; with equal shards of alike rows it would be sqrt(2) times too large).
    naive = sum(result["own"][1] for result in results) / len(results)
    assert abs(naive / single.stderr - 1) > 0.05
    # Pooling per-process variances by hand (the correct combination) gives the gathered one.
    counts = torch.tensor([len(s) for s in SHARDS], dtype=torch.float32)
    variance = sum((c * r["own"][1]) ** 2 for c, r in zip(counts, results, strict=True))
    assert torch.allclose(variance.sqrt() / counts.sum(), single.stderr, rtol=1e-5)


def test_without_a_process_group_gathering_changes_nothing():
    assert not is_distributed()
    d, x = _problem()
    keys = fold_in(0, torch.arange(11))
    plain = mpt_score(d, x, keys=keys, num_masks=2, reduction="mean")
    gathered = mpt_score(d, x, keys=keys, num_masks=2, reduction="mean", gather=True)
    assert torch.equal(plain.mean, gathered.mean) and torch.equal(plain.stderr, gathered.stderr)
    assert not gathered.mean.requires_grad
