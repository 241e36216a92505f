"""Overhead of sparse training against dense training, measured in the same run.

1. Step time, sparse / dense: one training step (forward, backward, SGD-momentum step),
   the sparse one including the engine's post-step hook (masks re-applied, schedule checked,
   no mask update due). Dense and sparse runs alternate (and swap order every repeat), each
   run times ``--steps`` steps; the figure is the median over ``--repeats`` of the per-repeat
   ratio. Models: the MLP 64-300-100-10 on digits, batch 64 (goal <= 1.02), and a small CNN
   for the 8x8 digits images.
2. Time of one mask update: RigL's drop and grow of one layer (keep |w|, grow |grad|, drop
   fraction 0.3 of the active weights) at 90% sparsity, for 1M and 10M elements (goal
   <= 0.15 s at 10M): ``fastsparse.drop_and_grow`` alone, and a whole engine update (scores,
   new mask, dropped weights zeroed, grown weights' momentum zeroed). Median of ``--repeats``.

    python benchmarks/overhead.py                  # one thread, the defaults below
    python benchmarks/overhead.py --threads 2 --repeats 11 --steps 300

Both wall-clock and CPU time (of this process) are reported: on a shared machine the wall
time also counts the time other processes held the core. On Linux, glibc returns every
freed block above 32 MB to the system, so each 10M-element float temporary of a mask update
is page-faulted in afresh; ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000``
in the environment keeps such blocks in the heap and shows how much of an update that costs.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

import fastsparse as sparse
from fastsparse.experiments.data import load_digits_split
from fastsparse.experiments.models import MLP


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 inputs: conv 1->16 and 16->32 (3x3), 2x2 max-pool, 512 -> 64 -> 10."""

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x.view(-1, 1, 8, 8)))))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


MODELS = {"mlp 64-300-100-10": lambda: MLP((64, 300, 100, 10)), "cnn 16-32-64": DigitsCNN}
NO_UPDATE = 10 ** 9  # an update frequency never reached: the engine checks the schedule, never updates


def _batches(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = load_digits_split()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x) - batch + 1, batch)]


def _setup(build, kind: str, sparsity: float):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = None
    if kind == "static":
        engine = sparse.Sparsifier(model, opt, sparse.create("static", sparsity=sparsity, distribution="erk"))
    elif kind == "rigl":
        alg = sparse.create("rigl", sparsity=sparsity, distribution="erk",
                            update=sparse.UpdateSchedule(freq=NO_UPDATE))
        engine = sparse.Sparsifier(model, opt, alg, total_steps=10 * NO_UPDATE)
    return model, opt, engine


def _run_steps(model, opt, batches, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``steps`` training steps."""
    loss_f = nn.CrossEntropyLoss()
    t, c = time.perf_counter(), time.process_time()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss_f(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t, time.process_time() - c


def step_ratio(name: str, build, kinds: list[str], batch: int, steps: int, repeats: int, sparsity: float) -> None:
    batches = _batches(batch)
    runs = {"dense": _setup(build, "dense", sparsity)}
    runs.update({k: _setup(build, k, sparsity) for k in kinds})
    for model, opt, _ in runs.values():  # warm-up: allocator, momentum buffers, kernels
        _run_steps(model, opt, batches, max(20, steps // 5))
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            model, opt, _ = runs[k]
            w, c = _run_steps(model, opt, batches, steps)
            wall[k].append(w / steps)
            cpu[k].append(c / steps)
    print(f"{name}, batch {batch}: dense step {statistics.median(wall['dense']) * 1e3:.3f} ms wall, "
          f"{statistics.median(cpu['dense']) * 1e3:.3f} ms CPU (medians of {repeats} runs x {steps} steps)")
    for k in kinds:
        engine = runs[k][2]
        assert engine is not None and not engine.history, "a mask update ran during the step benchmark"
        line = f"  {k:6s} {sparsity:.0%} ERK:"
        for what, t in (("wall", wall), ("CPU", cpu)):
            ratios = [s / d for s, d in zip(t[k], t["dense"])]
            line += (f" {what} ratio {statistics.median(ratios):.3f} "
                     f"[{min(ratios):.3f}, {max(ratios):.3f}];")
        print(line + f" sparsity {engine.sparsity():.3f}")


def _layer(numel: int, sparsity: float, seed: int = 0):
    rows = 1000
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(numel // rows, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
    layer.weight.grad = torch.randn(layer.weight.shape, generator=g)
    return layer


def update_time(numel: int, sparsity: float, repeats: int) -> None:
    layer = _layer(numel, sparsity)
    n = layer.weight.numel()
    mask = sparse.topk_mask(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)),
                            round((1 - sparsity) * n))
    w = layer.weight.detach() * mask
    n_drop = math.floor(0.3 * int(mask.sum()))
    keep, grow = w.abs(), layer.weight.grad.abs()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        new = sparse.drop_and_grow(mask, keep, grow, n_drop, n_drop)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    assert int(new.count_nonzero()) == int(mask.count_nonzero())
    print(f"  {n / 1e6:4.0f}M elements, {sparsity:.0%} sparse: drop_and_grow {statistics.median(wall):.3f} s wall "
          f"[{min(wall):.3f}, {max(wall):.3f}], {statistics.median(cpu):.3f} s CPU; drops and grows {n_drop}")

    # the whole engine update: RigL every step (hook off, the step called by hand)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    opt.step()  # momentum buffers exist, as in training
    alg = sparse.create("rigl", sparsity=sparsity, update=sparse.UpdateSchedule(freq=1), drop_fraction=0.3)
    engine = sparse.Sparsifier(layer, opt, alg, total_steps=10 ** 6, hook=False)
    wall, cpu = [], []
    g = torch.Generator().manual_seed(2)
    for _ in range(repeats):
        with torch.no_grad():  # training moved on: new weights and a new gradient
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g), alpha=0.01)
            layer.weight.grad.copy_(torch.randn(layer.weight.shape, generator=g))
        t, c = time.perf_counter(), time.process_time()
        changed = engine.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert changed
    grown = [h["changed"] for h in engine.history]
    assert min(grown) > 0
    print(f"  {n / 1e6:4.0f}M elements, {sparsity:.0%} sparse: engine RigL update {statistics.median(wall):.3f} s wall "
          f"[{min(wall):.3f}, {max(wall):.3f}], {statistics.median(cpu):.3f} s CPU; grown per update "
          f"{min(grown)}..{max(grown)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=21, help="timed runs of each kind (odd: a true median)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--update-sizes", type=float, nargs="+", default=[1e6, 1e7])
    ap.add_argument("--update-repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    heap = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"glibc mmap threshold {heap + ' bytes (MALLOC_MMAP_THRESHOLD_)' if heap else 'default'}")
    print("1. step time, sparse / dense (forward + backward + optimizer step + engine hook, no mask update)")
    for name, build in MODELS.items():
        step_ratio(name, build, ["static", "rigl"], args.batch, args.steps, args.repeats, args.sparsity)
    print("2. one mask update (RigL drop and grow of one layer)")
    for numel in args.update_sizes:
        update_time(int(numel), 0.9, args.update_repeats)


if __name__ == "__main__":
    main()
