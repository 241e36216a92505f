"""The contract every registered algorithm keeps, tested for each name in the registry.

Each method runs through the engine long enough for at least 3 mask updates (the update
schedules are made frequent through the algorithm's own keyword arguments), or, for a method
that runs its own loop (a score search), through its whole recipe on a tiny model. After every
update: exact counts, exact zeros, and grown weights at 0 with zeroed optimizer state. A method
that never changes its masks (it does not override ``update_masks``) must make no update.
Resuming from the engine's state mid-run ends bit-identical to the uninterrupted run.
"""
import copy
import inspect

import pytest
import torch

import fastsparse as sparse
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.engine.recipe import recipe_class
from fastsparse.experiments.config import algorithm_parameters
from fastsparse.recipes.score_search import finetune, search

from helpers import batch, mlp

TOTAL, SPE = 60, 6
NAMES = sparse.list_algorithms()


def _frequent(name: str) -> dict:
    """Keyword arguments that make the method update its masks often in 60 steps (only ones it takes)."""
    takes = algorithm_parameters(sparse.get_algorithm(name))
    kwargs = {}
    if "freq" in takes:
        kwargs["freq"] = 2
    elif "update" in takes and name != "imp":
        kwargs["update"] = sparse.UpdateSchedule(freq=2)
    if "drop_fraction" in takes:
        kwargs["drop_fraction"] = sparse.Constant(0.3)
    if name == "imp":
        kwargs["prune_fraction"] = 0.5           # 4 levels to 0.9, boundaries every 12 steps
    if name == "suptickets":                     # 2 cycles of 2 epochs after 6 epochs of RigL
        kwargs.update(cycle=2, cycle_rate=0.4, base_kwargs={"update": sparse.UpdateSchedule(freq=2)})
    return kwargs


def _changes_masks(cls) -> bool:
    return cls.update_masks is not sparse.SparsityAlgorithm.update_masks


def _own_loop(cls) -> bool:
    rc = recipe_class(cls(sparsity=0.5)) if "sparsity" in inspect.signature(cls).parameters else None
    return rc is not None and bool(rc.own_loop)


def _run(name: str, seed: int = 0, steps: int = TOTAL, engine_state=None, model=None, opt_state=None,
         on_update=None):
    torch.manual_seed(seed)
    model = model or mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    engine = sparse.Sparsifier(model, opt, sparse.create(name, **_frequent(name)), total_steps=TOTAL,
                               steps_per_epoch=SPE, data=batch(), seed=seed)
    if engine_state is not None:
        engine.load_state_dict(copy.deepcopy(engine_state))
    x, y = batch(seed=1)
    for _ in range(steps):
        before = {sp.name: sp.mask.clone() for sp in engine._sps}
        n = len(engine.history)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if len(engine.history) > n and on_update is not None:
            on_update(engine, opt, before)
    return model, opt, engine


def _check_after_update(engine, opt, before, initial):
    sps = engine.groups[0].params
    alg = engine.groups[0].algorithm
    for sp in sps:
        assert sp.mask.dtype == torch.bool and sp.mask.shape == sp.param.shape
        assert (sp.param[~sp.mask] == 0).all()                                  # exact zeros
        grown = sp.mask & ~before[sp.name]
        if grown.any():
            assert (sp.param[grown] == 0).all()                                 # grown weights at 0
            for value in opt.state[sp.param].values():
                if isinstance(value, torch.Tensor) and value.shape == sp.param.shape:
                    assert (value[grown] == 0).all()                            # with zeroed state
    counts = [int(sp.mask.sum()) for sp in sps]
    if alg.keeps_count:
        assert counts == initial                                                # exact counts, kept
        return
    rows = engine.report()
    total = sum(r["numel"] for r in rows)
    per_layer = all(r["active"] == n_keep(r["numel"], r["target_sparsity"]) for r in rows)
    model_wide = sum(counts) == n_keep(total, rows[0]["target_sparsity"])
    assert per_layer or model_wide or sum(counts) == sum(initial), rows         # gradual: on target; SNFS: total


@pytest.mark.parametrize("name", NAMES)
def test_every_method_keeps_the_contract_through_its_updates(name):
    cls = sparse.get_algorithm(name)
    if _own_loop(cls):
        _check_score_search(name)
        return
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    initial = {}
    seen = []

    def on_update(engine, opt, before):
        if not initial:
            initial["counts"] = [int(before[sp.name].sum()) for sp in engine.groups[0].params]
        seen.append(engine.history[-1]["step"])
        _check_after_update(engine, opt, before, initial["counts"])

    _, _, engine = _run(name, model=model, on_update=on_update)
    if _changes_masks(cls):
        assert len(seen) >= 3, f"{name} made {len(seen)} mask updates in {TOTAL} steps"
    else:
        assert seen == [] and engine.history == []
    for sp in engine._sps:
        assert (sp.param[~sp.mask] == 0).all()


def _check_score_search(name):
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]
    alg = sparse.create(name, sparsity=0.8, **({"iter_period": 1} if name == "gem" else {}))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    rounds = []
    search(model, alg, data, loss, epochs=4, on_epoch_end=lambda e, scored: rounds.append(
        sum(int(f.sum()) for f in scored.flags)))
    sps = sparse_params(model)
    total = sum(sp.param.numel() for sp in sps)
    if name == "gem":   # freezing rounds shrink the flags to the target, never grow them
        assert rounds == sorted(rounds, reverse=True) and rounds[-1] == n_keep(total, 0.8)
        assert sum(int(sp.mask.sum()) for sp in sps) <= n_keep(total, 0.8)
    else:
        assert [int(sp.mask.sum()) for sp in sps] == [n_keep(sp.param.numel(), 0.8) for sp in sps]
    masks = [sp.mask.clone() for sp in sps]
    finetune(model, data, loss, epochs=2)
    for sp, m in zip(sps, masks):
        assert torch.equal(sp.mask, m) and (sp.param[~m] == 0).all()


@pytest.mark.parametrize("name", [n for n in NAMES if not _own_loop(sparse.get_algorithm(n))])
def test_resuming_from_the_engine_state_is_bit_identical(name):
    ref_model, _, ref = _run(name)
    half_model, half_opt, half = _run(name, steps=TOTAL // 2 + 1)
    state, opt_state = half.state_dict(), half_opt.state_dict()
    twin = copy.deepcopy(half_model)   # carries the masks: the twin engine attaches nothing new
    model, _, engine = _run(name, steps=TOTAL - (TOTAL // 2 + 1), engine_state=state, model=twin, opt_state=opt_state)
    assert engine.step_count == ref.step_count and engine.history == ref.history
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), (name, k)
