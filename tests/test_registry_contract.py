"""The contract every registered algorithm keeps, tested for each name in the registry.

An algorithm that needs data to attach says so with a ``needs_data`` attribute; it then
gets ``batch=(inputs, targets)``. Global methods (``scope == "global"``) may place their
count anywhere among the layers, so for them the model's total is what must be exact.
"""
import copy

import pytest
import torch

import fastsparse as sparse
from fastsparse.core.masks import n_keep
from fastsparse.core.schedules import Clock

from helpers import batch, mlp

TOTAL = 20
NAMES = sparse.list_algorithms()


def _kwargs(cls):
    return {"batch": batch()} if getattr(cls, "needs_data", False) else {}


def _setup(name, seed=0):
    torch.manual_seed(seed)
    cls = sparse.get_algorithm(name)
    model = mlp((8, 32, 24, 4))
    x, y = batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()   # some methods score gradients at attach
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    alg = cls(**_kwargs(cls))
    engine = sparse.Sparsifier(model, opt, alg, total_steps=TOTAL, seed=seed)
    return cls, model, opt, alg, engine


def _check_masks(engine):
    for sp in engine.groups[0].params:
        assert sp.mask.dtype == torch.bool and sp.mask.shape == sp.param.shape
        assert (sp.param[~sp.mask] == 0).all()


def _exact_counts(alg, engine):
    rows = engine.report()
    per_layer = all(r["active"] == n_keep(r["numel"], r["target_sparsity"]) for r in rows)
    if per_layer:
        return True
    if getattr(alg, "scope", "local") == "global":
        total = sum(r["numel"] for r in rows)
        return sum(r["active"] for r in rows) == n_keep(total, rows[0]["target_sparsity"])
    return False


def test_the_pruning_family_is_registered():
    for name in ("gmp", "granet", "imp", "sparsify", "pai", "snip", "grasp", "synflow", "prune_uniform",
                 "prune_global", "prune_and_grow_uniform", "prune_and_grow_global"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_created_with_defaults(name):
    cls = sparse.get_algorithm(name)
    alg = sparse.create(name, **_kwargs(cls))
    assert isinstance(alg, cls) and isinstance(alg, sparse.SparsityAlgorithm)
    assert isinstance(repr(alg), str)


@pytest.mark.parametrize("name", NAMES)
def test_attaches_exact_counts(name):
    cls, model, opt, alg, engine = _setup(name)
    _check_masks(engine)
    assert _exact_counts(alg, engine), engine.report()


@pytest.mark.parametrize("name", NAMES)
def test_training_keeps_masks_valid(name):
    cls, model, opt, alg, engine = _setup(name)
    params = engine.groups[0].params
    counts = [int(sp.mask.sum()) for sp in params]
    x, y = batch(seed=1)
    for _ in range(TOTAL):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _check_masks(engine)
        if alg.keeps_count:
            assert [int(sp.mask.sum()) for sp in params] == counts
    for step in (TOTAL // 2, TOTAL):
        new = alg.update_masks(params, opt, Clock(step, TOTAL), 0)
        if new is not None:
            assert len(new) == len(params)
            for m, sp in zip(new, params):
                assert m.dtype == torch.bool and m.shape == sp.param.shape


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name):
    cls, model, opt, alg, engine = _setup(name)
    x, y = batch(seed=1)
    for _ in range(TOTAL // 2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = alg.state_dict()
    fresh = cls(**_kwargs(cls))
    fresh.load_state_dict(copy.deepcopy(state))
    assert _equal(fresh.state_dict(), state)
    twin = copy.deepcopy(model)   # carries the masks: the twin engine attaches nothing new
    engine2 = sparse.Sparsifier(twin, torch.optim.SGD(twin.parameters(), lr=0.01), cls(**_kwargs(cls)),
                                total_steps=TOTAL)
    engine2.load_state_dict(copy.deepcopy(engine.state_dict()))
    assert engine2.step_count == engine.step_count
    assert _equal(engine2.groups[0].algorithm.state_dict(), state)
