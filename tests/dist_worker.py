"""Worker of tests/test_distributed.py, launched with ``torchrun --nproc_per_node 2``.

Every rank trains on its own shard of the digits training set, with DDP over gloo on the
CPU and ``broadcast_buffers=False`` (with the default True, DDP would copy rank 0's mask
buffers to every rank before each forward and hide any disagreement). Each rank writes
``<out>/rank<r>.pt`` and leaves with ``os._exit`` (torch's teardown after
``destroy_process_group`` sometimes aborts on this machine).

Scenarios (``--scenario``):

  agree     SET, then RigL, through ``Sparsifier``; saves each run's model state_dict
            (weights and masks), the engine's update history and the mask counts.
  diverge   three runs in which the ranks are made to disagree, each expected to raise
            ``fastsparse.MaskDisagreement`` on every rank:
              flip        RigL; rank 1 moves one active weight of its mask to an inactive
                          position (same count) right before the optimizer step of an
                          update step;
              grow_seed   SET through the seed API: identical masks from
                          ``sparsify_model(seed=0)``, but the optimizer wrapper gets
                          ``seed=rank``, so random growth differs at the first update;
              init_seed   ``Sparsifier(..., seed=rank)``: different initial masks, caught
                          when the engine is built;
              collide     masks {0, 3} on rank 0 and {1, 2} on rank 1 (the same count and the
                          same index-weighted sum), compared directly;
              count       rank 0 holds two masks, rank 1 one, compared directly;
              count_engine  ``Sparsifier`` whose filter selects three layers on rank 0 and two
                          on rank 1: caught when the engine is built, on both ranks (before,
                          gloo aborted on the mismatched collective).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastsparse as sparse
from fastsparse.experiments.data import load_digits_split
from fastsparse.core.masks import sparse_params
from fastsparse.experiments.models import MLP
from helpers import finish

SIZES = (64, 128, 64, 10)
SPARSITY = 0.9
BATCH = 32
EPOCHS = 6
FREQ = 20           # steps between mask updates
FLIP_STEP = 2 * FREQ


class Diverged(Exception):
    """Carries where a MaskDisagreement was raised."""


def shard(rank: int, world: int):
    x_tr, y_tr, _, _ = load_digits_split()
    return x_tr[rank::world].contiguous(), y_tr[rank::world].contiguous()


def build(seed: int = 0) -> tuple[nn.Module, DDP, torch.optim.Optimizer]:
    """The same initial weights on every rank; then a global RNG that differs per rank, so
    that anything drawing from it (instead of the engine's seeded generators) diverges."""
    torch.manual_seed(seed)
    model = MLP(SIZES)
    with warnings.catch_warnings():  # torch 2.13 calls the flag deprecated, but its successor
        warnings.simplefilter("ignore", FutureWarning)  # still syncs buffers at construction
        ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1000 + dist.get_rank())
    return model, ddp, opt


def total_steps(n: int) -> int:
    return EPOCHS * math.ceil(n / BATCH)


def train(ddp: DDP, opt, x, y, rank: int, step_fn=None, before_step=None) -> int:
    """Plain DDP loop; ``before_step(step)`` runs between backward and the optimizer step."""
    loss_f = nn.CrossEntropyLoss()
    step = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x))  # the global RNG: each rank its own data order
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss_f(ddp(x[idx]), y[idx]).backward()
            step += 1  # the optimizer step about to be taken is number `step`
            if before_step is not None:
                before_step(step)
            if step_fn is None:
                opt.step()
            else:
                step_fn(step)
    return step


def summary(model: nn.Module, engine: sparse.Sparsifier, steps: int) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": list(engine.history),
        "active": {sp.name: int(sp.mask.sum()) for sp in sparse_params(model)},
        "sparsity": engine.sparsity(),
        "steps": steps,
    }


def agree(rank: int, world: int) -> dict:
    x, y = shard(rank, world)
    out = {"n_train": len(x), "first_input": x[0].clone()}
    for method in ("set", "rigl"):
        model, ddp, opt = build()
        alg = sparse.create(method, sparsity=SPARSITY, distribution="erk", drop_fraction=0.3,
                            update=sparse.UpdateSchedule(freq=FREQ, stop=0.75))
        engine = sparse.Sparsifier(ddp, opt, alg, total_steps=total_steps(len(x)), seed=7)
        steps = train(ddp, opt, x, y, rank)
        out[method] = summary(model, engine, steps)
    return out


def _expect_disagreement(run) -> dict:
    try:
        run()
    except sparse.MaskDisagreement as e:
        found = re.search(r"at step (\d+)", str(e))
        return {"raised": True, "step": int(found.group(1)) if found else None, "message": str(e)}
    return {"raised": False, "step": None, "message": ""}


def diverge(rank: int, world: int) -> dict:
    x, y = shard(rank, world)
    out = {}

    # flip: same start, rank 1 moves one mask bit just before the update at FLIP_STEP
    def flip():
        model, ddp, opt = build()
        alg = sparse.create("rigl", sparsity=SPARSITY, distribution="erk",
                            update=sparse.UpdateSchedule(freq=FREQ, stop=0.75))
        engine = sparse.Sparsifier(ddp, opt, alg, total_steps=total_steps(len(x)), seed=7)
        mask = sparse_params(model)[0].mask

        def before_step(step):
            if step == FLIP_STEP and rank == 1:
                flat = mask.view(-1)
                on, off = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
                flat[on], flat[off] = False, True
            if step == FLIP_STEP:
                out["flip_updates_before"] = len(engine.history)

        try:
            train(ddp, opt, x, y, rank, before_step=before_step)
        finally:
            out["flip_engine_steps"] = engine.step_count
    out["flip"] = _expect_disagreement(flip)

    # grow_seed: identical masks, the optimizer wrapper seeded by rank (SET's random growth)
    def grow_seed():
        model, ddp, opt = build()
        handle = sparse.sparsify_model(model, model_sparsity=SPARSITY, sparse_f=sparse.erdos_renyi_sparsity, seed=0)
        try:
            sparse_opt = sparse.DynamicSparseTrainingOptimizerWrapper(
                model, opt, **sparse.SET_presets, batches_per_update=FREQ, seed=rank)
            n = total_steps(len(x))
            try:
                train(ddp, opt, x, y, rank, step_fn=lambda step: sparse_opt.step(step, step / n))
            finally:
                out["grow_seed_engine_steps"] = sparse_opt.sparsifier.step_count
        finally:
            handle.remove()
    out["grow_seed"] = _expect_disagreement(grow_seed)

    # init_seed: every rank draws its own initial masks
    def init_seed():
        model, ddp, opt = build()
        sparse.Sparsifier(ddp, opt, sparse.create("set", sparsity=SPARSITY, distribution="erk"),
                          total_steps=total_steps(len(x)), seed=rank)
        out["init_seed_built"] = True
    out["init_seed"] = _expect_disagreement(init_seed)

    from fastsparse.engine.distributed import check_agreement

    def collide():
        m = torch.zeros(4, dtype=torch.bool)
        m[[0, 3] if rank == 0 else [1, 2]] = True
        check_agreement(["m"], [m], step=0)
    out["collide"] = _expect_disagreement(collide)

    def count():
        masks = [torch.ones(3, dtype=torch.bool)] * (2 if rank == 0 else 1)
        check_agreement([f"m{i}" for i in range(len(masks))], masks, step=5)
    out["count"] = _expect_disagreement(count)

    def count_engine():
        model, ddp, opt = build()
        include = ["0.weight", "2.weight", "4.weight"] if rank == 0 else ["0.weight", "2.weight"]
        sparse.Sparsifier(model, opt, sparse.create("set", sparsity=SPARSITY, include=include),
                          total_steps=total_steps(len(x)), seed=7)
        out["count_engine_built"] = True
    out["count_engine"] = _expect_disagreement(count_engine)

    def agree_after():   # the group still works after the refusals above: identical masks pass
        m = torch.zeros(4, dtype=torch.bool)
        m[[0, 3]] = True
        check_agreement(["m"], [m], step=0)
        out["agree_after"] = True
    out["agree_after_check"] = _expect_disagreement(agree_after)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=["agree", "diverge"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()

    def body():
        result = agree(rank, world) if args.scenario == "agree" else diverge(rank, world)
        result["rank"], result["world"] = rank, world
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))

    finish(body, os.path.join(args.out, f"rank{rank}.err"))


if __name__ == "__main__":
    main()
