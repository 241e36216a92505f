"""Criteria (fasterai set) and sparsity schedules at points worked by hand."""
import math

import pytest
import torch

import fastsparse as sparse
from fastsparse.core.scores import CRITERIA, criterion_scores
from fastsparse.core.schedules import ProgressSchedule, as_progress_schedule
from fastsparse.core.schedules import Clock, Cubic

from helpers import batch, mlp, train_steps

W = torch.tensor([-3.0, 1.0, 2.0])
W0 = torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.parametrize("name, expected", [
    ("large_final", [3, 1, 2]),
    ("small_final", [-3, -1, -2]),
    ("large_init", [1, 2, 0.5]),
    ("small_init", [-1, -2, -0.5]),
    ("large_init_large_final", [1, 1, 0.5]),
    ("small_init_small_final", [-3, -2, -2]),
    ("magnitude_increase", [2, -1, 1.5]),
    ("movement", [4, 3, 1.5]),
])
def test_criteria_by_hand(name, expected):
    assert criterion_scores(name, W, W0).tolist() == expected


def test_random_criterion_is_seeded():
    a = criterion_scores("random", W, generator=torch.Generator().manual_seed(3))
    b = criterion_scores("random", W, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == W.shape and ((a >= 0) & (a < 1)).all()
    assert set(CRITERIA) == {"large_final", "small_final", "large_init", "small_init", "large_init_large_final",
                             "small_init_small_final", "magnitude_increase", "movement", "random",
                             "squared_final", "movmag", "grad_crit", "updating_magnitude_increase",
                             "updating_movement", "updating_movmag"}


def test_criteria_errors():
    with pytest.raises(ValueError, match=r"unknown criterion 'largest'; valid names: \["):
        criterion_scores("largest", W)
    with pytest.raises(ValueError, match="weights saved when pruning was set up"):
        criterion_scores("movement", W)
    with pytest.raises(ValueError, match="shape"):
        criterion_scores(lambda w, w0, **_: w.sum(), W)


# --- progress schedules -------------------------------------------------------------------------
def test_agp_at_half_with_start_02():
    # x = (0.5 - 0.2) / 0.8 = 0.375; 1 - 0.625^3 = 0.755859375
    assert ProgressSchedule("agp", start=0.2)(0.5) == pytest.approx(0.755859375)
    assert ProgressSchedule("agp")(0.5) == pytest.approx(0.755859375)  # fasterai's default start 0.2


@pytest.mark.parametrize("kind, start, end, points", [
    ("one_shot", None, 1.0, {0.0: 0.0, 0.49: 0.0, 0.5: 1.0, 1.0: 1.0}),
    ("iterative", None, 1.0, {0.1: 0.0, 0.2: 0.0, 0.21: 1 / 3, 0.2 + 0.8 / 3: 1 / 3, 0.5: 2 / 3, 0.9: 1.0, 1.0: 1.0}),
    ("lin", 0.2, 0.6, {0.1: 0.0, 0.4: 0.5, 0.6: 1.0, 0.9: 1.0}),
    ("cos", 0.0, 1.0, {0.0: 0.0, 0.25: (1 - math.sqrt(0.5)) / 2, 0.5: 0.5, 1.0: 1.0}),
    ("dsd", 0.0, 1.0, {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 0.75: 0.5, 1.0: 0.0}),
    ("one_cycle", 0.0, 1.0, {0.5: (1 + math.exp(-8)) / (1 + math.exp(-1)), 1.0: 1.0}),
    ("agp", 0.0, 1.0, {0.0: 0.0, 0.5: 0.875, 1.0: 1.0}),
])
def test_schedule_points(kind, start, end, points):
    sched = ProgressSchedule(kind, start, end)
    for p, v in points.items():
        assert sched(p) == pytest.approx(v, abs=1e-12), (kind, p)


def test_iterative_steps_setting():
    sched = ProgressSchedule("iterative", start=0.0, n_steps=4)
    assert [sched(p) for p in (0.1, 0.3, 0.6, 0.8)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "lin", "start": 0.7, "end": 0.3}, "starts after it ends"),
    ({"kind": "agp", "start": 1.5}, "fractions of training"),
    ({"kind": "cubic"}, "unknown schedule 'cubic'; valid names"),
    ({"kind": "iterative", "n_steps": 0}, "n_steps"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressSchedule(**kwargs)


def test_schedule_object_carries_its_own_window():
    with pytest.raises(ValueError, match="carries its own"):
        as_progress_schedule(ProgressSchedule("lin"), start=0.1)
    assert as_progress_schedule("lin", 0.0, 0.5)(0.25) == 0.5


def test_gmp_cubic_in_steps():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n ΔT))^3 with t0 = 100, n ΔT = 1000
    cubic = Cubic(0.0, 0.9, start=100, end=1100)
    assert cubic(Clock(100)) == 0.0
    assert cubic(Clock(600)) == pytest.approx(0.9 * (1 - 0.5 ** 3))   # 0.7875
    assert cubic(Clock(1100)) == pytest.approx(0.9)
    assert cubic(Clock(50)) == 0.0 and cubic(Clock(5000)) == pytest.approx(0.9)
    assert Cubic(0.5, 0.95, 0.1, 0.6)(Clock(350, total_steps=1000)) == pytest.approx(0.95 - 0.45 * 0.125)


# --- the sparsify algorithm: criteria read the weights saved at set-up ---------------------------
def test_init_criteria_use_weights_saved_at_setup():
    model = mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    alg = sparse.Sparsify(0.5, criteria="movement", schedule="one_shot", start=0.5, context="local")
    engine = sparse.Sparsifier(model, opt, alg, total_steps=10, hook=False)
    assert all(torch.equal(alg.init_weights[k], w0[k]) for k in alg.init_weights)
    x, y = batch()
    changed = []

    def after(i):
        engine.set_clock(i + 1, (i + 1) / 10)
        before = {sp.name: sp.param.detach().clone() for sp in engine.groups[0].params}
        if engine.step():
            changed.append((i, before))

    train_steps(model, opt, 10, x, y, after_step=after)
    assert [i for i, _ in changed] == [4]
    for sp in engine.groups[0].params:
        moved = (changed[0][1][sp.name] - w0[sp.name]).abs()
        keep = sp.mask
        assert int(keep.sum()) == round(0.5 * keep.numel())
        assert moved[~keep].max() <= moved[keep].min()
