"""Worker of tests/test_fsdp.py, launched with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Every rank also trains the same model in one process, unsharded (the reference), on the same
batches; the FSDP2 run (``fully_shard`` on every layer, then the root) gathers its masks after
every update (for the test only) so that they can be compared with the reference's.
Each rank writes ``<out>/rank<r>.pt`` (tensors and plain values, loadable with weights_only)
and leaves with ``os._exit``.

Scenarios (``--scenario``):

  select    the sharded selection against ``_topk_among`` on 300 random small tensors (ties,
            ±0, ±inf, layers with fewer rows than ranks, k from 0 to all).
  agree     static, SET, RigL on the digits MLP and SET, RigL on a small conv net; ``same``:
            both ranks see the whole batch (FSDP's average of two equal gradients is exact, so
            weights and masks must match the reference bit for bit); ``split``: each rank half of
            the batch (RigL's gradient is then a reduction in another order).
  diverge   MaskDisagreement on every rank: a per-rank seed (at build), rank 1 clearing one
            mask bit (at the next update), a per-rank sparsity (at build), a per-rank k handed to
            the selection; then a check that passes, so the group still works.
  refuse    what FSDP does not run: sparse execution, GMP, a non-default drop rule.
  dcp       a sharded checkpoint (torch.distributed.checkpoint) after 25 steps of RigL; training on
            25 steps from it, and from a fresh model that loads it (bit for bit the same); loads
            refused before any change: another identity, a missing shard, a corrupted shard, a
            .metadata pickling a function (never read) with a manifest whose checksums match and
            whose metadata points a chunk outside the folder; the whole state at the save for the
            one-process load.
  reload    (3 ranks) the checkpoint of ``dcp``, saved by 2 ranks, loaded into 3 shards.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import fastsparse as sparse
from fastsparse.algorithms.dst import _topk_among
from fastsparse.core.masks import sparse_params
from fastsparse.core.sharded import local, shard_like, sharded_topk_among
from fastsparse.experiments.data import load_digits_split
from fastsparse.experiments.models import MLP, SmallCNN
from helpers import finish

SIZES = (64, 128, 64, 10)
BATCH = 32
STEPS = 60
FREQ = 10


def build(net: str) -> tuple[nn.Module, nn.Module]:
    """(reference, sharded): the same initial weights."""
    torch.manual_seed(0)
    model = MLP(SIZES) if net == "mlp" else SmallCNN()
    ref = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    return ref, model


def full_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {sp.name: (sp.mask.full_tensor() if hasattr(sp.mask, "full_tensor") else sp.mask).clone()
            for sp in sparse_params(model)}


def batches(net: str):
    x, y, _, _ = load_digits_split()
    if net == "cnn":
        x = x.view(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        yield x[idx], y[idx]


def train(model, engine, opt, net: str, part=None) -> list[dict[str, torch.Tensor]]:
    """Masks at the start, after every update and at the end."""
    seen = [full_masks(model)]
    for x, y in batches(net):
        if part is not None:
            x, y = x[part], y[part]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        n = len(engine.history)
        opt.step()
        if len(engine.history) > n:
            seen.append(full_masks(model))
    return seen + [full_masks(model)]


def _settings(method: str) -> tuple[str, dict]:
    """(the algorithm, its settings): gmp prunes from dense to 0.9 (every 10 steps until 75 %),
    per layer on ERK's curves (gmp) or with one threshold (gmpglobal)."""
    if method.startswith(("gmp", "granet")):
        scope = "global" if method.endswith("global") else "local"
        return method.replace("global", ""), dict(sparsity=0.9, freq=FREQ, end=0.75, scope=scope,
                                                  **({"distribution": "erk"} if scope == "local" else {}))
    kw = dict(sparsity=0.9, distribution="erk")
    if method != "static":
        kw["update"] = sparse.UpdateSchedule(freq=FREQ, stop=0.75)
    return method, kw


def run(method: str, net: str, split: bool, rank: int, world: int) -> dict:
    ref, model = build(net)
    method, kw = _settings(method)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    reng = sparse.Sparsifier(ref, ropt, sparse.create(method, **kw), total_steps=STEPS, seed=7, check_ranks=False)
    expected = train(ref, reng, ropt, net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eng = sparse.Sparsifier(model, opt, sparse.create(method, **kw), total_steps=STEPS, seed=7)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world) if split else None
    got = train(model, eng, opt, net, part)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    return {"expected": expected, "got": got, "history": eng.history, "ref_history": reng.history,
            "weights": weights, "ref_weights": {k: v.detach().clone() for k, v in ref.state_dict().items()},
            "sparsity": eng.sparsity(), "ref_sparsity": reng.sparsity()}


def agree(rank: int, world: int) -> dict:
    out = {}
    for method, net, split in (("static", "mlp", False), ("set", "mlp", False), ("rigl", "mlp", False),
                               ("set", "cnn", False), ("rigl", "cnn", False), ("rigl", "mlp", True),
                               ("gmp", "mlp", False), ("gmpglobal", "mlp", False), ("gmpglobal", "cnn", False),
                               ("granet", "mlp", False), ("granetglobal", "cnn", False)):
        out[f"{method}-{net}-{'split' if split else 'same'}"] = run(method, net, split, rank, world)
    return out


def select(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    cases, wrong = 0, []
    for trial in range(300):
        rows, cols = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        kind = trial % 4
        if kind == 0:
            s = torch.randn(rows, cols, generator=g)
        elif kind == 1:   # many ties
            s = torch.randint(-2, 3, (rows, cols), generator=g).float()
        elif kind == 2:   # +0.0 and -0.0 (equal) and -inf
            s = torch.randint(-1, 2, (rows, cols), generator=g).float() * 0.0
            s[torch.rand(rows, cols, generator=g) < 0.2] = float("-inf")
        else:
            s = torch.randint(0, 2, (rows, cols), generator=g).float()
            s[torch.rand(rows, cols, generator=g) < 0.3] = float("inf")
        allowed = torch.rand(rows, cols, generator=g) < 0.7
        k = int(torch.randint(0, int(allowed.sum()) + 1, (1,), generator=g))
        like = distribute_tensor(torch.zeros(rows, cols), mesh, [Shard(0)])
        part = sharded_topk_among(local(shard_like(s, like)), local(shard_like(allowed, like)), k, like)
        whole = DTensor.from_local(part, mesh, [Shard(0)], shape=like.shape, stride=like.stride()).full_tensor()
        cases += 1
        if not torch.equal(whole, _topk_among(s, allowed, k)) or int(whole.sum()) != k:
            wrong.append(trial)
    # GMP's selection (select_masks at weight granularity, nested in the masks) over 1 to 3 tensors:
    # local and global (each layer's best weight reserved, ties, ±inf, layers emptied or growing)
    from fastsparse.core.structured import select_masks
    from fastsparse.engine.fsdp import sharded_select_masks

    for trial in range(120):
        shapes = [(int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)))
                  for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
        scores = [torch.randint(0, 4, sh, generator=g).float() if trial % 2 else torch.randn(sh, generator=g).abs()
                  for sh in shapes]
        for sc in scores[:1] if trial % 5 == 0 else []:
            sc[torch.rand(sc.shape, generator=g) < 0.3] = float("inf")
        masks = [torch.rand(sh, generator=g) < (0.0 if trial % 7 == 0 and i == 0 else 0.6)
                 for i, sh in enumerate(shapes)]
        scope = "global" if trial % 3 else "local"
        sparsity = float(torch.rand(1, generator=g)) * 0.95
        likes = [distribute_tensor(torch.zeros(sh), mesh, [Shard(0)]) for sh in shapes]
        parts, counts = sharded_select_masks([local(shard_like(sc, lk)) for sc, lk in zip(scores, likes)],
                                             [local(shard_like(m, lk)) for m, lk in zip(masks, likes)],
                                             sparsity, scope, likes)
        expected = select_masks(scores, None, sparsity, scope, masks)
        cases += 1
        for part, lk, e, c in zip(parts, likes, expected, counts):
            whole = DTensor.from_local(part, mesh, [Shard(0)], shape=lk.shape, stride=lk.stride()).full_tensor()
            if not torch.equal(whole, e) or int(e.sum()) != c:
                wrong.append(f"gmp-{trial}")
                break
    # layers large enough to be bounded from a sample first (>= 2^18 weights): k small and large, ties
    for trial, (kind, fraction) in enumerate((("normal", 0.03), ("ties", 0.03), ("ties", 0.001), ("normal", 0.7),
                                               ("zeros", 0.01))):
        rows, cols = 601, 512
        if kind == "normal":
            s = torch.randn(rows, cols, generator=g)
        elif kind == "ties":
            s = torch.randint(0, 40, (rows, cols), generator=g).float()
        else:
            s = torch.randint(-1, 2, (rows, cols), generator=g).float() * 0.0
        allowed = torch.rand(rows, cols, generator=g) < 0.9
        k = int(fraction * int(allowed.sum()))
        like = distribute_tensor(torch.zeros(rows, cols), mesh, [Shard(0)])
        part = sharded_topk_among(local(shard_like(s, like)), local(shard_like(allowed, like)), k, like)
        whole = DTensor.from_local(part, mesh, [Shard(0)], shape=like.shape, stride=like.stride()).full_tensor()
        cases += 1
        if not torch.equal(whole, _topk_among(s, allowed, k)) or int(whole.sum()) != k:
            wrong.append(f"large-{trial}")
    return {"cases": cases, "wrong": wrong}


def _raised(fn) -> dict:
    try:
        fn()
    except sparse.MaskDisagreement as e:
        return {"raised": True, "message": str(e)}
    return {"raised": False, "message": ""}


def diverge(rank: int, world: int) -> dict:
    out = {}

    def engine(seed=7, sparsity=0.9):
        _, model = build("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        alg = sparse.create("rigl", sparsity=sparsity, update=sparse.UpdateSchedule(freq=FREQ, stop=0.75))
        return model, opt, sparse.Sparsifier(model, opt, alg, total_steps=STEPS, seed=seed)

    out["seed"] = _raised(lambda: engine(seed=rank))
    out["sparsity"] = _raised(lambda: engine(sparsity=0.9 if rank == 0 else 0.8))

    def flip():
        model, opt, eng = engine()
        mask = local(sparse_params(model)[0].mask)
        for i, (x, y) in enumerate(batches("mlp")):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if i == FREQ - 2 and rank == 1:   # before the step ahead of the first update
                flat = mask.view(-1)
                flat[int(flat.nonzero()[0])] = False
            opt.step()
            out["flip_step"] = eng.step_count
    out["flip"] = _raised(flip)

    def k_differs():
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.device_mesh import init_device_mesh
        like = distribute_tensor(torch.zeros(6, 4), init_device_mesh("cpu", (world,)), [Shard(0)])
        scores = torch.arange(local(like).numel(), dtype=torch.float32)
        sharded_topk_among(scores, torch.ones_like(scores, dtype=torch.bool), 3 + rank, like)
    out["k"] = _raised(k_differs)
    out["after"] = _raised(lambda: engine())   # the group still works: an agreeing engine builds
    return out


def refuse(rank: int, world: int) -> dict:
    out = {}
    for label, alg, kw in (("sparse", "rigl", {"execution": "sparse"}), ("snip", "snip", {}),
                           ("gmp_rows", "gmp", {}), ("set_drop", "set", {})):
        _, model = build("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        before = {k: local(v).clone() for k, v in model.state_dict().items()}
        extra = {"set_drop": {"drop_rule": "set"}, "gmp_rows": {"granularity": "row"}}.get(label, {})
        try:
            sparse.Sparsifier(model, opt, sparse.create(alg, sparsity=0.9, **extra), total_steps=STEPS, **kw)
            out[label] = {"refused": False, "message": ""}
        except sparse.EntryPointRefused as e:
            out[label] = {"refused": True, "message": str(e)}
        after = model.state_dict()
        out[label]["unchanged"] = before.keys() == after.keys() and all(
            torch.equal(before[k], local(after[k])) for k in before)
    return out


def dcp(rank: int, world: int, out: str) -> dict:
    import shutil
    from pathlib import Path

    from fastsparse.engine.fsdp import full_model_state
    from fastsparse.engine.sharded_checkpoint import ShardedCheckpointError, load_sharded, save_sharded

    def engine():
        _, model = build("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        alg = sparse.create("rigl", sparsity=0.9, distribution="erk", update=sparse.UpdateSchedule(freq=FREQ, stop=0.75))
        return model, opt, sparse.Sparsifier(model, opt, alg, total_steps=STEPS, seed=7)

    def steps(model, opt, first, n):
        for i, (x, y) in enumerate(batches("mlp")):
            if first <= i < first + n:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    root = Path(out)
    identity = {"run": "digits-rigl", "seed": 7}
    model, opt, eng = engine()
    steps(model, opt, 0, 25)
    save_sharded(root / "ckpt", model, opt, eng, identity)
    whole_at_save = full_model_state(model)
    steps(model, opt, 25, 25)
    continued = full_model_state(model)
    model2, opt2, eng2 = engine()
    load_sharded(root / "ckpt", model2, opt2, eng2, identity)
    resumed_at = eng2.step_count
    steps(model2, opt2, 25, 25)
    result = {"continued": continued, "resumed": full_model_state(model2), "history": eng.history,
              "resumed_history": eng2.history, "resumed_at": resumed_at}
    if rank == 0:
        torch.save(whole_at_save, root / "whole_at_save.pt")
        for name in ("missing", "corrupt", "crafted"):
            shutil.copytree(root / "ckpt", root / name)
        (root / "missing" / "__1_0.distcp").unlink()
        data = bytearray((root / "corrupt" / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (root / "corrupt" / "__0_0.distcp").write_bytes(bytes(data))
        import json, hashlib, pickle

        class Boom:
            def __reduce__(self):
                return (os.system, ("echo crafted > " + str(root / "crafted" / "ran"),))
        (root / "crafted" / ".metadata").write_bytes(pickle.dumps(Boom()))
        manifest = json.loads((root / "crafted" / "manifest.json").read_text())
        raw = (root / "crafted" / ".metadata").read_bytes()
        manifest["files"][".metadata"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        # checksums rewritten to match, and a chunk pointed at a file outside the checkpoint
        manifest["dcp"]["storage"][0]["file"] = "../corrupt/__0_0.distcp"
        (root / "crafted" / "manifest.json").write_text(json.dumps(manifest))
    dist.barrier()
    model3, opt3, eng3 = engine()
    before = full_model_state(model3)
    for name, folder, ident in (("identity", "ckpt", {**identity, "seed": 8}), ("missing", "missing", identity),
                                ("corrupt", "corrupt", identity), ("crafted", "crafted", identity)):
        try:
            load_sharded(root / folder, model3, opt3, eng3, ident)
            result[name] = ""
        except ShardedCheckpointError as e:
            result[name] = str(e)
    after = full_model_state(model3)
    result["unchanged"] = all(torch.equal(before[k], after[k]) for k in before) and eng3.step_count == 0 \
        and len(opt3.state) == 0
    result["crafted_ran"] = (root / "crafted" / "ran").exists()
    return result


def reload(rank: int, world: int, out: str) -> dict:
    from pathlib import Path

    from fastsparse.engine.fsdp import full_model_state
    from fastsparse.engine.sharded_checkpoint import load_sharded

    _, model = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = sparse.create("rigl", sparsity=0.9, distribution="erk", update=sparse.UpdateSchedule(freq=FREQ, stop=0.75))
    eng = sparse.Sparsifier(model, opt, alg, total_steps=STEPS, seed=7)
    load_sharded(Path(out) / "ckpt", model, opt, eng, {"run": "digits-rigl", "seed": 7})
    rows = {sp.name: tuple(local(sp.mask).shape) for sp in sparse_params(model)}
    momentum = {n: opt.state[p]["momentum_buffer"].full_tensor() for n, p in model.named_parameters()}
    return {"state": full_model_state(model), "rows": rows, "step": eng.step_count, "momentum": momentum,
            "history": eng.history}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=["select", "agree", "diverge", "refuse", "dcp", "reload"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    name = f"{args.scenario}-rank{rank}" if args.scenario == "reload" else f"rank{rank}"

    def body():
        if args.scenario in ("dcp", "reload"):
            result = globals()[args.scenario](rank, world, args.out)
        else:
            result = globals()[args.scenario](rank, world)
        result["rank"], result["world"] = rank, world
        torch.save(result, os.path.join(args.out, f"{name}.pt"))

    finish(body, os.path.join(args.out, f"{name}.err"))


if __name__ == "__main__":
    main()
