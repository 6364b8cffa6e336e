"""Masked pre-training on PyTorch Lightning DDP: one process per device, the same answer.

Modelled on Pyro's ``examples/svi_lightning.py``: ``loss_fn = elbo(model, guide)`` is an
``ELBOModule``, a ``LightningModule`` calls it in ``training_step``, a plain torch optimiser steps,
and ``pl.Trainer(strategy="ddp", devices=N)`` runs one process per device while a
``DistributedSampler`` shards the rows. Two things make the answer independent of N:

* the model gets the **global indices** of its rows and passes them to its plate,
  ``pyro.plate("data", num_data, subsample=indices)`` (the models of ``pyro_mpt.models`` take
  ``subsample=``), instead of letting every process draw identical random indices;
* ``MaskedPretrainingELBO(seed=...)`` keys the masks and importance particles of each row by
  ``(seed, step, global row index)``, so two processes draw for their rows exactly what one
  process draws over the union of their batches. DDP averages the gradients, and the run on N
  processes takes the steps of the run on one process with the global batch.

Estimates with a standard error are computed from the rows of every process
(``mpt_score(..., gather=True)``), never by averaging per-process standard errors.

DDP's default ``find_unused_parameters=False`` is right here because every parameter gets a
gradient at every step: the collapsed PPCA has only model parameters, and with
``proposal="guide"`` the guide is trained by the wake-phi term. With ``proposal="prior"`` a guide
with sites for the local latents is not used and its parameters get no gradient, which DDP
reports as an error; leave those sites out of the guide (as ``build`` does), or pass
``--strategy ddp_find_unused_parameters_true``, which searches the graph at every step.

Run it (``pip install -e ".[lightning]"``)::

    python examples/mpt_lightning.py --model ppca --accelerator cpu --devices 2 --strategy ddp
    python examples/mpt_lightning.py --model bernoulli --accelerator cpu --devices 2 --strategy ddp

``--out results.json`` writes the per-step losses (averaged over processes), the evaluations
before and after training and the learned parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import lightning.pytorch as pl
import numpy as np
import pyro
import torch
from scipy.linalg import subspace_angles
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.decomposition import PCA

from pyro_mpt.datasets import load_binarized_digits, load_digits
from pyro_mpt.distributed import gather_rows
from pyro_mpt.infer import MaskedPretrainingELBO
from pyro_mpt.masks import Stratified, fold_in
from pyro_mpt.models import PPCA, BernoulliLatentModel, no_guide
from pyro_mpt.models.bernoulli_latent_guide import BernoulliLatentGuide
from pyro_mpt.scoring import mpt_score

EVALUATION = 0x6576616C  # a key stream of its own for the evaluation masks


class MPTLightningModule(pl.LightningModule):
    """Trains ``loss_fn = MaskedPretrainingELBO(...)(model, guide)`` on ``(index, x)`` batches."""

    def __init__(self, loss_fn, data, args):
        super().__init__()
        self.loss_fn = loss_fn
        self.model, self.guide = loss_fn.model, loss_fn.guide
        self.data, self.args = data, args
        self.history = {"loss": [], "evaluations": []}

    def train_dataloader(self):
        # (index, row) pairs; --repeat passes over the rows make one (longer) epoch.
        rows = torch.utils.data.TensorDataset(torch.arange(len(self.data)), self.data)
        rows = torch.utils.data.ConcatDataset([rows] * self.args.repeat)
        # Process r of N gets positions r, r + N, r + 2N, ... of one order of the rows (a
        # permutation drawn from the seed and the epoch, or the order itself): every global
        # batch is the same set of rows on any number of processes, one included.
        sampler = torch.utils.data.DistributedSampler(
            rows, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
            shuffle=self.args.shuffle, seed=self.args.seed,
        )
        return torch.utils.data.DataLoader(rows, batch_size=self.args.batch_size, sampler=sampler)

    def training_step(self, batch, batch_idx):
        index, x = batch
        # The global row indices go to the plate: the same keys on any number of processes.
        loss = self.loss_fn(x, num_data=len(self.data), subsample=index) / len(self.data)
        self.history["loss"].append(loss.item())  # this process's; averaged at the end
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.loss_fn.parameters(), lr=self.args.lr)
        steps = self.trainer.estimated_stepping_batches
        if self.args.swa_start:
            steps = max(1, math.ceil(steps * self.args.swa_start))
        final = self.args.swa_lr if self.args.swa_start else self.args.lr * 1e-3
        # A decaying step size: a stochastic objective otherwise stalls at a gradient-noise floor.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: final / self.args.lr
            + (1 - final / self.args.lr) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self):
        self.history["evaluations"].append(self.evaluate("before"))

    def on_train_end(self):  # after StochasticWeightAveraging has set the averaged weights
        self.history["evaluations"].append(self.evaluate("after"))
        # DDP averages the gradients of the processes, so the mean of their losses is the loss
        # of the global batch (gathered once here rather than synchronised at every step).
        losses = gather_rows(torch.tensor(self.history["loss"]).unsqueeze(0))
        self.history["loss"] = losses.mean(0).tolist()

    @torch.no_grad()
    def evaluate(self, when: str) -> dict:
        """Per-datum scores over all rows, each process scoring its shard (gathered)."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = torch.arange(rank, len(self.data), world)  # this process's shard of the rows
        x = self.data[rows]
        row = {"when": when, "step": self.global_step}
        row["exact_lml"] = gather_rows(self.model.log_marginal(x)).mean().item()
        if isinstance(self.model, PPCA):
            keys = fold_in(fold_in(fold_in(self.args.seed, EVALUATION), self.global_step), rows)
            # Two masks of every size per row, as pyro_mpt.evaluate does: unbiased, with an s.e.
            scored = mpt_score(self.model.marginal(), x, Stratified(2), keys=keys,
                               reduction="mean", gather=True)
            own = mpt_score(self.model.marginal(), x, Stratified(2), keys=keys, reduction="mean")
            row["mpt"], row["mpt_se"] = scored.mean.item(), scored.stderr.item()
            # What averaging per-process standard errors would report (wrong; kept to compare).
            row["mpt_se_per_process"] = gather_rows(own.stderr.reshape(1)).tolist()
        return row


def load(args) -> torch.Tensor:
    data = load_digits() if args.model == "ppca" else load_binarized_digits()
    if args.digits:
        labels = torch.as_tensor(sklearn_digits().target)
        data = data[torch.isin(labels, torch.tensor(args.digits))]
    data = data[: args.rows] if args.rows else data
    return data - data.mean(0) if args.model == "ppca" else data


def build(args, data):
    if args.model == "ppca":
        model = PPCA(data.shape[1], args.latent_dim, generator=torch.Generator().manual_seed(
            args.seed))
        elbo = MaskedPretrainingELBO(num_masks=args.num_masks, seed=args.seed)
        return elbo(model, no_guide)  # collapsed: no latents, type-II maximum likelihood
    model = BernoulliLatentModel(data.shape[1], generator=torch.Generator().manual_seed(args.seed))
    guide = BernoulliLatentGuide(data.shape[1])
    elbo = MaskedPretrainingELBO(
        num_masks=args.num_masks, proposal=args.proposal, seed=args.seed,
        num_importance_samples=args.particles,
    )
    # With proposal="prior" the guide's parameters would get no gradient: DDP then needs
    # find_unused_parameters=True, or (better) no guide sites for the local latents.
    return elbo(model, guide if args.proposal == "guide" else no_guide)


def principal_angle(loading: torch.Tensor, data: torch.Tensor) -> float:
    """Largest principal angle between span(W) and the top principal components of the data."""
    k = loading.shape[1]
    components = torch.linalg.eigh(data.T @ data / len(data)).eigenvectors[:, -k:]
    return float(np.max(subspace_angles(loading.double().numpy(), components.double().numpy())))


def main(args):
    # Every process runs this function (Lightning's "ddp" re-launches the script): same seeds,
    # same data, same initial parameters.
    pl.seed_everything(args.seed, verbose=False)
    pyro.set_rng_seed(args.seed)
    pyro.settings.set(module_local_params=True)
    data = load(args)
    loss_fn = build(args, data)

    # As in Pyro's example: one call creates any lazy parameters before the optimiser is
    # configured. MaskedPretrainingELBO creates none after it (checked below).
    warm_up = torch.arange(min(len(data), args.batch_size))
    loss_fn(data[warm_up], num_data=len(data), subsample=warm_up)
    parameters = sum(p.numel() for p in loss_fn.parameters())

    module = MPTLightningModule(loss_fn, data, args)
    callbacks = []
    if args.swa_start:
        callbacks.append(pl.callbacks.StochasticWeightAveraging(
            swa_lrs=args.swa_lr, swa_epoch_start=args.swa_start, annealing_epochs=1))
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        strategy=args.strategy,
        devices=args.devices,
        max_epochs=args.epochs,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the module's train_dataloader shards the rows itself
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - start
    if sum(p.numel() for p in loss_fn.parameters()) != parameters:
        raise RuntimeError("parameters were created after the first call")

    if trainer.global_rank == 0:
        before, after = module.history["evaluations"]
        result = {
            "args": vars(args),
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "wall_time": wall,
            "losses": module.history["loss"],
            "evaluations": module.history["evaluations"],
        }
        if args.model == "ppca":
            loading = module.model.cov_factor.detach()
            result["cov_factor"] = loading.tolist()
            result["noise_scale"] = module.model.noise_scale.item()
            result["principal_angle"] = principal_angle(loading, data)
            optimum = PCA(args.latent_dim).fit(data.numpy()).score(data.numpy())
            print(f"PPCA, {trainer.world_size} process(es): exact LML per datum "
                  f"{before['exact_lml']:.3f} -> {after['exact_lml']:.3f} (closed-form "
                  f"optimum {optimum:.3f}); MPT estimate "
                  f"{after['mpt']:.3f} +/- {after['mpt_se']:.3f}; largest principal angle to "
                  f"PCA {result['principal_angle']:.2e} rad ({wall:.1f} s)")
        else:
            print(f"Bernoulli latent model, {trainer.world_size} process(es): quadrature LML per "
                  f"datum {before['exact_lml']:.3f} -> {after['exact_lml']:.3f} ({wall:.1f} s)")
        if args.out:
            with open(args.out, "w") as file:
                json.dump(result, file)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Masked pre-training on PyTorch Lightning DDP")
    parser.add_argument("--model", choices=["ppca", "bernoulli"], default="ppca")
    parser.add_argument("--digits", type=lambda s: [int(d) for d in s.split(",")], default=None,
                        help="keep only these digit classes, e.g. 0,1 (default: all)")
    parser.add_argument("--rows", type=int, default=0, help="keep the first rows (0: all)")
    parser.add_argument("--latent-dim", type=int, default=5, help="PPCA's K")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per process and step")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over the rows per epoch (fewer, longer epochs)")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="visit the rows in order (with --batch-size N / devices and "
                        "--repeat, every step sees every row)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-masks", type=int, default=1)
    parser.add_argument("--proposal", choices=["guide", "prior"], default="guide")
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--swa-start", type=float, default=0.0,
                        help="average the weights from this fraction of the epochs on (0: off)")
    parser.add_argument("--swa-lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true")
    # pl.Trainer arguments, as in Pyro's example.
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", default="auto", type=lambda s: s if s == "auto" else int(s))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
