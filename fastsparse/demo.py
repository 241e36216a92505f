"""``make demo``: a short sparse training on the embedded digits data (98% sparse MLP, RigL)."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

import fastsparse as sparse
from fastsparse.data import load_digits_split
from fastsparse.models import MLP


def run(method: str = "rigl", sparsity: float = 0.98, epochs: int = 100, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = MLP([64, 300, 100, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps_per_epoch = math.ceil(len(x_tr) / 64)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    algorithm = sparse.create(method, sparsity=sparsity, distribution="erk",
                              **({} if method == "static" else {"update": sparse.UpdateSchedule(freq=50, stop=0.75)}))
    engine = sparse.Sparsifier(model, opt, algorithm, total_steps=total, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return acc, engine.sparsity()


def main() -> None:
    for method in ("static", "set", "snfs", "rigl"):
        t = time.perf_counter()
        acc, s = run(method)
        print(f"{method:7s} test accuracy {acc:.3f}  sparsity {s:.4f}  ({time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    main()
