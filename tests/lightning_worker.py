"""Lightning pieces shared by tests/test_lightning.py, and its two-process DDP worker.

As a worker it is launched with ``torchrun --nproc_per_node 2`` (Lightning then sees a
torchelastic environment and does not spawn processes itself) and trains the digits MLP
twice on the CPU over gloo, each rank on its half of the training set (Lightning's
DistributedSampler):

  rigl  ``DDPStrategy(broadcast_buffers=False)``: with DDP's default, rank 0's mask buffers
        would be copied to every rank before each forward and hide a disagreement;
  set   ``strategy="ddp"`` exactly as a user writes it.

Before training, the global RNG is seeded differently on each rank, so that a random choice
not drawn from the engine's seeded generators would make the ranks diverge. Each rank writes
``<out>/rank<r>.pt`` (or ``rank<r>.err``), waits for the other and leaves with ``os._exit``
(torch's teardown sometimes aborts on this machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastsparse as sparse
from fastsparse.experiments.data import load_digits_split
from fastsparse.core.masks import sparse_params
from fastsparse.experiments.models import MLP

SIZES = (64, 128, 64, 10)
SPARSITY = 0.9
BATCH = 32
FREQ = 10


class DigitsModule(pl.LightningModule):
    """The digits MLP, trained with SGD (momentum 0.9)."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = MLP(SIZES)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call (on whichever rank makes it)."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def rigl(freq: int = FREQ) -> sparse.SparsityAlgorithm:
    return sparse.RigL(sparsity=SPARSITY, distribution="erk", update=sparse.UpdateSchedule(freq=freq, stop=0.75))


def digits_loader() -> DataLoader:
    x, y, _, _ = load_digits_split()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def trainer(max_epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=RecordingLogger(),
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0, log_every_n_steps=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def summary(module: DigitsModule, cb, trainer_: pl.Trainer) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "history": list(cb.sparsifier.history),
        "step_count": cb.sparsifier.step_count,
        "global_step": trainer_.global_step,
        "records": [(s, m) for s, m in trainer_.logger.records if any(k.startswith("sparsity/") for k in m)],
        "active": {sp.name: int(sp.mask.sum()) for sp in sparse_params(module)},
    }


def ddp_run(rank: int, strategy, algorithm) -> dict:
    from fastsparse.integrations.lightning import SparseLightningCallback

    torch.manual_seed(0)
    module = DigitsModule()
    torch.manual_seed(1000 + rank)  # a rank-dependent global RNG from here on
    cb = SparseLightningCallback(algorithm, seed=7)
    t = trainer(3, [cb], strategy=strategy, devices=2, num_nodes=1)
    t.fit(module, digits_loader())
    out = summary(module, cb, t)
    out["is_global_zero"] = t.is_global_zero
    out["batches_per_epoch"] = t.num_training_batches
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    try:
        from lightning.pytorch.strategies import DDPStrategy

        result = {"rank": rank, "world": int(os.environ["WORLD_SIZE"])}
        result["rigl"] = ddp_run(rank, DDPStrategy(broadcast_buffers=False, process_group_backend="gloo"), rigl())
        result["set"] = ddp_run(rank, "ddp", sparse.SET(sparsity=SPARSITY, distribution="erk",
                                                         update=sparse.UpdateSchedule(freq=FREQ, stop=0.75)))
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        with open(os.path.join(args.out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.barrier()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the results are written; leave regardless
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
