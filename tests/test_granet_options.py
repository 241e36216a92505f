"""The GraNet / sparse_learning options of the DST and GraNet algorithms, worked by hand:
the ``--prune`` rules (magnitude, SET, threshold), the ``--redistribution`` modes (momentum,
magnitude, nonzeros, none), the ``--growth`` scores (random, gradient, momentum) and GraNet's
regrowth after the pruning window (``keep_regrowing``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse.algorithms.dst import layer_scores, set_drop, threshold_drop
from fastsparse.core.schedules import Clock, Constant, UpdateSchedule
from helpers import batch, mlp


def _two_layers(w0, w1):
    """A model of two bias-free linear layers holding exactly the weights ``w0`` and ``w1``."""
    model = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0], bias=False),
                          nn.Linear(w1.shape[1], w1.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w0)
        model[1].weight.copy_(w1)
    return model


def _engine(model, alg, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = fs.Sparsifier(model, opt, alg, total_steps=100, hook=False)
    return engine, opt, engine.groups[0].params


def _set_masks(params, masks, weights=None):
    """Give the engine's parameters these masks (and these weights: attaching masked them)."""
    with torch.no_grad():
        for i, (sp, m) in enumerate(zip(params, masks)):
            sp.mask.copy_(m)
            if weights is not None:
                sp.param.copy_(weights[i])


# --- --prune SET: drop the smallest positives and the negatives closest to zero ------------------

def test_prune_set_drops_smallest_positive_and_largest_negative_by_hand():
    w = torch.tensor([0.9, 0.3, -0.2, -0.6, 0.05, -0.01])
    mask = torch.ones(6, dtype=torch.bool)
    # n = 3: ⌈3/2⌉ = 2 positives (0.05, 0.3) and ⌊3/2⌋ = 1 negative closest to 0 (-0.01)
    assert set_drop(w, mask, 3).tolist() == [True, False, True, True, False, False]
    # --prune magnitude would drop the 3 smallest |w| instead: 0.01, 0.05, 0.2
    magnitude = fs.drop_and_grow(mask, w.abs(), torch.zeros(6), 3, 0)
    assert magnitude.tolist() == [True, True, False, True, False, False]


def test_prune_set_takes_from_the_other_sign_when_one_lacks():
    w = torch.tensor([0.4, -0.3, -0.1, -0.5, 0.0])
    mask = torch.tensor([True, True, True, True, False])
    # one active positive (0.4): it goes; the other 2 of 3 come from the negatives -0.1, -0.3
    assert set_drop(w, mask, 3).tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="cannot drop 5 of 4"):
        set_drop(w, mask, 5)


def test_prune_threshold_drops_every_weight_at_or_below_it_by_hand():
    w = torch.tensor([0.0005, -0.002, 0.001, -0.0009, 0.5, 0.3])
    mask = torch.tensor([True, True, True, True, True, False])
    assert threshold_drop(w, mask, 0.001).tolist() == [False, True, False, False, True, False]


def test_dst_prune_set_and_threshold_regrow_what_they_drop():
    # layer 0 (2×3): all active; layer 1 (1×4): all active
    w0 = torch.tensor([[0.9, 0.3, -0.2], [-0.6, 0.05, -0.01]])
    w1 = torch.tensor([[0.0005, -0.5, 0.002, 0.7]])
    for rule, expect_kept in (("set", [[True, False, True], [True, False, False]]),
                              ("threshold", [[True, True, True], [True, True, True]])):
        model = _two_layers(w0, w1)
        alg = fs.DST(sparsity=0.0, drop_fraction=Constant(0.5), update=UpdateSchedule(freq=1), grow_score="random",
                     drop_rule=rule, drop_threshold=0.001)
        engine, opt, params = _engine(model, alg)
        _set_masks(params, [torch.ones_like(w0, dtype=torch.bool), torch.ones_like(w1, dtype=torch.bool)], [w0, w1])
        kept = [set_drop(w0, params[0].mask, 3), set_drop(w1, params[1].mask, 2)] if rule == "set" else \
            [threshold_drop(w0, params[0].mask, 0.001), threshold_drop(w1, params[1].mask, 0.001)]
        assert kept[0].tolist() == expect_kept
        new = alg.update_masks(params, opt, Clock(1, 100), seed=0)
        # the count is kept: every dropped weight is regrown somewhere the layer does not keep
        for k, n, sp in zip(kept, new, params):
            assert int(n.sum()) == int(sp.mask.sum()) and bool((n | ~k).all())


def test_dst_rejects_an_unknown_prune_rule_before_anything_changes():
    with pytest.raises(ValueError, match=r"unknown drop_rule 'CS_death'; valid: \['keep_score', 'set', 'threshold'\]"):
        fs.DST(drop_rule="CS_death")
    with pytest.raises(ValueError, match="drop_threshold must be a number ≥ 0"):
        fs.DST(drop_rule="threshold", drop_threshold=-1)
    with pytest.raises(ValueError, match="unknown redistribution 'variance'"):
        fs.DST(redistribution="variance")


# --- --redistribution: the share of each layer -------------------------------------------------

def test_redistribution_layer_scores_by_hand():
    w = [torch.tensor([0.4, -0.2, 0.0, 0.9]), torch.tensor([0.0005, -0.3, 0.1])]
    m = [torch.tensor([True, True, True, False]), torch.tensor([True, True, False])]
    mom = [torch.tensor([0.1, -0.3, 0.2, 5.0]), torch.tensor([0.6, 0.0, 9.0])]
    # magnitude: mean |w| over active: (0.4 + 0.2 + 0)/3 = 0.2; (0.0005 + 0.3)/2 = 0.15025
    assert layer_scores("magnitude", w, m, None) == pytest.approx([0.2, 0.15025])
    # nonzeros: active with |w| > 0.001: {0.4, -0.2} -> 2; {-0.3} -> 1
    assert layer_scores("nonzeros", w, m, None) == [2.0, 1.0]
    # momentum: mean |m| over active: (0.1 + 0.3 + 0.2)/3 = 0.2; (0.6 + 0)/2 = 0.3
    assert layer_scores("momentum", w, m, mom) == pytest.approx([0.2, 0.3])
    # a layer without active weights scores 0
    assert layer_scores("magnitude", w, [m[0], torch.zeros(3, dtype=torch.bool)], None)[1] == 0.0


def test_dst_redistribution_magnitude_and_nonzeros_move_growth_between_layers_by_hand():
    # layer 0: 8 weights, 4 active with |w| 0.8, 0.6, 0.4, 0.2 (mean 0.5)
    # layer 1: 8 weights, 4 active with |w| 0.4, 0.3, 0.2, 0.1 (mean 0.25)
    w0 = torch.tensor([[0.8, -0.6, 0.4, -0.2, 0.0, 0.0, 0.0, 0.0]])
    w1 = torch.tensor([[0.4, 0.3, -0.2, 0.1, 0.0, 0.0, 0.0, 0.0]])
    masks = [w0 != 0, w1 != 0]
    # --redistribution magnitude, --redistribution nonzeros, --redistribution none; f = 0.5: each drops floor(0.5 · 4) = 2; total 4
    # magnitude: p = [0.5, 0.25]/0.75 = [2/3, 1/3] -> shares 8/3, 4/3 -> floors [2, 1], 1 left to the
    #   larger remainder (2/3 vs 1/3): [3, 1]; free slots 6 each, cap floor(0.99 · 6) = 5
    # nonzeros: 4 and 4 active above 0.001 -> p = [1/2, 1/2] -> [2, 2]
    for rule, expected in (("magnitude", [3, 1]), ("nonzeros", [2, 2]), ("none", [2, 2])):
        model = _two_layers(w0, w1)
        alg = fs.DST(sparsity=0.5, drop_fraction=Constant(0.5), update=UpdateSchedule(freq=1), grow_score="random",
                     redistribution=rule)
        engine, opt, params = _engine(model, alg)
        _set_masks(params, masks, [w0, w1])
        new = alg.update_masks(params, opt, Clock(1, 100), seed=0)
        assert [int(n.sum()) for n in new] == [2 + expected[0], 2 + expected[1]], rule
        assert alg.keeps_count == (rule == "none")


def test_dst_redistribution_momentum_uses_momentum_even_when_growth_is_gradient():
    torch.manual_seed(0)
    model = mlp((8, 16, 4), bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alg = fs.RigL(sparsity=0.5, drop_fraction=Constant(0.5), update=UpdateSchedule(freq=1), redistribution="momentum")
    engine, opt, params = _engine(model, alg, opt)
    x, y = batch(8, 16, 4)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for sp in params:   # a momentum that differs from the gradient: layer 1 ten times larger
        opt.state[sp.param]["momentum_buffer"].fill_(1.0 if sp.name.startswith("0") else 10.0)
    new = alg.update_masks(params, opt, Clock(1, 100), seed=0)
    before = [int(sp.mask.sum()) for sp in params]
    dropped = [b // 2 for b in before]
    # p = [1, 10]/11 of the total dropped, capped at 99% of layer 1's free slots
    assert int(new[1].sum()) - (before[1] - dropped[1]) > dropped[1]
    assert sum(int(n.sum()) for n in new) == sum(before)


# --- --growth: random, gradient, momentum -------------------------------------------------------

@pytest.mark.parametrize("growth,expected", [("gradient", [True, False, False, True, False, True]),
                                             ("momentum", [True, False, True, False, False, True])])
def test_growth_gradient_and_momentum_by_hand(growth, expected):
    w = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.1, 0.5]])
    model = nn.Sequential(nn.Linear(6, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alg = fs.DST(sparsity=0.5, drop_fraction=Constant(0.34), update=UpdateSchedule(freq=1), grow_score=growth)
    engine, opt, params = _engine(model, alg, opt)
    _set_masks(params, [w != 0], [w])
    model[0].weight.grad = torch.tensor([[0.0, 0.1, 0.2, 0.7, 0.0, 0.0]])
    opt.state[model[0].weight]["momentum_buffer"] = torch.tensor([[0.0, 0.1, 0.8, -0.3, 0.0, 0.0]])
    # active {0, 4, 5}; drop floor(0.34 · 3) = 1: the smallest |w| (flat 4, 0.1)
    # gradient grows the largest |g| among {1, 2, 3, 4}: flat 3 (0.7); momentum: flat 2 (0.8)
    new = alg.update_masks(params, opt, Clock(1, 100), seed=0)
    assert new[0][0].tolist() == expected


def test_growth_random_draws_the_same_on_every_run():
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        model = mlp((8, 16, 4), bias=False)
        alg = fs.SET(sparsity=0.5, drop_fraction=Constant(0.5), update=UpdateSchedule(freq=1))
        engine, opt, params = _engine(model, alg)
        masks.append(alg.update_masks(params, opt, Clock(3, 100), seed=7))
    assert all(torch.equal(a, b) for a, b in zip(*masks))


# --- GraNet: regrowth after the pruning window (the reference code's behaviour) -----------------

def test_granet_keep_regrowing_updates_after_the_end_of_pruning():
    kw = dict(sparsity=0.8, initial_sparsity=0.5, start=0, end=20, freq=10)
    plain, keeps = fs.GraNet(**kw), fs.GraNet(keep_regrowing=True, **kw)
    # pruning ends at step 20: plain GraNet stops there; keep_regrowing goes on every 10 steps
    assert [plain.is_update(Clock(s, 100)) for s in (10, 20, 30, 90)] == [True, True, False, False]
    assert [keeps.is_update(Clock(s, 100)) for s in (10, 20, 30, 90)] == [True, True, True, True]
    with pytest.raises(ValueError, match="keep_regrowing must be true or false"):
        fs.GraNet(keep_regrowing="yes", **kw)


def test_granet_regrowth_with_constant_decay_schedule_by_hand():
    # --decay-schedule constant: regrow_fraction = regrow_min = 0.5 gives r_t = 0.5 at every step
    alg = fs.GraNet(0.9, initial_sparsity=0.5, regrow_fraction=0.5, regrow_min=0.5, keep_regrowing=True)
    assert [alg.regrow_fraction(Clock(s, 100)) for s in (0, 37, 99)] == [0.5, 0.5, 0.5]
    torch.manual_seed(1)
    model = mlp((8, 16, 4), bias=False)
    engine, opt, params = _engine(model, alg)
    x, y = batch(8, 16, 4)
    nn.functional.cross_entropy(model(x), y).backward()
    clock = Clock(90, 100)                      # after the pruning window: pruned to the final 90%
    pruned = alg.prune(params, clock)
    new = alg.update_masks(params, opt, clock, seed=0).masks
    total = sum(sp.mask.numel() for sp in params)
    assert sum(int(p.sum()) for p in pruned) == round(0.1 * total)
    for p, n in zip(pruned, new):
        assert int(n.sum()) == int(p.sum())
        # ceil(0.5 · nnz) dropped by |w| and as many grown by |gradient|, some may grow back
        assert int((p & ~n).sum()) <= -(-int(p.sum()) // 2)
