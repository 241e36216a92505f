"""Sparse execution against masked training: whole training steps, measured in one process.

The model: an MLP 4096 -> 4096 -> 4096 -> 4096 -> 10 (three 4096-wide hidden layers, four
weight matrices, uniform sparsity), batch 128 of fixed random inputs, SGD with momentum 0.9,
RigL (drop fraction 0.3, magnitude drop, gradient growth) updating every 100 steps. For each
sparsity, a masked engine and a sparse-executed one (``execution="sparse"``; ``"auto"`` at
80 %) train side by side. One *window* is 21 engine steps on the RigL clock, from step
100·j − 20 to step 100·j: 20 ordinary steps and the step that ends with the mask update (its
dense gradient, top-k search, relocation of values and momentum). The time of 100 steps with
their update is then 99 × (median ordinary step) + (update step); every figure is the median
over ``--repeats`` windows. The masked and the sparse run take their steps in turn (the order
swapped every step), so that a slow moment of the machine falls on both alike.

Memory: the bytes of the parameters and the optimizer state (weights or active values, the
masks or the index structure, biases, momentum), read from the live tensors, against dense
training (weights and momentum, no masks).

    python benchmarks/sparse_training.py --repeats 7      # the acceptance run (about 6 minutes on 2 cores)
    python benchmarks/sparse_training.py --repeats 3 --sparsities 0.9

The last line is one JSON object: ``speedup_90``, ``speedup_98`` (masked time / sparse time),
``auto_vs_masked_80`` (masked time / auto time; 1.0 means the same), ``memory_98`` (sparse
parameters and state / dense) and every measured figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

import fastsparse as fs
from fastsparse.core import native
from fastsparse.core.nets import MLP

SIZES = (4096, 4096, 4096, 4096, 10)
UPDATE_EVERY = 100
ORDINARY = 20


def build(sparsity: float, execution: str, batch: int):
    torch.manual_seed(0)
    model = MLP(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    alg = fs.RigL(sparsity=sparsity, distribution="uniform", drop_fraction=0.3,
                  update=fs.UpdateSchedule(freq=UPDATE_EVERY))
    engine = fs.Sparsifier(model, opt, alg, total_steps=100 * UPDATE_EVERY, execution=execution,
                           execution_batch=batch)
    return model, opt, engine


def train_step(model, opt, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()   # the engine's hooks: masks (masked) or nothing (sparse); the update when due
    return time.perf_counter() - t


def windows(runs: dict, j: int, x, y, flip: bool) -> dict[str, tuple[float, float]]:
    """Per run, (median ordinary step, update step) in seconds over the window ending at step
    100·j; the runs take their steps in turn (the order swapped every step), so that a slow
    moment of the machine falls on both alike."""
    for _, _, engine in runs.values():
        engine.step_count = UPDATE_EVERY * j - ORDINARY - 1
    updates = {k: len(engine.history) for k, (_, _, engine) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)[::-1] if flip else list(runs)
    for i in range(ORDINARY + 1):
        for k in (order if i % 2 == 0 else order[::-1]):
            model, opt, _ = runs[k]
            times[k].append(train_step(model, opt, x, y))
    for k, (_, _, engine) in runs.items():
        assert len(engine.history) == updates[k] + 1, "the window must end with exactly one mask update"
    return {k: (statistics.median(t[:ORDINARY]), t[ORDINARY]) for k, t in times.items()}


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def dense_bytes() -> int:
    """Dense training: every weight and bias, and a momentum buffer of each."""
    params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    return 2 * 4 * params


def measure(sparsity: float, execution: str, repeats: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (batch,), generator=g)
    runs = {"masked": build(sparsity, "masked", batch), execution: build(sparsity, execution, batch)}
    windows(runs, 1, x, y, False)   # warm-up: allocator, momentum buffers, kernels, one update
    per: dict[str, list[float]] = {k: [] for k in runs}
    parts: dict[str, dict[str, list[float]]] = {k: {"step": [], "update": []} for k in runs}
    for r in range(repeats):
        for k, (step, update) in windows(runs, r + 2, x, y, r % 2 == 1).items():
            per[k].append((UPDATE_EVERY - 1) * step + update)
            parts[k]["step"].append(step)
            parts[k]["update"].append(update)
    masked_model, masked_opt, masked_engine = runs["masked"]
    model, opt, engine = runs[execution]
    assert abs(engine.sparsity() - masked_engine.sparsity()) < 1e-9
    ratios = [m / s for m, s in zip(per["masked"], per[execution])]
    return {
        "sparsity": sparsity, "execution": execution,
        "layers": {c.name: c.execution for c in engine.choices},
        "masked_ms_per_100": 1e3 * statistics.median(per["masked"]),
        "sparse_ms_per_100": 1e3 * statistics.median(per[execution]),
        "masked_step_ms": 1e3 * statistics.median(parts["masked"]["step"]),
        "sparse_step_ms": 1e3 * statistics.median(parts[execution]["step"]),
        "masked_update_ms": 1e3 * statistics.median(parts["masked"]["update"]),
        "sparse_update_ms": 1e3 * statistics.median(parts[execution]["update"]),
        "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
        "masked_bytes": state_bytes(masked_model, masked_opt), "sparse_bytes": state_bytes(model, opt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.8,0.9,0.95,0.98", help="comma-separated; 0.8 runs 'auto'")
    parser.add_argument("--repeats", type=int, default=5, help="windows of each run (medians)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; MLP "
          f"{'-'.join(map(str, SIZES))}, batch {args.batch}, SGD momentum 0.9, RigL every {UPDATE_EVERY} steps; "
          f"medians of {args.repeats} interleaved windows; sparse kernels: {native.status()}")
    dense = dense_bytes()
    rows = []
    header = (f"{'sparsity':>8} {'execution':>9} {'masked ms/step':>14} {'sparse ms/step':>14} "
              f"{'masked update':>13} {'sparse update':>13} {'speedup (100 steps)':>22} {'memory / dense':>14}")
    print(header)
    for s in (float(v) for v in args.sparsities.split(",")):
        execution = "auto" if abs(s - 0.8) < 1e-9 else "sparse"
        row = measure(s, execution, args.repeats, args.batch)
        rows.append(row)
        print(f"{s:>8.0%} {execution:>9} {row['masked_step_ms']:>14.1f} {row['sparse_step_ms']:>14.1f} "
              f"{row['masked_update_ms']:>11.0f}ms {row['sparse_update_ms']:>11.0f}ms "
              f"{row['speedup']:>9.2f}x [{row['speedup_min']:.2f}, {row['speedup_max']:.2f}] "
              f"{row['sparse_bytes'] / dense:>13.3f}x", flush=True)
        if execution == "auto":
            sparse_layers = sum(e == "sparse" for e in row["layers"].values())
            print(f"{'':>8} auto ran {sparse_layers} of {len(row['layers'])} layers sparse: {row['layers']}")
    by = {round(r["sparsity"], 4): r for r in rows}
    result = {"benchmark": "sparse_training", "model": "mlp-" + "-".join(map(str, SIZES)), "batch": args.batch,
              "threads": torch.get_num_threads(), "kernels": native.status(), "dense_bytes": dense, "rows": rows}
    for key, s in (("speedup_90", 0.9), ("speedup_95", 0.95), ("speedup_98", 0.98)):
        if s in by:
            result[key] = round(by[s]["speedup"], 3)
    if 0.8 in by:
        result["auto_vs_masked_80"] = round(by[0.8]["speedup"], 3)
    if 0.98 in by:
        result["memory_98"] = round(by[0.98]["sparse_bytes"] / dense, 4)
        result["memory_98_vs_masked"] = round(by[0.98]["sparse_bytes"] / by[0.98]["masked_bytes"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
