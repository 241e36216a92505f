"""ITOP: the engine's exploration rate R_s = |union of all masks so far| / Σ N_l, and the ITOP preset."""
import copy

import pytest
import torch

import fastsparse as sparse
from fastsparse.core.masks import sparse_params
from fastsparse.core.schedules import Clock

from helpers import batch, mlp, train_steps


class _Shift(sparse.SparsityAlgorithm):
    """A test double: at every update, move each layer's active block one position to the right."""

    name = "shift_test_double"

    def is_update(self, clock):
        return True

    def update_masks(self, params, optimizer, clock, seed):
        return [sp.mask.reshape(-1).roll(1).view(sp.mask.shape) for sp in params]


def _block_masks(model, k):
    for sp in sparse.select_params(model):
        m = torch.zeros(sp.param.numel(), dtype=torch.bool)
        m[:k] = True
        sp.module.register_buffer(sp.attr + "_mask", m.view(sp.param.shape))


def test_exploration_rate_hand_worked():
    model = mlp((4, 5, 3))            # 20 + 15 weights
    _block_masks(model, 2)            # 2 active per layer
    x, y = batch(model_in=4, classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparse.Sparsifier(model, opt, _Shift(), total_steps=10)
    assert engine.exploration_rate() == pytest.approx(4 / 35)
    train_steps(model, opt, 3, x, y)
    # each shift adds one new position per layer: 2 + 3 per layer after three updates
    assert engine.exploration_rate() == pytest.approx(10 / 35)
    assert [r["exploration_rate"] for r in engine.history] == pytest.approx([6 / 35, 8 / 35, 10 / 35])
    assert [r["explored"] for r in engine.report()] == [5, 5]
    assert [r["active"] for r in engine.report()] == [2, 2]


def test_static_masks_explore_nothing_beyond_their_density():
    model = mlp()
    engine = sparse.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), "static")
    train_steps(model, engine.optimizer, 5, *batch())
    assert engine.exploration_rate() == pytest.approx(1 - engine.sparsity())


def test_exploration_rate_survives_resume_exactly():
    x, y = batch()
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alg = sparse.create("itop", sparsity=0.8, freq=2)
    engine = sparse.Sparsifier(model, opt, alg, total_steps=20, seed=3)
    train_steps(model, opt, 6, x, y)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(engine.state_dict()))
    train_steps(model, opt, 6, x, y)

    twin = mlp((8, 32, 24, 4))
    sparse.Sparsifier(twin, None, sparse.create("itop", sparsity=0.8, freq=2), total_steps=20, seed=3).remove()
    twin.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved[1])
    engine2 = sparse.Sparsifier(twin, opt2, sparse.create("itop", sparsity=0.8, freq=2), total_steps=20, seed=3)
    engine2.load_state_dict(saved[2])
    train_steps(twin, opt2, 6, x, y)
    assert engine2.exploration_rate() == engine.exploration_rate()
    assert [r["exploration_rate"] for r in engine2.history] == [r["exploration_rate"] for r in engine.history]
    assert engine2.state_dict() == engine.state_dict()


def test_a_state_saved_without_exploration_still_loads():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparse.Sparsifier(model, opt, sparse.create("set", sparsity=0.5), total_steps=10)
    state = engine.state_dict()
    del state["explored"]
    engine.load_state_dict(state)
    assert engine.exploration_rate() == pytest.approx(0.5, abs=0.02)


def test_exploration_rate_never_decreases_and_reaches_beyond_the_density():
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sparse.Sparsifier(model, opt, sparse.create("itop", sparsity=0.9, freq=2), total_steps=30)
    train_steps(model, opt, 30, *batch())
    rates = [r["exploration_rate"] for r in engine.history]
    assert len(rates) == 15 and rates == sorted(rates)
    assert rates[-1] > 1.5 * (1 - engine.sparsity())
    union = {n: engine._union[n] for n in engine._union}
    for sp in sparse_params(model):
        assert not (sp.mask & ~union[sp.name]).any()


def test_itop_schedule_decays_from_half_to_its_minimum_without_a_stop():
    alg = sparse.create("itop")
    assert alg.drop_fraction(Clock(0, 1000)) == pytest.approx(0.5)
    assert alg.drop_fraction(Clock(500, 1000)) == pytest.approx(0.005 + 0.495 / 2)
    assert alg.drop_fraction(Clock(1000, 1000)) == pytest.approx(0.005)
    assert alg.is_update(Clock(900, 1000)) and alg.is_update(Clock(1000, 1000))
    assert not alg.is_update(Clock(950, 1000))
    rigl = sparse.create("rigl")
    assert not rigl.is_update(Clock(900, 1000))     # RigL stops at 75%
    assert type(sparse.create("itop", grow_score="gradient").grow_score) is type(rigl.grow_score)


def test_itop_presets_turn_set_and_rigl_into_itop():
    for name in ("set", "rigl"):
        alg = sparse.create(name, **sparse.ITOP_presets)
        assert alg.update.stop is None and alg.is_update(Clock(1000, 1000))
        assert alg.drop_fraction(Clock(1000, 1000)) == pytest.approx(0.005)


@pytest.mark.parametrize("kwargs", [{"drop_fraction": 0.1, "drop_min": 0.2}, {"drop_min": -0.1},
                                    {"drop_fraction": 1.5}])
def test_itop_bad_schedule(kwargs):
    with pytest.raises(ValueError, match="drop_min"):
        sparse.create("itop", **kwargs)
