"""End to end on digits: GMP, GraNet, IMP and pruning at initialisation at high sparsity.

Set-up (every method): scikit-learn digits through ``load_digits_split`` (fixed 75/25
split), MLP 64-300-100-10, SGD lr 0.1 momentum 0.9, cosine learning-rate decay to 0 over
training, batch 64, 100 epochs (2200 steps), the data order drawn from the seed.

- GMP: 0 -> 98% global magnitude, cubic from 10% to 60% of training, every 50 steps.
- GraNet: 50% (random) -> 98%, same window, global, regrowth r_t cosine 0.5 -> 0.005.
- IMP: global, 20% of the remaining weights per level, rewind to step 0, down to 90%
  (11 levels, the last landing on 90%); the default suite trains 30 epochs per level.
- PaI at 98%: SNIP and GraSP on one batch of 256 training examples, SynFlow data-free
  (100 rounds), all global; against random pruning (uniform per layer, and ERK).

Measure every method over several seeds by hand::

    python tests/test_pruning_e2e.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import functools
import time

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.experiments.data import load_digits_split
from fastsparse.experiments.models import MLP

SIZES = (64, 300, 100, 10)
SPARSITY = 0.98
BATCH = 64
EPOCHS = 100
_DATA: tuple | None = None


def digits():
    global _DATA
    if _DATA is None:
        _DATA = load_digits_split()
    return _DATA


def batch_order(seed: int, epochs: int) -> list[torch.Tensor]:
    """The index batches of every step, so a run can resume at any step with the same order."""
    x_tr = digits()[0]
    g = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        order += [perm[i:i + BATCH] for i in range(0, len(x_tr), BATCH)]
    return order


def train(model, opt, sched, order, start=0, after_step=None) -> None:
    x_tr, y_tr = digits()[:2]
    for t in range(start, len(order)):
        idx = order[t]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step(t + 1)
        if sched is not None:
            sched.step()


def accuracy(model) -> float:
    x_te, y_te = digits()[2:]
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    model.train()
    return acc


def _setup(seed, epochs=EPOCHS):
    torch.manual_seed(seed)
    model = MLP(SIZES)
    order = batch_order(seed, epochs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, order, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(order))


def run_gradual(method: str, seed: int = 0) -> tuple[float, float]:
    model, order, opt, sched = _setup(seed)
    kwargs = {"initial_sparsity": 0.5} if method == "granet" else {}
    alg = sparse.create(method, sparsity=SPARSITY, start=0.1, end=0.6, freq=50, scope="global", **kwargs)
    engine = sparse.Sparsifier(model, opt, alg, total_steps=len(order), seed=seed)
    train(model, opt, sched, order)
    return accuracy(model), engine.sparsity()


def run_imp(seed: int = 0, epochs: int = EPOCHS, sparsity: float = 0.9) -> tuple[float, float, list]:
    torch.manual_seed(seed)
    model = MLP(SIZES)
    order = batch_order(seed, epochs)

    def train_fn(model, opt, sched, start_step):
        train(model, opt, sched, order, start_step)
        return accuracy(model)

    ticket = sparse.find_ticket(
        model, train_fn, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        sparsity=sparsity, rewind_step=0, scope="global", total_steps=len(order), seed=seed,
        make_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(order)))
    return ticket.levels[-1]["metrics"], 1 - ticket.density, [r["metrics"] for r in ticket.levels]


def run_pai(method: str, seed: int = 0, scope: str = "global", distribution: str = "uniform") -> tuple[float, float]:
    model, order, opt, sched = _setup(seed)
    x_tr, y_tr = digits()[:2]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x_tr), generator=g)[:256]
    sparse.prune_at_init(model, method, SPARSITY, batch=(x_tr[idx], y_tr[idx]), scope=scope,
                         distribution=distribution, seed=seed)
    engine = sparse.Sparsifier(model, opt, total_steps=len(order), seed=seed)   # masks fixed from here
    train(model, opt, sched, order)
    return accuracy(model), engine.sparsity()


def _mean(xs):
    return sum(xs) / len(xs)


# --- the default suite: one seed each ----------------------------------------------------------
def test_gmp_digits():
    acc, s = run_gradual("gmp", 0)
    assert s == pytest.approx(SPARSITY, abs=1e-4)
    assert acc >= 0.96


def test_granet_digits():
    acc, s = run_gradual("granet", 0)
    assert s == pytest.approx(SPARSITY, abs=1e-4)
    assert acc >= 0.95


def test_imp_digits_short_levels():
    acc, s, per_level = run_imp(0, epochs=30)
    assert s == pytest.approx(0.9, abs=1e-4) and len(per_level) == 12
    assert acc >= 0.96


def test_pai_digits_beat_random():
    random_acc, s = run_pai("random", 0, scope="local")
    assert s == pytest.approx(SPARSITY, abs=1e-4)
    for method in ("snip", "grasp", "synflow"):
        acc, s = run_pai(method, 0)
        assert s == pytest.approx(SPARSITY, abs=1e-4)
        assert acc > random_acc, (method, acc, random_acc)


# --- three-seed means ---------------------------------------------------------------------------
SEEDS = (0, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("method, floor", [("gmp", 0.96), ("granet", 0.95)])
def test_gradual_three_seed_mean(method, floor):
    assert _mean([run_gradual(method, s)[0] for s in SEEDS]) >= floor


@pytest.mark.slow
def test_imp_three_seed_mean():
    assert _mean([run_imp(s)[0] for s in SEEDS]) >= 0.96


@pytest.mark.slow
@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_pai_three_seed_mean_beats_random(method):
    assert _mean([run_pai(method, s)[0] for s in SEEDS]) > max(_random_mean("uniform"), _random_mean("erk"))


@functools.lru_cache(maxsize=None)
def _random_mean(distribution: str) -> float:
    return _mean([run_pai("random", s, scope="local", distribution=distribution)[0] for s in SEEDS])


def main() -> None:
    ap = argparse.ArgumentParser(description="digits accuracies of the pruning family")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--methods", nargs="+",
                    default=["gmp", "granet", "imp", "snip", "grasp", "synflow", "random", "random_erk"])
    ap.add_argument("--imp-epochs", type=int, default=EPOCHS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runners = {
        "gmp": lambda s: run_gradual("gmp", s)[:2], "granet": lambda s: run_gradual("granet", s)[:2],
        "imp": lambda s: run_imp(s, args.imp_epochs)[:2],
        "snip": lambda s: run_pai("snip", s), "grasp": lambda s: run_pai("grasp", s),
        "synflow": lambda s: run_pai("synflow", s),
        "random": lambda s: run_pai("random", s, scope="local"),
        "random_erk": lambda s: run_pai("random", s, scope="local", distribution="erk"),
    }
    for method in args.methods:
        accs = []
        for seed in args.seeds:
            t = time.perf_counter()
            acc, s = runners[method](seed)
            accs.append(acc)
            print(f"{method:10s} seed {seed}: acc {acc:.4f}  sparsity {s:.4f}  ({time.perf_counter() - t:.1f}s)", flush=True)
        print(f"{method:10s} mean {_mean(accs):.4f}  min {min(accs):.4f}  max {max(accs):.4f}", flush=True)


if __name__ == "__main__":
    main()
