"""What a mask update communicates under FSDP2 (``fully_shard``), and what it costs.

Run under torchrun (gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node 2 benchmarks/fsdp_updates.py            # both cases below
    torchrun --nproc_per_node 2 benchmarks/fsdp_updates.py --repeats 11

Per case, one RigL update of every sparse layer at 90 % sparsity (keep |w|, grow |grad|, drop
fraction 0.3), timed as the median of ``--repeats``:

* ``selection``: what the engine does: per layer one all_reduce of the active count and two exact
  selections (:func:`fastsparse.core.sharded.sharded_topk_among`), then the rank check
  (:func:`fastsparse.engine.fsdp.check_sharded_agreement`); bytes counted at every collective
  (payload this rank sends into each call, an all_gather's whole result);
* ``gather``: what an update that gathers each layer would move instead: the weight and the
  gradient of every layer, whole (``full_tensor``), timed, with the bytes each rank receives;
* ``one process``: the same selection on the whole layer in one process (``topk_mask`` twice).

Cases: one 4096 x 4096 Linear layer; the digits MLP 64-300-100-10 (three sparse layers).
Rank 0 prints one table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import fastsparse as sparse
from fastsparse.algorithms.dst import _topk_among
from fastsparse.core.masks import sparse_params
from fastsparse.core.schedules import Clock
from fastsparse.core.sharded import TRAFFIC, local
from fastsparse.engine.fsdp import check_sharded_agreement, sharded_update
from fastsparse.experiments.models import MLP


def build(case: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if case == "4096x4096":
        model, x = nn.Sequential(nn.Linear(4096, 4096, bias=False)), torch.randn(8, 4096)
    else:
        model, x = MLP((64, 300, 100, 10)), torch.rand(64, 64)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model, x


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(case: str, repeats: int) -> dict:
    model, x = build(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    alg = sparse.create("rigl", sparsity=0.9, drop_fraction=0.3, update=sparse.UpdateSchedule(freq=1000))
    engine = sparse.Sparsifier(model, opt, alg, total_steps=10_000, seed=0)
    model(x).sum().backward()
    params = [sp for g in engine.groups for sp in g.params]
    clock = Clock(1, 10_000)

    def update():
        new, counts, _ = sharded_update(alg, params, opt, clock, 0)
        check_sharded_agreement([sp.name for sp in params], [sp.mask for sp in params], counts, 0, 1)

    update()   # warm
    TRAFFIC.bytes = TRAFFIC.calls = 0
    update()
    sent, calls = TRAFFIC.bytes, TRAFFIC.calls
    t_sel = median_time(update, repeats)
    gathered = sum(2 * sp.param.numel() * sp.param.element_size() for sp in params)
    world = dist.get_world_size()
    t_gather = median_time(lambda: [(sp.param.full_tensor(), sp.param.grad.full_tensor()) for sp in params], repeats)
    whole = [(sp.param.full_tensor().abs(), sp.param.grad.full_tensor().abs(), sp.mask.full_tensor()) for sp in params]

    def one_process():
        for w, g, m in whole:
            a = int(m.count_nonzero())
            kept = _topk_among(w, m, a - int(0.3 * a))
            _topk_among(g, ~kept, int(0.3 * a))

    t_one = median_time(one_process, repeats)
    return {"case": case, "layers": len(params), "weights": sum(sp.param.numel() for sp in params),
            "bytes": sent, "calls": calls, "t_sel": t_sel, "gather_bytes": gathered * (world - 1) // world,
            "t_gather": t_gather, "t_one": t_one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = [measure(case, args.repeats) for case in ("4096x4096", "digits MLP")]
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks, gloo, {args.repeats} repeats (median)")
        print("| case | sparse weights | sharded update: bytes sent / collectives | time | gathering the layers instead:"
              " bytes received | time | one process, whole layers |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['weights']:,} in {r['layers']} | {r['bytes']:,} B / {r['calls']} | "
                  f"{r['t_sel'] * 1e3:.1f} ms | {r['gather_bytes']:,} B | {r['t_gather'] * 1e3:.1f} ms | "
                  f"{r['t_one'] * 1e3:.1f} ms |")
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
