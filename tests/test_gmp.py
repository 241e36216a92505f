"""GMP, GraNet and the pruning-based sparse initialisations."""
import math

import pytest
import torch

import fastsparse as sparse
from fastsparse.core.distributions import erdos_renyi_sparsity
from fastsparse.core.masks import n_keep
from fastsparse.core.schedules import Clock, Cubic

from helpers import ConvNet, batch, mlp


def _train(model, engine, opt, steps, seed=0, on_update=None):
    x, y = batch(seed=seed)
    loss_f = torch.nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        before = [sp.mask.clone() for sp in engine.groups[0].params]
        n_hist = len(engine.history)
        loss_f(model(x), y).backward()
        opt.step()
        if len(engine.history) > n_hist and on_update is not None:
            on_update(engine.step_count, before)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_gmp_hits_scheduled_counts_exactly_and_is_nested(scope):
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alg = sparse.GMP(0.9, start=10, end=60, freq=10, scope=scope, distribution="erk")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=100)
    params = engine.groups[0].params
    steps_seen = []
    finals = erdos_renyi_sparsity([tuple(sp.param.shape) for sp in params], 0.9)

    def check(step, before):
        steps_seen.append(step)
        r = min(1.0, (step - 10) / 50)
        if scope == "local":
            for sp, f in zip(params, finals):
                assert int(sp.mask.sum()) == n_keep(sp.mask.numel(), f * (1 - (1 - r) ** 3))
        else:
            total = sum(sp.mask.numel() for sp in params)
            assert sum(int(sp.mask.sum()) for sp in params) == n_keep(total, 0.9 * (1 - (1 - r) ** 3))
        for sp, old in zip(params, before):
            assert not (sp.mask & ~old).any()

    _train(model, engine, opt, 100, on_update=check)
    assert steps_seen == [20, 30, 40, 50, 60]   # step 10 is s = 0: nothing to prune
    assert engine.sparsity() == pytest.approx(0.9, abs=1 / 500)
    for sp in params:
        assert (sp.param[~sp.mask] == 0).all()


@pytest.mark.parametrize("scope", ["local", "global"])
def test_gmp_pruned_weights_were_the_smallest(scope):
    torch.manual_seed(1)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alg = sparse.GMP(0.8, start=0, end=30, freq=10, scope=scope)
    engine = sparse.Sparsifier(model, opt, alg, total_steps=50, hook=False)
    params = engine.groups[0].params
    x, y = batch()
    updates = 0
    for _ in range(30):
        opt.zero_grad()
        torch.nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
        seen = [(sp.param.detach() * sp.mask).abs() for sp in params]   # what the update scores
        before = [sp.mask.clone() for sp in params]
        if engine.step():
            updates += 1
            if scope == "local":
                for s, old, sp in zip(seen, before, params):
                    assert s[old & ~sp.mask].max() <= s[sp.mask].min()
            else:
                reserved = [int(s.argmax()) for s in seen]
                kept = torch.cat([s[sp.mask] for s, sp in zip(seen, params)])
                pruned = torch.cat([s[old & ~sp.mask] for s, old, sp in zip(seen, before, params)])
                assert pruned.max() <= kept.min() or any(
                    s.view(-1)[r] == kept.min() for s, r in zip(seen, reserved))
    assert updates == 3


def test_gmp_decision_one_threshold():
    """The pure decision: every pruned |w| ≤ every kept |w| (global) on the active set."""
    torch.manual_seed(2)
    model = mlp((8, 32, 24, 4))
    alg = sparse.GMP(0.9, start=0, end=100, freq=10, scope="global")
    engine = sparse.Sparsifier(model, None, alg, total_steps=100, hook=False)
    params = engine.groups[0].params
    new = alg.prune(params, Clock(50, 100))
    scores = [sp.param.detach().abs() for sp in params]
    kept = torch.cat([s[m] for s, m in zip(scores, new)])
    pruned = torch.cat([s[~m] for s, m in zip(scores, new)])
    assert pruned.max() <= kept.min()
    total = sum(s.numel() for s in scores)
    assert sum(int(m.sum()) for m in new) == n_keep(total, Cubic(0.0, 0.9, 0, 100)(Clock(50, 100)))


def test_gmp_structured_rows():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alg = sparse.GMP(0.5, start=0, end=20, freq=10, scope="local", granularity="row")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=40)
    _train(model, engine, opt, 40)
    for sp in engine.groups[0].params:
        rows = sp.mask.all(1)
        assert torch.equal(rows, sp.mask.any(1))
        assert int(rows.sum()) == n_keep(sp.mask.shape[0], 0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"start": 50, "end": 10}, "starts after it ends"),
    ({"start": 0.8, "end": 0.2}, "starts after it ends"),
    ({"initial_sparsity": 0.95}, "above the final sparsity"),
    ({"scope": "layer"}, "scope must be one of"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
])
def test_gmp_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse.GMP(**{"sparsity": 0.9, **kwargs})


def test_gmp_bad_granularity_fails_before_any_change():
    model = mlp()
    with pytest.raises(ValueError, match=r"'filter' does not exist for Linear; valid: \['weight', 'row', 'column', 'layer'\]"):
        sparse.Sparsifier(model, None, sparse.GMP(0.9, granularity="filter"), total_steps=10)
    assert not sparse.sparse_params(model)


# --- GraNet ---------------------------------------------------------------------------------------
def test_granet_starts_at_initial_density_and_ends_at_final():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = sparse.GraNet(0.9, initial_sparsity=0.5, start=10, end=50, freq=10, scope="global")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=80)
    params = engine.groups[0].params
    assert [int(sp.mask.sum()) for sp in params] == [n_keep(sp.mask.numel(), 0.5) for sp in params]
    counts = []
    _train(model, engine, opt, 80,
           on_update=lambda step, before: counts.append((step, sum(int(sp.mask.sum()) for sp in params))))
    total = sum(sp.mask.numel() for sp in params)
    expected = [(s, n_keep(total, Cubic(0.5, 0.9, 10, 50)(Clock(s, 80)))) for s in (10, 20, 30, 40, 50)]
    assert counts == expected
    assert len(engine.history) == 5 and all(r["changed"] > 0 for r in engine.history)


def test_granet_regrowth_decision():
    torch.manual_seed(3)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = sparse.GraNet(0.9, initial_sparsity=0.5, start=0, end=100, freq=10, scope="local")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=100, hook=False)
    params = engine.groups[0].params
    x, y = batch()
    torch.nn.CrossEntropyLoss()(model(x), y).backward()
    clock = Clock(30, 100)
    pruned = alg.prune(params, clock)
    update = alg.update_masks(params, opt, clock, seed=0)
    new = update.masks
    # every regrown weight is reported as grown, also those the pruning step had just removed
    assert all(torch.equal(g, m & ~p) for g, m, p in zip(update.grown, new, pruned))
    r = alg.regrow_fraction(clock)
    assert r == pytest.approx(0.005 + (0.5 - 0.005) / 2 * (1 + math.cos(math.pi * 0.3)))
    for sp, p, m in zip(params, pruned, new):
        assert m.dtype == torch.bool and int(m.sum()) == int(p.sum())
        grown = m & ~p
        assert 0 < int(grown.sum()) <= math.ceil(r * int(p.sum()))
        g = sp.param.grad.abs()
        assert g[grown].min() >= g[~m].max()


def test_granet_grown_weights_and_momentum_start_at_zero():
    torch.manual_seed(4)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = sparse.GraNet(0.8, initial_sparsity=0.5, start=0, end=40, freq=10)
    engine = sparse.Sparsifier(model, opt, alg, total_steps=40)
    params = engine.groups[0].params
    seen = []

    def check(step, before):
        for sp, old in zip(params, before):
            grown = sp.mask & ~old
            seen.append(int(grown.sum()))
            assert (sp.param[grown] == 0).all()
            assert (opt.state[sp.param]["momentum_buffer"][grown] == 0).all()

    _train(model, engine, opt, 40, on_update=check)
    assert sum(seen) > 0


def test_granet_bad_regrow_fraction():
    with pytest.raises(ValueError, match="regrow_fraction"):
        sparse.GraNet(0.9, regrow_fraction=1.5)


# --- prune_* sparse initialisations ----------------------------------------------------------------
def _dense_model(seed=0):
    torch.manual_seed(seed)
    return mlp((8, 32, 24, 4))


def test_prune_uniform_per_layer():
    model = _dense_model()
    w = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    engine = sparse.Sparsifier(model, None, sparse.create("prune_uniform", sparsity=0.6))
    for sp in engine.groups[0].params:
        assert int(sp.mask.sum()) == n_keep(sp.mask.numel(), 0.6)
        assert w[sp.name][~sp.mask].max() <= w[sp.name][sp.mask].min()


def test_prune_global_one_threshold_and_remaining_fraction():
    model = _dense_model()
    first = model[0].weight
    with torch.no_grad():
        first[:, :4] = 0   # 128 of 256 already zero: prune 60% of the remaining
    w = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    engine = sparse.Sparsifier(model, None, sparse.create("prune_global", sparsity=0.6))
    params = engine.groups[0].params
    nnz = sum(int((w[sp.name] != 0).sum()) for sp in params)
    assert sum(int(sp.mask.sum()) for sp in params) == n_keep(nnz, 0.6)
    kept = torch.cat([w[sp.name][sp.mask] for sp in params])
    pruned = torch.cat([w[sp.name][~sp.mask & (w[sp.name] != 0)] for sp in params])
    assert pruned.max() <= kept.min()
    assert not (params[0].mask[:, :4]).any()


@pytest.mark.parametrize("name", ["prune_and_grow_uniform", "prune_and_grow_global"])
def test_prune_and_grow_keeps_density_and_grows_by_gradient(name):
    model = _dense_model()
    x, y = batch()
    torch.nn.CrossEntropyLoss()(model(x), y).backward()
    engine = sparse.Sparsifier(model, None, sparse.create(name, sparsity=0.5))
    for sp in engine.groups[0].params:
        assert int(sp.mask.sum()) == sp.mask.numel()  # dense in: every pruned weight regrows
    # on a sparse start the topology changes but the count does not
    model2 = _dense_model(1)
    with torch.no_grad():
        for p in model2.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape) > 0.5)
    torch.nn.CrossEntropyLoss()(model2(x), y).backward()
    nnz = {n: int((p != 0).sum()) for n, p in model2.named_parameters() if p.dim() == 2}
    w = {n: p.detach().clone() for n, p in model2.named_parameters()}
    g = {n: p.grad.abs().clone() for n, p in model2.named_parameters()}
    engine2 = sparse.Sparsifier(model2, None, sparse.create(name, sparsity=0.5))
    for sp in engine2.groups[0].params:
        assert int(sp.mask.sum()) == nnz[sp.name]
        grown = sp.mask & (w[sp.name] == 0)
        if grown.any() and (~sp.mask).any():
            assert g[sp.name][grown].min() >= g[sp.name][~sp.mask & (w[sp.name] == 0)].max()


def test_prune_and_grow_needs_a_gradient():
    model = _dense_model()
    with pytest.raises(ValueError, match="chooses its first masks by gradient: pass data="):
        sparse.Sparsifier(model, None, sparse.create("prune_and_grow_uniform"))
    assert not sparse.sparse_params(model)


def test_prune_structured_form():
    model = _dense_model()
    engine = sparse.Sparsifier(model, None, sparse.create("prune_uniform", sparsity=0.5, granularity="column"))
    for sp in engine.groups[0].params:
        cols = sp.mask.all(0)
        assert torch.equal(cols, sp.mask.any(0)) and int(cols.sum()) == n_keep(sp.mask.shape[1], 0.5)


def test_filter_pruning_zeroes_whole_filters():
    torch.manual_seed(0)
    model = ConvNet()
    model.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    model.bn = torch.nn.BatchNorm2d(8)
    model.fc = torch.nn.Linear(128, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = sparse.GMP(0.5, start=0, end=10, freq=5, scope="local", granularity="filter", include="conv.weight")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=20)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    w = model.conv.weight.detach().flatten(1)
    pruned = ~model.conv.weight_mask.flatten(1).any(1)
    assert int(pruned.sum()) == 4 and (w[pruned] == 0).all() and (w[~pruned] != 0).all()
    assert [sp.name for sp in engine.groups[0].params] == ["conv.weight"]
