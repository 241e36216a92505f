"""Train an MLP whose dense form does not fit in memory: 64 -> 65,536 -> 65,536 -> 10 at 99.9 %.

Its 65,536 x 65,536 weight alone is 17.2 GB in float32, 34.4 GB with its momentum: no masked
library can hold it on a 24 GiB machine. Built directly in compact form
(``SparseLinear.random``, never a dense tensor) with the ERK layer densities of 99.9 %, it holds
about 4.3 M active weights, and the engine trains it with SET and with RigL on the embedded
digits data: random growth drawn one block of rows at a time, RigL's gradient growth from a
dense gradient built one block of rows at a time within a memory budget.

    python examples/sparse_execution_65k.py                 # SET and RigL, 300 steps each
    python examples/sparse_execution_65k.py --methods rigl --steps 600

Prints, per method: steps per second (ordinary steps and update steps apart), the peak
resident memory of the process, the test accuracy, and that the counts stayed exact. Not run
in CI (a few minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

import fastsparse as fs
from fastsparse.core.distributions import erdos_renyi_sparsity
from fastsparse.core.sparse_linear import SparseLinear
from fastsparse.experiments.data import load_digits_split

WIDTH = 65_536
SPARSITY = 0.999


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def build(seed: int) -> nn.Sequential:
    shapes = [(WIDTH, 64), (WIDTH, WIDTH), (10, WIDTH)]
    sparsities = erdos_renyi_sparsity(shapes, SPARSITY)
    g = torch.Generator().manual_seed(seed)
    layers = [SparseLinear.random(i, o, 1.0 - s, g) for (o, i), s in zip(shapes, sparsities)]
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])


def train(method: str, steps: int, batch: int, every: int, seed: int) -> None:
    x, y, x_test, y_test = load_digits_split()
    model = build(seed)
    counts = [m.nnz for m in model if isinstance(m, SparseLinear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = fs.create(method, sparsity=SPARSITY, distribution="erk", drop_fraction=0.3,
                    update=fs.UpdateSchedule(freq=every, stop=0.75))
    engine = fs.Sparsifier(model, opt, alg, total_steps=steps, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ordinary, updates = [], []
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        n = len(engine.history)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        (updates if len(engine.history) > n else ordinary).append(time.perf_counter() - t)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    after = [m.nnz for m in model if isinstance(m, SparseLinear)]
    changed = sum(h.get("changed", 0) for h in engine.history)
    print(f"{method}: {len(ordinary) / sum(ordinary):.2f} steps/s ({1e3 * sum(ordinary) / len(ordinary):.0f} ms a step), "
          f"{len(updates)} mask updates of {sum(updates) / max(1, len(updates)):.1f} s each, {changed:,} weights moved; "
          f"peak memory {peak_gib():.2f} GiB; test accuracy {accuracy:.3f}; active weights {sum(after):,} "
          f"({'exact' if after == counts else f'CHANGED from {counts}'}), sparsity {engine.sparsity():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="set,rigl")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=100, help="steps between mask updates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dense = WIDTH * WIDTH * 4
    print(f"dense 65,536 x 65,536 float32 weight: {dense / 1e9:.1f} GB ({2 * dense / 1e9:.1f} GB with momentum); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        train(method.strip(), args.steps, args.batch, args.every, args.seed)


if __name__ == "__main__":
    main()
