"""Dynamic sparse training: drop/grow decisions by hand, SNFS redistribution, exact counts
(invariant 1) and grown-weight/optimizer-state rules (invariant 3)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fastsparse as fs
from fastsparse.core.schedules import Clock, Constant, UpdateSchedule
from helpers import layer_input, one_layer, batch, mlp

INF = float("inf")

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
}
ALGORITHMS = {"set": fs.SET, "rigl": fs.RigL, "snfs": fs.SNFS}

SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)
SPARSITY = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _every_step(cls, sparsity=0.5, f=0.5, **kw):
    return cls(sparsity=sparsity, drop_fraction=Constant(f), update=UpdateSchedule(freq=1), **kw)


_one_layer, _input = one_layer, layer_input


def _train_step(model, opt, x):
    opt.zero_grad()
    out = model(x)
    (out.pow(2).mean() + out.sum()).backward()
    opt.step()


def _zeros(mask):
    return int((~mask).sum())


# --- drop_and_grow by hand -------------------------------------------------------------------

# W: active (nonzero) at flat 0, 2, 5, 7 with |w| 0.9, 0.2, 0.05, 0.7
W = torch.tensor([[0.9, 0.0, -0.2, 0.0], [0.0, 0.05, 0.0, -0.7]])
MASK = W != 0


def test_set_drop_and_grow_by_hand():
    # drop 2 smallest |w| among active: 0.05 (flat 5), 0.2 (flat 2); kept {0, 7}
    # random grow scores, candidates {1..6}: 0.8, 0.1, 0.6, 0.2, 0.9, 0.4 -> grow flat 5 (0.9), 1 (0.8)
    rand = torch.tensor([[0.3, 0.8, 0.1, 0.6], [0.2, 0.9, 0.4, 0.5]])
    new = fs.drop_and_grow(MASK, W.abs(), rand, 2, 2)
    assert new.tolist() == [[True, True, False, False], [False, True, False, True]]


def test_rigl_drop_and_grow_by_hand():
    # same drop (flat 5, 2); |grad| on candidates {1..6}: 0.1, 0.3, 0.2, 0.25, 0.0, 0.6
    # (5.0 at flat 0 is already kept) -> grow flat 6 (0.6) and 2 (0.3): flat 2 drops and regrows
    grad = torch.tensor([[5.0, 0.1, 0.3, 0.2], [0.25, 0.0, 0.6, 0.9]])
    new = fs.drop_and_grow(MASK, W.abs(), grad.abs(), 2, 2)
    assert new.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_snfs_drop_and_grow_with_more_or_fewer_grown():
    mom = torch.tensor([[0.0, 0.5, 0.1, 0.4], [0.3, 0.05, 0.2, 0.0]])
    # kept {0, 7}; |m| on candidates {1..6}: 0.5, 0.1, 0.4, 0.3, 0.05, 0.2
    assert fs.drop_and_grow(MASK, W.abs(), mom, 2, 3).tolist() == [[True, True, False, True],
                                                                   [True, False, False, True]]
    assert fs.drop_and_grow(MASK, W.abs(), mom, 2, 1).tolist() == [[True, True, False, False],
                                                                   [False, False, False, True]]
    assert int(fs.drop_and_grow(MASK, W.abs(), mom, 2, 0).sum()) == 2


def test_drop_and_grow_ties_are_deterministic():
    mask = torch.ones(1, 4, dtype=torch.bool)
    # equal keep scores: the lowest flat indices are kept, so flat 2, 3 are dropped
    # equal grow scores among {2, 3}: flat 2 grows back
    assert fs.drop_and_grow(mask, torch.ones(1, 4), torch.zeros(1, 4), 2, 1).tolist() == [[True, True, True, False]]


def test_drop_and_grow_nothing_to_do_keeps_mask():
    assert torch.equal(fs.drop_and_grow(MASK, W.abs(), torch.rand(2, 4), 0, 0), MASK)


def test_drop_and_grow_grow_scores_of_minus_inf_still_grow_exactly():
    # a grow score may be -inf ("rather not here"): the count must still be exact
    mask = torch.tensor([True, True, False, False, True, False])
    keep = torch.tensor([0.5, 0.1, 9.0, 9.0, 0.3, 9.0])
    # drop flat 1 (0.1); kept {0, 4}; every candidate {1, 2, 3, 5} scores -inf: the lowest (flat 1) grows
    new = fs.drop_and_grow(mask, keep, torch.full((6,), -INF), 1, 1)
    assert new.tolist() == [True, True, False, False, True, False]
    assert int(new.sum()) == 3


def test_drop_and_grow_keep_score_minus_inf_never_keeps_an_inactive_weight():
    mask = torch.tensor([False, True, False, True])
    keep = torch.tensor([1.0, -INF, 1.0, 0.5])
    # nothing dropped: the mask must not change, whatever the keep score says
    assert fs.drop_and_grow(mask, keep, torch.zeros(4), 0, 0).tolist() == [False, True, False, True]
    # one dropped: the -inf one (flat 1); then grow the best of {0, 1, 2}: flat 2 (0.3)
    grow = torch.tensor([0.2, 0.1, 0.3, 0.0])
    assert fs.drop_and_grow(mask, keep, grow, 1, 1).tolist() == [False, False, True, True]


# --- SNFS redistribution by hand -------------------------------------------------------------

def test_redistribute_proportional_to_mean_momentum():
    # p = [1/4, 3/4] of 4 removed -> [1, 3]
    assert fs.redistribute([1.0, 3.0], [2, 2], [10, 10]) == [1, 3]
    # p = [0.5, 0.3, 0.2] of 10 -> [5, 3, 2]
    assert fs.redistribute([0.5, 0.3, 0.2], [4, 3, 3], [50, 50, 50]) == [5, 3, 2]
    assert fs.redistribute([0.5, 0.5], [0, 0], [5, 5]) == [0, 0]


def test_redistribute_largest_remainders():
    # p = [0.5, 0.25, 0.25] of 3: shares 1.5, 0.75, 0.75; floors [1, 0, 0] (1 left);
    # remainders 0.5, 0.75, 0.75: the 2 left go to the two largest remainders -> [1, 1, 1]
    assert fs.redistribute([0.5, 0.25, 0.25], [1, 1, 1], [10, 10, 10]) == [1, 1, 1]
    # p = [0.6, 0.4] of 3: shares 1.8, 1.2; floors [1, 1]; remainder 0.8 > 0.2 -> [2, 1]
    assert fs.redistribute([0.6, 0.4], [2, 1], [10, 10]) == [2, 1]
    # equal shares 2/3 each of 2: ties broken by layer order -> [1, 1, 0]
    assert fs.redistribute([1.0, 1.0, 1.0], [1, 1, 0], [5, 5, 5]) == [1, 1, 0]


def test_redistribute_caps_at_99_percent_of_free_and_moves_leftovers():
    # p = [0.9, 0.1] of 10 = 9, 1; layer 0 has 3 free slots, cap floor(0.99 * 3) = 2;
    # its 7 leftover go to layer 1 (cap floor(0.99 * 20) = 19): [2, 8]
    assert fs.redistribute([9.0, 1.0], [5, 5], [3, 20]) == [2, 8]
    # when 99% caps cannot hold the total, every free slot may be used: caps [1, 1] < 4 -> [2, 2]
    assert fs.redistribute([1.0, 1.0], [2, 2], [2, 2]) == [2, 2]
    with pytest.raises(ValueError, match="free"):
        fs.redistribute([1.0, 1.0], [3, 3], [2, 2])


def test_redistribute_without_scores_follows_removed():
    # all scores zero (or not finite): each layer regrows in proportion to what it removed
    assert fs.redistribute([0.0, 0.0], [3, 1], [10, 10]) == [3, 1]
    assert fs.redistribute([float("nan"), 0.0], [1, 3], [10, 10]) == [1, 3]


@settings(max_examples=25, deadline=None)
@given(data=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 20), st.integers(0, 40)), min_size=1, max_size=6))
def test_redistribute_total_exact_and_within_free_property(data):
    scores = [d[0] for d in data]
    removed = [d[1] for d in data]
    free = [max(d[1], d[2]) for d in data]  # a layer has at least the slots it freed
    grow = fs.redistribute(scores, removed, free)
    assert sum(grow) == sum(removed)
    assert all(0 <= g <= f for g, f in zip(grow, free))


# --- full updates through a Sparsifier, weights/gradients/state set by hand ------------------

def _hand_rigl_layer():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        # active flat 0, 1, 5, 6 with |w| 0.5, 0.1, 0.05, 0.3
        lin.weight.copy_(torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.0, 0.05, -0.3, 0.0]]))
    lin.register_buffer("weight_mask", lin.weight.detach() != 0)
    lin.weight.grad = torch.tensor([[0.0, 0.9, 0.2, 0.0], [0.7, 0.1, 5.0, 0.3]])
    return lin


# k = floor(0.5 * 4) = 2: drop 0.05 (flat 5) and 0.1 (flat 1); kept {0, 6};
# grow the 2 largest |grad| among {1, 2, 3, 4, 5, 7}: 0.9 (flat 1) and 0.7 (flat 4).
RIGL_MASK = [[True, True, False, False], [True, False, True, False]]
RIGL_W = [[0.5, -0.1, 0.0, 0.0], [0.0, 0.0, -0.3, 0.0]]  # flat 1 regrown keeps -0.1; flat 4 grows at 0


def test_rigl_update_through_sparsifier_sgd_momentum():
    lin = _hand_rigl_layer()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    opt.state[lin.weight]["momentum_buffer"] = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    sparsifier = fs.Sparsifier(lin, opt, _every_step(fs.RigL), hook=False)
    assert sparsifier.step() is True
    assert lin.weight_mask.tolist() == RIGL_MASK
    assert torch.equal(lin.weight.detach(), torch.tensor(RIGL_W))
    # only the grown position (flat 4) has its momentum zeroed; flat 1 (dropped and regrown) keeps it
    assert opt.state[lin.weight]["momentum_buffer"].tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0, 6.0, 7.0, 8.0]]
    assert sparsifier.history[-1]["changed"] == 1 and sparsifier.history[-1]["active"] == 4


def test_rigl_update_through_sparsifier_adam_state():
    lin = _hand_rigl_layer()
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    avg = torch.arange(1.0, 9.0).view(2, 4)
    opt.state[lin.weight].update({"step": torch.tensor(3.0), "exp_avg": avg.clone(), "exp_avg_sq": avg * 10})
    fs.Sparsifier(lin, opt, _every_step(fs.RigL), hook=False).step()
    assert lin.weight_mask.tolist() == RIGL_MASK
    assert torch.equal(lin.weight.detach(), torch.tensor(RIGL_W))
    st_ = opt.state[lin.weight]
    assert st_["exp_avg"].tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0, 6.0, 7.0, 8.0]]
    assert st_["exp_avg_sq"].tolist() == [[10.0, 20.0, 30.0, 40.0], [0.0, 60.0, 70.0, 80.0]]
    assert float(st_["step"]) == 3.0


def test_rigl_zero_grown_state_off_keeps_state():
    lin = _hand_rigl_layer()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    opt.state[lin.weight]["momentum_buffer"] = torch.ones(2, 4)
    fs.Sparsifier(lin, opt, _every_step(fs.RigL), hook=False, zero_grown_state=False).step()
    assert lin.weight_mask.tolist() == RIGL_MASK
    assert opt.state[lin.weight]["momentum_buffer"].tolist() == [[1.0] * 4] * 2


def test_snfs_update_through_sparsifier_redistributes():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
    w0 = torch.tensor([[0.4, 0.0, -0.3, 0.0], [0.0, 0.1, 0.0, 0.2]])         # active 0, 2, 5, 7
    w1 = torch.tensor([[0.6, 0.0], [0.0, -0.5], [0.05, 0.0], [0.0, 0.02]])   # active 0, 3, 4, 7
    m0 = torch.tensor([[0.1, 0.3, 0.1, 0.0], [0.2, 0.1, 0.05, 0.1]])
    m1 = torch.tensor([[0.3, 0.9], [0.4, 0.3], [0.3, 0.8], [0.7, 0.3]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for layer, w, m in ((model[0], w0, m0), (model[1], w1, m1)):
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.register_buffer("weight_mask", w != 0)
        opt.state[layer.weight]["momentum_buffer"] = m.clone()
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.SNFS), hook=False)
    sparsifier.step()
    # Each layer drops floor(0.5 * 4) = 2 smallest |w|: layer 0 flat 5 (0.1), 7 (0.2);
    # layer 1 flat 7 (0.02), 4 (0.05). Removed in all: 4.
    # Mean |m| over the active weights: layer 0 (0.1 + 0.1 + 0.1 + 0.1) / 4 = 0.1,
    # layer 1 (0.3 + 0.3 + 0.3 + 0.3) / 4 = 0.3 -> shares 1/4, 3/4 of 4 -> regrow 1 and 3.
    # Layer 0 grows the best |m| outside kept {0, 2}: flat 1 (0.3).
    # Layer 1 grows the best 3 outside kept {0, 3}: flat 1 (0.9), 5 (0.8), 6 (0.7).
    assert model[0].weight_mask.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert model[1].weight_mask.tolist() == [[True, True], [False, True], [False, True], [True, False]]
    assert int(model[0].weight_mask.sum()) + int(model[1].weight_mask.sum()) == 8
    assert torch.equal(model[0].weight.detach(), torch.tensor([[0.4, 0.0, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(model[1].weight.detach(), torch.tensor([[0.6, 0.0], [0.0, -0.5], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"],
                       torch.tensor([[0.1, 0.0, 0.1, 0.0], [0.2, 0.1, 0.05, 0.1]]))
    assert torch.equal(opt.state[model[1].weight]["momentum_buffer"],
                       torch.tensor([[0.3, 0.0], [0.4, 0.3], [0.3, 0.0], [0.0, 0.3]]))


def _set_layer():
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 101.0).view(10, 10) / 100)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[::2] = True  # 50 active: the even flat positions, |w| growing with the index
    lin.register_buffer("weight_mask", mask.view(10, 10))
    return lin


def _set_update(seed, global_seed):
    lin = _set_layer()
    torch.manual_seed(global_seed)
    fs.Sparsifier(lin, None, _every_step(fs.SET), seed=seed).step()
    return lin


def test_set_update_drops_smallest_and_grows_seeded_random():
    lin = _set_update(seed=3, global_seed=0)
    mask = lin.weight_mask.flatten()
    old = torch.zeros(100, dtype=torch.bool)
    old[::2] = True
    # drop floor(0.5 * 50) = 25 smallest |w|: the even positions 0, 2, ..., 48; keep 50, 52, ..., 98
    assert mask[50::2].all()
    assert int(mask.sum()) == 50
    grown = mask & ~old
    regrown = mask[:50:2]
    assert int(grown.sum()) + int(regrown.sum()) == 25
    # every grown weight starts at exactly 0; regrown ones keep their value
    w = lin.weight.detach().flatten()
    assert (w[grown] == 0).all()
    assert torch.equal(w[:50:2][regrown], (torch.arange(1.0, 51.0, 2.0) / 100)[regrown])
    # the random growth comes from the engine's seed, not the global RNG
    assert torch.equal(_set_update(seed=3, global_seed=123).weight_mask, lin.weight_mask)
    assert not torch.equal(_set_update(seed=4, global_seed=0).weight_mask, lin.weight_mask)


# --- invariant 1: exact counts ----------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, s=SPARSITY, opt_name=st.sampled_from(sorted(OPTIMIZERS)),
       alg=st.sampled_from(["set", "rigl"]), f=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_exact_counts_after_attach_and_every_update_property(shape, s, opt_name, alg, f, seed):
    assume(round((1 - s) * math.prod(shape)) >= 1)   # a layer left empty is refused (tests/test_bad_input.py)
    torch.manual_seed(seed)
    layer = _one_layer(shape)
    opt = OPTIMIZERS[opt_name](layer.parameters())
    sparsifier = fs.Sparsifier(layer, opt, _every_step(ALGORITHMS[alg], s, f, redistribution="none"), seed=seed)
    n = layer.weight.numel()
    expected = n - round((1 - s) * n)
    assert _zeros(layer.weight_mask) == expected
    g = torch.Generator().manual_seed(seed)
    for step in range(1, 4):
        _train_step(layer, opt, _input(shape, g))
        assert _zeros(layer.weight_mask) == expected
        assert (layer.weight[~layer.weight_mask] == 0).all()
        assert len(sparsifier.history) == step  # an update really ran at every step
    assert sparsifier.report()[0]["target_sparsity"] == pytest.approx(s)


@settings(max_examples=25, deadline=None)
@given(dims=st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10)), s=SPARSITY,
       opt_name=st.sampled_from(sorted(OPTIMIZERS)), f=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_snfs_total_count_exact_property(dims, s, opt_name, f, seed):
    a, b, c = dims
    assume(min(round((1 - s) * a * b), round((1 - s) * b * c)) >= 1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    opt = OPTIMIZERS[opt_name](model.parameters())
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.SNFS, s, f), seed=seed)
    sizes = [a * b, b * c]
    per_layer = [n - round((1 - s) * n) for n in sizes]
    masks = [model[0].weight_mask, model[2].weight_mask]
    assert [_zeros(m) for m in masks] == per_layer
    total_active = sum(round((1 - s) * n) for n in sizes)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, 4):
        _train_step(model, opt, torch.randn(4, a, generator=g))
        assert sum(int(m.sum()) for m in masks) == total_active
        assert len(sparsifier.history) == step


def test_snfs_per_layer_counts_move_while_total_stays():
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    fs.Sparsifier(model, opt, _every_step(fs.SNFS, 0.8, 0.3))
    sps = fs.sparse_params(model)
    start = [int(sp.mask.sum()) for sp in sps]
    x, y = batch()
    moved = False
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        now = [int(sp.mask.sum()) for sp in sps]
        assert sum(now) == sum(start)
        moved |= now != start
    assert moved


# --- invariant 3: grown weights and their optimizer state -------------------------------------

def _check_update_rules(alg, opt_name, steps=4, seed=0):
    torch.manual_seed(seed)
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sparsifier = fs.Sparsifier(model, opt, _every_step(ALGORITHMS[alg], 0.7, 0.4), hook=False, seed=seed)
    sps = fs.sparse_params(model)
    x, y = batch()
    total_grown, state_was_nonzero = 0, False
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparsifier.apply_masks()
        before = [(sp.mask.clone(), sp.param.detach().clone(),
                   {k: v.clone() for k, v in opt.state[sp.param].items() if v.shape == sp.param.shape})
                  for sp in sps]
        assert sparsifier.step()
        for sp, (old, w, state) in zip(sps, before):
            new = sp.mask
            grown, kept, dropped = new & ~old, new & old, old & ~new
            total_grown += int(grown.sum())
            assert (sp.param[grown] == 0).all()
            assert torch.equal(sp.param[kept], w[kept])           # kept (incl. dropped-and-regrown) keep value
            assert (sp.param[dropped] == 0).all()
            assert state, "the optimizer holds state for the parameter"
            for key, v in state.items():
                now = opt.state[sp.param][key]
                state_was_nonzero |= bool((v[grown] != 0).any())
                assert (now[grown] == 0).all(), key
                assert torch.equal(now[~grown], v[~grown]), key  # nothing else touched
    assert total_grown > 0 and state_was_nonzero


@pytest.mark.parametrize("alg", ["set", "rigl", "snfs"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_grown_weights_start_at_zero_with_zeroed_state(alg, opt_name):
    _check_update_rules(alg, opt_name)


# --- misc DST options ----------------------------------------------------------------------

def test_custom_scores_with_generator_get_a_seeded_generator():
    seen = []

    def grow(param, opt, generator):
        seen.append(generator.initial_seed())
        return torch.rand(param.shape, generator=generator)

    lin = _set_layer()
    fs.Sparsifier(lin, None, _every_step(fs.DST, grow_score=grow), seed=7).step()
    lin2 = _set_layer()
    fs.Sparsifier(lin2, None, _every_step(fs.DST, grow_score=grow), seed=7).step()
    assert len(seen) == 2 and seen[0] == seen[1]
    assert torch.equal(lin.weight_mask, lin2.weight_mask)


def test_drop_fraction_float_is_cosine_to_stop():
    alg = fs.RigL(sparsity=0.5, drop_fraction=0.3, update=UpdateSchedule(freq=10, stop=0.75))
    # 0.3 / 2 * (1 + cos(pi * t / 0.75)): t = 0 -> 0.3; t = 0.375 -> 0.15; t = 0.75 -> 0
    assert alg.drop_fraction(Clock(0, progress=0.0)) == pytest.approx(0.3)
    assert alg.drop_fraction(Clock(0, progress=0.375)) == pytest.approx(0.15)
    assert alg.drop_fraction(Clock(0, progress=0.75)) == pytest.approx(0.0, abs=1e-15)


def test_zero_drop_fraction_means_no_update():
    lin = _hand_rigl_layer()
    before = lin.weight_mask.clone()
    sparsifier = fs.Sparsifier(lin, None, _every_step(fs.RigL, f=0.0), hook=False)
    assert sparsifier.step() is False
    assert torch.equal(lin.weight_mask, before) and sparsifier.history == []


def test_registry_names():
    assert {"static", "dst", "set", "snfs", "rigl"} <= set(fs.list_algorithms())
    assert fs.get_algorithm("RigL") is fs.RigL
    alg = fs.create("snfs", sparsity=0.8)
    assert isinstance(alg, fs.SNFS) and alg.sparsity == 0.8 and alg.redistribution == "momentum"
    assert fs.create("set").redistribution == "none"
