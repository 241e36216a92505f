"""fasterai's SparsifyCallback, option by option (the table in docs/coming-from/fasterai.md), and
the blog's ResNet-18 runs as example configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.experiments.config import load_config, parse_config
from fastsparse.core.scores import CRITERIA, criterion_scores
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.core.schedules import ProgressSchedule
from fastsparse.core.structured import valid_granularities
from fastsparse.experiments.runner import prepare, run

from helpers import ConvNet, mlp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("fasterai_*.yaml"))
BLOG_RUNS = ["fasterai_resnet18_dense", "fasterai_resnet18_lth", "fasterai_resnet18_lth_rewind",
             "fasterai_resnet18_one_shot", "fasterai_resnet18_iterative"]
TINY = ["data={name: synthetic, shape: [3, 32, 32], classes: 10, n_train: 16, n_test: 8, batch_size: 8}",
        "model.width=8", "epochs=4"]


def _drive(sched, steps: int, model, x, y, opt, epochs: int = 1):
    per = steps // epochs
    for e in range(epochs):
        sched.before_epoch(e)
        for i in range(per):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step((e * per + i + 1) / steps)


def _data(n=16, features=8, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


# --- the schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [("sched_oneshot", "one_shot"), ("sched_iterative", "iterative"),
                                        ("sched_agp", "agp"), ("sched_onecycle", "one_cycle"),
                                        ("sched_cos", "cos"), ("sched_lin", "lin"), ("sched_dsd", "dsd")])
def test_fasterai_schedule_function_names_are_our_schedules(name, kind):
    assert ProgressSchedule(name) == ProgressSchedule(kind)


def test_schedule_values_worked_by_hand():
    # one_shot: 0 before its default start 0.5, 1 from there; iterative: 3 steps after 0.2
    one_shot, iterative = ProgressSchedule("one_shot"), ProgressSchedule("iterative")
    assert [one_shot(p) for p in (0.49, 0.5, 0.9)] == [0.0, 1.0, 1.0]
    assert [iterative(p) for p in (0.2, 0.3, 0.5, 0.8)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    # agp at 0.5 with start 0.2: x = 0.375, 1 - 0.625^3
    assert ProgressSchedule("agp")(0.5) == pytest.approx(1 - 0.625 ** 3)
    # one_cycle (alpha 14, beta 6) reaches 1 at x = 1; lin and cos at x = 0.5
    assert ProgressSchedule("one_cycle")(1.0) == pytest.approx(1.0)
    assert ProgressSchedule("lin")(0.5) == pytest.approx(0.5)
    assert ProgressSchedule("cos")(0.5) == pytest.approx(0.5)
    assert ProgressSchedule("dsd")(0.5) == pytest.approx(1.0) and ProgressSchedule("dsd")(1.0) == pytest.approx(0.0)


def test_schedule_start_pct_end_pct_start_val_end_val():
    # fasterai Schedule(sched_lin, start_pct=0.2, end_pct=0.6, start_val=0.25, end_val=1)
    s = ProgressSchedule("lin", start=0.2, end=0.6, start_val=0.25, end_val=1.0)
    assert s(0.1) == 0.25 and s(0.4) == pytest.approx(0.25 + 0.75 * 0.5) and s(0.9) == 1.0
    with pytest.raises(ValueError, match="start_val"):
        ProgressSchedule("lin", start_val=1.5)
    with pytest.raises(ValueError, match="valid names"):
        ProgressSchedule("sched_nope")


def test_start_sparsity_end_sparsity_start_epoch_end_epoch_in_the_scheduler():
    # fasterai's older SparsifyCallback(end_sparsity=0.8, start_sparsity=0.4, sched_func=sched_lin)
    torch.manual_seed(0)
    model = mlp((8, 40, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.8, schedule="lin", start=0.5, end=1.0,
                                     start_sparsity=0.4)
    x, y = _data()
    _drive(sched, 4, model, x, y, opt)
    assert sched.events[0]["progress"] == 0.25                 # start_val applies from the start
    assert sched.events[0]["sparsity"] == pytest.approx(0.4, abs=0.01)
    assert sched.sparsity() == pytest.approx(0.8, abs=0.01)   # end_sparsity at the end
    with pytest.raises(ValueError, match="start_sparsity"):
        sparse.SparsifyScheduler(mlp(), sparsity=0.5, start_sparsity=0.7)


# --- granularities --------------------------------------------------------------------------------
FASTERAI_CONV2D = {"weight": (), "shared_weight": (0,), "channel": (1,), "column": (2,), "row": (3,),
                   "kernel": (2, 3), "filter": (1, 2, 3), "shared_channel": (0, 1), "shared_column": (0, 2),
                   "shared_row": (0, 3), "vertical_slice": (1, 2), "horizontal_slice": (1, 3),
                   "shared_vertical_slice": (0, 1, 2), "shared_horizontal_slice": (0, 1, 3),
                   "shared_kernel": (0, 2, 3), "layer": (0, 1, 2, 3)}


def test_every_fasterai_conv2d_and_linear_granularity_spans_the_same_dims():
    # fasterai's dims count a leading batch axis: its (2, 3, 4) 'filter' is our (1, 2, 3)
    names = ["weight", "shared_weight", "channel", "column", "row", "kernel", "filter", "shared_channel",
             "shared_column", "shared_row", "vertical_slice", "horizontal_slice", "shared_vertical_slice",
             "shared_horizontal_slice", "shared_kernel", "layer"]          # fasterai's Conv2d names
    assert sorted(names) == sorted(FASTERAI_CONV2D)
    conv = valid_granularities(nn.Conv2d(2, 3, 3), (3, 2, 3, 3))
    assert {k: conv[k] for k in names} == FASTERAI_CONV2D
    assert valid_granularities(nn.Linear(4, 3), (3, 4)) == {"weight": (), "row": (1,), "column": (0,),
                                                             "layer": (0, 1)}


@pytest.mark.parametrize("granularity", ["shared_weight", "shared_kernel", "vertical_slice", "filter", "kernel"])
def test_pruning_at_a_granularity_keeps_whole_groups(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    alg = sparse.Sparsify(0.5, granularity, "local", "large_final", "one_shot", start=0.0)
    engine = sparse.Sparsifier(model, None, alg, total_steps=2, hook=False)
    engine.set_clock(1, 0.5)
    assert engine.step()
    mask = model[0].weight_mask
    dims = FASTERAI_CONV2D[granularity]
    per_group = mask.float().mean(dim=dims, keepdim=True) if dims else mask.float()
    assert set(per_group.unique().tolist()) <= {0.0, 1.0}          # all or nothing per group
    groups = per_group.numel()
    assert int(per_group.sum()) == n_keep(groups, 0.5)           # exact count of groups


# --- context, criteria ------------------------------------------------------------------------------
def test_context_local_and_global_and_method_spelling():
    torch.manual_seed(0)
    model = mlp((8, 40, 20, 4))
    with torch.no_grad():
        model[2].weight.mul_(10)                       # global: the big layer keeps more
    engine = sparse.Sparsifier(model, None, sparse.Sparsify(0.5, "weight", "global", "large_final", "one_shot",
                                                              start=0.0), total_steps=1, hook=False)
    engine.set_clock(1, 1.0)
    engine.step()
    dens = [float(sp.mask.float().mean()) for sp in sparse_params(model)]
    assert dens[1] > 0.5 > dens[0]
    assert sum(sp.mask.sum() for sp in sparse_params(model)) == sum(round(0.5 * sp.mask.numel())
                                                                   for sp in sparse_params(model))
    with pytest.raises(ValueError, match="local"):
        sparse.Sparsify(0.5, context="globl")


FASTERAI_CRITERIA = ["random", "large_final", "small_final", "squared_final", "large_init", "small_init",
                     "large_init_large_final", "small_init_small_final", "magnitude_increase", "movement",
                     "movmag", "updating_magnitude_increase", "updating_movement", "updating_movmag", "grad_crit"]


def test_every_fasterai_criterion_worked_by_hand():
    w, w0 = torch.tensor([-3.0, 1.0, 2.0]), torch.tensor([1.0, -2.0, 2.0])
    g = torch.tensor([0.5, 1.0, -1.0])
    expected = {
        "large_final": [3, 1, 2], "small_final": [-3, -1, -2], "squared_final": [9, 1, 4],
        "large_init": [1, 2, 2], "small_init": [-1, -2, -2], "large_init_large_final": [1, 1, 2],
        "small_init_small_final": [-3, -2, -2], "magnitude_increase": [2, -1, 0], "movement": [4, 3, 0],
        "movmag": [12, 3, 0], "updating_magnitude_increase": [2, -1, 0], "updating_movement": [4, 3, 0],
        "updating_movmag": [12, 3, 0],
    }
    for name, want in expected.items():
        assert criterion_scores(name, w, w0).tolist() == want, name
    assert criterion_scores("grad_crit", w, grad=g).tolist() == [2.25, 1.0, 4.0]     # (w·g)²
    r = criterion_scores("random", w, generator=torch.Generator().manual_seed(0))
    assert r.shape == w.shape and ((0 <= r) & (r < 1)).all()
    assert set(FASTERAI_CRITERIA) <= set(CRITERIA)
    with pytest.raises(ValueError, match="valid names"):
        criterion_scores("wandb", w)


def test_updating_criteria_compare_with_the_previous_pruning_event():
    torch.manual_seed(0)
    model = mlp((8, 16, 4))
    alg = sparse.Sparsify(0.5, "weight", "local", "updating_movement", "iterative", start=0.0, n_steps=2)
    engine = sparse.Sparsifier(model, None, alg, total_steps=4, hook=False)
    engine.set_clock(1, 0.25)
    engine.step()
    w = model[0].weight.detach().clone()
    assert torch.equal(alg.init_weights["0.weight"], w)      # the reference moved to this event's weights


# --- lth, rewind_epoch, reset_end, save_tickets ----------------------------------------------------
def test_lth_rewind_epoch_reset_end_save_tickets(tmp_path):
    torch.manual_seed(0)
    model = mlp((8, 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.5, context="global", schedule="iterative",
                                     start=0.5, n_steps=2, lth=True, rewind_epoch=1, reset_end=True,
                                     save_tickets=tmp_path)
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step(0.125)                                         # epoch 0
    sched.before_epoch(1)
    at_rewind = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2, 9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step(i / 8)
    sched.end()
    assert len(sched.events) == 2
    for sp in sparse_params(model):                          # reset_end: the ticket at its epoch-1 values
        assert torch.equal(sp.param, at_rewind[sp.name] * sp.mask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["winning_ticket_25.00.pth", "winning_ticket_50.00.pth"] and len(sched.tickets) == 3
    ticket = torch.load(tmp_path / "winning_ticket_50.00.pth")
    assert torch.equal(ticket["0.weight"], at_rewind["0.weight"] * model[0].weight_mask)


def test_lth_in_the_algorithm_rewinds_at_every_pruning_event():
    torch.manual_seed(0)
    model = mlp((8, 32, 4))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    alg = sparse.Sparsify(0.5, "weight", "global", "large_final", "one_shot", start=0.5, lth=True, rewind_at=0)
    sparse.Sparsifier(model, opt, alg, total_steps=4)
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()                                           # step 2 = progress 0.5: prune, then rewind
    for name, v in model.state_dict().items():
        if name.endswith("_mask"):
            continue
        mask = model.state_dict().get(name + "_mask")
        assert torch.equal(v, w0[name] * mask if mask is not None else w0[name]), name
    with pytest.raises(ValueError, match="rewind_at"):
        sparse.Sparsify(0.5, schedule="iterative", lth=True, rewind_at=0.5)


# --- model, layer_type, nm, round_to, per-layer sparsity ------------------------------------------
def test_layer_type_and_per_layer_sparsity_dict():
    model = ConvNet()
    sched = sparse.SparsifyScheduler(model, sparsity=0.5, layer_type=nn.Conv2d, schedule="one_shot")
    assert [sp.name for sp in sched.engine.groups[0].params] == ["conv.weight"]
    model = mlp((8, 40, 20, 4))
    sched = sparse.SparsifyScheduler(model, sparsity={"2": 0.25, "0": 0.5}, schedule="one_shot", start=0.0)
    sched.step(1.0)
    assert {sp.name: float(sp.mask.float().mean()) for sp in sched.engine.groups[0].params} == \
        {"0.weight": 0.5, "2.weight": 0.75}
    assert not hasattr(model[4], "weight_mask")               # a layer the dict leaves out stays dense
    with pytest.raises(ValueError, match="local"):
        sparse.SparsifyScheduler(mlp(), sparsity={"0": 0.5}, context="global")
    with pytest.raises(ValueError, match="no module"):
        sparse.SparsifyScheduler(mlp(), sparsity={"fc9": 0.5})
    with pytest.raises(TypeError, match="layer_type"):
        sparse.SparsifyScheduler(mlp(), layer_type="Conv2d")


def test_nm_is_two_of_every_four_and_round_to_rounds_kept_groups():
    model = mlp((8, 16, 4))
    sched = sparse.SparsifyScheduler(model, nm=True, schedule="one_shot", start=0.0)
    sched.step(1.0)
    w = model[0].weight_mask.view(16, 2, 4)
    assert (w.sum(-1) == 2).all()
    model = mlp((8, 10, 4))
    sched = sparse.SparsifyScheduler(model, sparsity=0.7, granularity="row", schedule="one_shot", start=0.0,
                                     round_to=4)
    sched.step(1.0)
    rows = model[0].weight_mask.any(1).sum()                 # 10 rows at 70%: 3 kept, rounded up to 4
    assert int(rows) == 4 and int(model[2].weight_mask.any(1).sum()) == 4
    with pytest.raises(ValueError, match="round_to"):
        sparse.Sparsify(0.5, context="global", round_to=4)


# --- the fastai callback ---------------------------------------------------------------------------
def test_sparsify_callback_takes_fasterai_arguments():
    from fastai.basics import DataLoaders, Learner

    x, y = _data(64)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=16)
    torch.manual_seed(0)
    body, other = mlp((8, 16, 4)), mlp((8, 16, 4))
    learn = Learner(dls, body, loss_func=nn.functional.cross_entropy)
    with pytest.warns(UserWarning, match="50%"):
        cb = sparse.SparsifyCallback(sparsity=50, granularity="weight", context="local", criteria="large_final",
                                     schedule="sched_lin", start_epoch=1, end_epoch=2, model=body,
                                     layer_type=nn.Linear, round_to=None, start_sparsity=0.0, save_tickets=False,
                                     nm=False)
    learn.fit(2, cbs=cb)
    assert cb.scheduler.sparsity() == pytest.approx(0.5, abs=0.01) and not hasattr(other[0], "weight_mask")


# --- the blog's runs as configs -------------------------------------------------------------------
def test_blog_examples_are_there():
    assert sorted(p.stem for p in EXAMPLES) == sorted(BLOG_RUNS)


@pytest.mark.parametrize("name", ["fasterai_resnet18_dense", "fasterai_resnet18_lth",
                                  "fasterai_resnet18_lth_rewind", "fasterai_resnet18_one_shot",
                                  "fasterai_resnet18_iterative"])
def test_fasterai_example_validates_and_dry_runs(name):
    path = ROOT / "examples" / f"{name}.yaml"
    cfg, notes = parse_config(load_config(path))
    assert notes == [] and cfg.model.name == "resnet18"
    exp = prepare(load_config(path, TINY[:1]), load_data=False)
    if name == "fasterai_resnet18_lth_rewind":                  # rewind_epoch=1 of 20 epochs
        assert exp.sparsifier.groups[0].algorithm.rewind_at == 0.05
    if cfg.sparsity is not None:
        (alg,) = [g.algorithm for g in exp.sparsifier.groups]
        assert alg.sparsity == 0.5 and alg.context == "global" and alg.criteria == "large_final"
        assert exp.plan.target_sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["fasterai_resnet18_dense", "fasterai_resnet18_lth",
                                  "fasterai_resnet18_lth_rewind", "fasterai_resnet18_one_shot",
                                  "fasterai_resnet18_iterative"])
def test_fasterai_example_runs_on_tiny_synthetic_data(name, tmp_path):
    path = ROOT / "examples" / f"{name}.yaml"
    summary = run(load_config(path, TINY), tmp_path, progress=False)
    sparse_ = parse_config(load_config(path))[0].sparsity is not None
    assert summary["sparsity"] == (pytest.approx(0.5, abs=0.01) if sparse_ else 0.0)
