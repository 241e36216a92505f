"""The end-to-end digits training of the accuracy tests (and of the distributed worker's set-up).

Set-up: scikit-learn digits through ``fastsparse.experiments.data.load_digits_split`` (inputs in [0, 1],
stratified 75/25, fixed split), MLP 64-300-100-10, SGD lr 0.1 momentum 0.9 with cosine
learning-rate decay to 0 over training, batch 64, 98% sparsity with the ERK distribution,
drop fraction 0.3 (cosine-decayed), a mask update every 50 steps until 75% of training.

Run it by hand to measure every method over several seeds::

    python tests/digits_run.py --seeds 0 1 2 3 4 5
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fastsparse as sparse
from fastsparse.experiments.data import load_digits_split
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.experiments.models import MLP

SIZES = (64, 300, 100, 10)
SPARSITY = 0.98
BATCH = 64
LR = 0.1
MOMENTUM = 0.9
DROP_FRACTION = 0.3
UPDATE_FREQ = 50
UPDATE_STOP = 0.75
METHODS = ("dense", "static", "set", "snfs", "rigl")

_DATA: tuple | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split is the same for every seed (cached: it is read once per process)."""
    global _DATA
    if _DATA is None:
        _DATA = load_digits_split()
    return _DATA


def target_counts(model: nn.Module, sparsity: float = SPARSITY) -> dict[str, int]:
    """Active weights per layer that 98% ERK asks for: round((1 - s_l) * n_l)."""
    params = sparse.select_params(model)
    sps = sparse.erdos_renyi_sparsity([tuple(sp.param.shape) for sp in params], sparsity)
    return {sp.name: n_keep(sp.param.numel(), s) for sp, s in zip(params, sps)}



class DigitsLoader:
    """Shuffled batches of (x, y), a new order each epoch drawn from the generator ``g``."""

    def __init__(self, x, y, g: torch.Generator, batch: int = BATCH):
        self.x, self.y, self.g, self.batch = x, y, g, batch

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.g)
        b = self.batch
        return iter([(self.x[perm[i:i + b]], self.y[perm[i:i + b]]) for i in range(0, len(self.x), b)])

@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float
    seconds: float
    active: dict[str, int] = field(default_factory=dict)     # mask.sum() per masked layer
    nonzero: dict[str, int] = field(default_factory=dict)    # weight != 0 per masked layer
    outside_mask: int = 0                                    # weights != 0 where the mask is False
    targets: dict[str, int] = field(default_factory=dict)    # round((1 - s_l) * n_l) per layer
    updates: int = 0                                         # mask updates the engine made
    changed: int = 0                                         # weights grown over all updates
    state: dict = field(default_factory=dict, repr=False)     # the trained model's state_dict


def _train(model, opt, x_tr, y_tr, epochs, seed, step_fn, first_step=0):
    """``step_fn(step, pct_train)`` after each backward; ``step`` counts batches from ``first_step``."""
    steps_per_epoch = math.ceil(len(x_tr) / BATCH)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(seed)
    loss_f = nn.CrossEntropyLoss()
    step = first_step
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_f(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            step_fn(step, step / total)
            sched.step()
            step += 1
    return total


def run(method: str = "rigl", seed: int = 0, epochs: int = 100, sparsity: float = SPARSITY,
        path: str = "engine", first_step: int = 0, presets: dict | None = None) -> RunResult:
    """Train one model and measure it.

    ``path="engine"``: ``Sparsifier(model, opt, create(method, ...), total_steps, seed)``,
    masks re-applied and updated from the optimizer's post-step hook.
    ``path="wrapper"``: the seed's plain-PyTorch usage, ``sparsify_model`` with
    ``erdos_renyi_sparsity`` then ``DynamicSparseTrainingOptimizerWrapper(model, opt,
    **<method>_presets, batches_per_update=50)`` and ``sparse_opt.step(step, pct_train)``,
    with ``step`` the batch index counted from ``first_step`` and ``pct_train = step / total``
    (the seed's loops count from 0; counting from 1 matches the engine's own clock);
    ``presets`` overrides entries of the method's presets (e.g. SNFS's redistribution).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    if path not in ("engine", "wrapper"):
        raise ValueError(f"unknown path {path!r}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits()
    model = MLP(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    targets = target_counts(model, sparsity) if method != "dense" else {}
    engine = None

    if method == "dense":
        def step_fn(step, pct):
            opt.step()
            opt.zero_grad()
    elif path == "engine":
        total = epochs * math.ceil(len(x_tr) / BATCH)
        kwargs = {} if method == "static" else {
            "drop_fraction": DROP_FRACTION, "update": sparse.UpdateSchedule(freq=UPDATE_FREQ, stop=UPDATE_STOP)}
        algorithm = sparse.create(method, sparsity=sparsity, distribution="erk", **kwargs)
        engine = sparse.Sparsifier(model, opt, algorithm, total_steps=total, seed=seed)

        def step_fn(step, pct):
            opt.step()
            opt.zero_grad()
    else:
        if method == "static":
            raise ValueError("the wrapper path is for the dynamic methods (set, snfs, rigl)")
        sparse.sparsify_model(model, model_sparsity=sparsity, sparse_f=sparse.erdos_renyi_sparsity, seed=seed)
        base = {"set": sparse.SET_presets, "snfs": sparse.SNFS_presets, "rigl": sparse.RigL_presets}[method]
        kwargs = {**base, "initial_drop_grow_pct": DROP_FRACTION, "stop_pct": UPDATE_STOP, **(presets or {})}
        sparse_opt = sparse.DynamicSparseTrainingOptimizerWrapper(
            model, opt, **kwargs, batches_per_update=UPDATE_FREQ, seed=seed)
        engine = sparse_opt.sparsifier

        def step_fn(step, pct):
            sparse_opt.step(step, pct)
            sparse_opt.zero_grad()

    _train(model, opt, x_tr, y_tr, epochs, seed, step_fn, first_step)
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    result = RunResult(method, seed, acc, time.perf_counter() - t0, targets=targets,
                       state={k: v.detach().clone() for k, v in model.state_dict().items()})
    for sp in sparse_params(model):
        w, m = sp.param.detach(), sp.mask
        result.active[sp.name] = int(m.sum())
        result.nonzero[sp.name] = int((w != 0).sum())
        result.outside_mask += int((w[~m] != 0).sum())
    if engine is not None:
        result.updates = len(engine.history)
        result.changed = sum(r["changed"] for r in engine.history)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--path", default="engine", choices=["engine", "wrapper"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for method in args.methods:
        accs = []
        for seed in args.seeds:
            r = run(method, seed, args.epochs, path=args.path)
            accs.append(r.accuracy)
            print(f"{args.path:7s} {method:6s} seed {seed}: acc {r.accuracy:.4f}  active {sum(r.active.values())}"
                  f"/{sum(r.targets.values())}  updates {r.updates}  ({r.seconds:.1f}s)", flush=True)
        mean = sum(accs) / len(accs)
        print(f"{args.path:7s} {method:6s} mean {mean:.4f}  min {min(accs):.4f}  max {max(accs):.4f}", flush=True)


if __name__ == "__main__":
    main()
