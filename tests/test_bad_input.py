"""Invariant 8: bad input fails early and clearly, before any state is changed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse.core.schedules import Constant, UpdateSchedule
from helpers import ConvNet, batch, mlp


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    sd = model.state_dict()
    assert sd.keys() == snap.keys(), "buffers were added or removed"
    for k, v in sd.items():
        assert torch.equal(v, snap[k]), k


def _every_step(cls=fs.DST, **kw):
    return cls(sparsity=0.5, drop_fraction=Constant(0.5), update=UpdateSchedule(freq=1), **kw)


# --- sparsity outside [0, 1) -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5, float("inf")])
def test_bad_sparsity_sparsify_model(bad):
    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fs.sparsify_model(model, bad)
    _assert_untouched(model, snap)
    assert fs.sparse_params(model) == []


@pytest.mark.parametrize("cls", [fs.Static, fs.SET, fs.SNFS, fs.RigL])
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_bad_sparsity_algorithms(cls, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        cls(sparsity=bad)


def test_non_numeric_sparsity():
    with pytest.raises(TypeError, match="number"):
        fs.RigL(sparsity="high")
    with pytest.raises(TypeError, match="number"):
        fs.sparsify_model(mlp(), None)


# --- distributions -----------------------------------------------------------------------------

BAD_DISTRIBUTIONS = {
    "too_few": lambda params, s: [s] * (len(params) - 1),
    "too_many": lambda params, s: [s] * (len(params) + 1),
    "above_one": lambda params, s: [s] * (len(params) - 1) + [1.2],
    "negative": lambda params, s: [-0.1] + [s] * (len(params) - 1),
    "nan": lambda params, s: [float("nan")] * len(params),
    "not_a_number": lambda params, s: ["dense"] * len(params),
}


@pytest.mark.parametrize("name", sorted(BAD_DISTRIBUTIONS))
def test_bad_distribution_through_sparsify_model(name):
    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="distribution"):
        fs.sparsify_model(model, 0.5, sparse_f=BAD_DISTRIBUTIONS[name])
    _assert_untouched(model, snap)


@pytest.mark.parametrize("name", sorted(BAD_DISTRIBUTIONS))
def test_bad_distribution_through_sparsifier(name):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="distribution"):
        fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5, distribution=BAD_DISTRIBUTIONS[name]))
    _assert_untouched(model, snap)
    assert not opt._optimizer_step_post_hooks


def test_unknown_distribution_name_lists_valid_names():
    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="unknown distribution 'erkk'.*'erk'.*'uniform'"):
        fs.sparsify_model(model, 0.5, sparse_f="erkk")
    with pytest.raises(ValueError, match="unknown distribution"):
        fs.Sparsifier(model, None, fs.SET(sparsity=0.5, distribution="gaussian"))
    _assert_untouched(model, snap)
    with pytest.raises(TypeError, match="distribution"):
        fs.Static(sparsity=0.5, distribution=3)


# --- names -------------------------------------------------------------------------------------

def test_unknown_algorithm_name_lists_valid_names():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        fs.Sparsifier(model, opt, "rigll")
    msg = str(err.value)
    assert "unknown algorithm 'rigll'" in msg and "did you mean 'rigl'" in msg
    for name in ("rigl", "set", "snfs", "static"):
        assert repr(name) in msg
    _assert_untouched(model, snap)
    assert not opt._optimizer_step_post_hooks
    with pytest.raises(ValueError, match="valid names"):
        fs.create("magic", sparsity=0.5)
    with pytest.raises(TypeError, match="SparsityAlgorithm"):
        fs.Sparsifier(model, opt, 42)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("kw", [{"grow_score": "grad"}, {"keep_score": "size"}])
def test_unknown_score_name_lists_valid_names(kw):
    with pytest.raises(ValueError, match=r"unknown (grow|keep) score .*valid names.*'gradient'.*'magnitude'"):
        fs.RigL(sparsity=0.5, **kw)


def test_other_bad_algorithm_options():
    with pytest.raises(ValueError, match="init_method"):
        fs.RigL(sparsity=0.5, init_method="xavier")
    with pytest.raises(ValueError, match="redistribution"):
        fs.SNFS(sparsity=0.5, redistribution="gradient")
    with pytest.raises(ValueError, match="drop_fraction"):
        fs.SET(sparsity=0.5, drop_fraction=1.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        fs.SET(sparsity=0.5, drop_fraction=-0.1)


# --- filters and models ------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"include": "encoder.*"}, {"include": ["*.bias"]}, {"exclude": "*"}])
def test_filter_matching_nothing(kw):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="matches no parameter"):
        fs.sparsify_model(model, 0.5, **kw)
    with pytest.raises(ValueError, match="matches no parameter"):
        fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5, **kw))
    _assert_untouched(model, snap)
    assert not opt._optimizer_step_post_hooks


def test_model_without_sparsifiable_parameters():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no sparsifiable parameter.*1.weight"):
        fs.sparsify_model(model, 0.5)
    with pytest.raises(ValueError, match="no sparsifiable parameter"):
        fs.Sparsifier(model, None, "rigl")
    _assert_untouched(model, snap)


def test_overlapping_algorithms_fail_before_attaching():
    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="selected by two algorithms"):
        fs.Sparsifier(model, None, [fs.RigL(sparsity=0.5, include="*.weight"), fs.Static(sparsity=0.9, include="2.*")])
    _assert_untouched(model, snap)


def test_hook_with_non_torch_optimizer_fails_before_attaching():
    class FastaiLikeOptimizer:
        state: dict = {}

    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fs.Sparsifier(model, FastaiLikeOptimizer(), "set", hook=True)
    _assert_untouched(model, snap)
    # without the hook the same optimizer is fine (the caller drives sparsifier.step())
    fs.Sparsifier(model, FastaiLikeOptimizer(), "set", total_steps=100)
    assert len(fs.sparse_params(model)) == 3


# --- score functions at an update step ----------------------------------------------------------

BAD_SCORES = {
    "wrong_shape": (lambda param, opt: torch.ones(3), "shape"),
    "transposed": (lambda param, opt: torch.ones(param.shape[::-1]) if param.dim() == 2 and
                   param.shape[0] != param.shape[1] else torch.ones(1), "shape"),
    "not_a_tensor": (lambda param, opt: [0.0] * param.numel(), "list"),
    "nan": (lambda param, opt: torch.full(param.shape, float("nan")), "NaN"),
    "some_nan": (lambda param, opt: torch.where(torch.arange(param.numel()).view(param.shape) == 3,
                                                float("nan"), 1.0), "NaN"),
}


@pytest.mark.parametrize("which", ["keep_score", "grow_score"])
@pytest.mark.parametrize("name", sorted(BAD_SCORES))
def test_bad_score_function_at_update_leaves_masks_unchanged(which, name):
    fn, match = BAD_SCORES[name]
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = fs.Sparsifier(model, opt, _every_step(**{which: fn}))
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    x, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))
    assert sparsifier.history == []
    # the weights are still exactly sparse (the masks were applied before the failing update)
    assert all((sp.param[~sp.mask] == 0).all() for sp in fs.sparse_params(model))


def test_bad_score_through_wrapper_leaves_masks_unchanged():
    model = mlp()
    fs.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = fs.DynamicSparseTrainingOptimizerWrapper(
        model, opt, **{**fs.RigL_presets, "grow_score_f": BAD_SCORES["wrong_shape"][0]}, batches_per_update=2)
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    x, y = batch()
    wrapper.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    wrapper.step(1, 0.01)  # no update at step 1
    wrapper.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="shape"):
        wrapper.step(2, 0.02)
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))


def test_gradient_score_without_gradient_is_a_clear_error():
    model = mlp()
    sparsifier = fs.Sparsifier(model, None, _every_step(fs.RigL))
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    with pytest.raises(RuntimeError, match="before zero_grad"):
        sparsifier.step()
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))


# --- the optimizer wrapper's arguments ----------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, -100, 1.5, 2.0, "10", True])
def test_bad_batches_per_update(bad):
    model = mlp()
    fs.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="batches_per_update"):
        fs.DynamicSparseTrainingOptimizerWrapper(model, opt, **fs.SET_presets, batches_per_update=bad)
    _assert_untouched(model, snap)
    assert not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_bad_stop_pct(bad):
    model = mlp()
    fs.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="stop_pct"):
        fs.DynamicSparseTrainingOptimizerWrapper(model, opt, **{**fs.RigL_presets, "stop_pct": bad})
    assert not opt._optimizer_step_post_hooks


# --- checkpoints that do not fit ----------------------------------------------------------------

def test_sparsifier_state_with_other_shapes_is_rejected():
    small = mlp(sizes=(8, 10, 12, 4))
    state = fs.Sparsifier(small, None, fs.Static(sparsity=0.5)).state_dict()
    model = mlp()
    sparsifier = fs.Sparsifier(model, None, _every_step(fs.SET))
    model.zero_grad()
    sparsifier.step()
    sparsifier.step()
    before = (sparsifier.step_count, list(sparsifier.history), sparsifier.seed)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="does not fit.*0.weight"):
        sparsifier.load_state_dict(state)
    assert (sparsifier.step_count, sparsifier.history, sparsifier.seed) == before
    _assert_untouched(model, snap)


def test_sparsifier_state_with_other_names_or_groups_is_rejected():
    conv_state = fs.Sparsifier(ConvNet(), None, fs.Static(sparsity=0.5)).state_dict()
    model = mlp()
    sparsifier = fs.Sparsifier(model, None, fs.Static(sparsity=0.5))
    with pytest.raises(ValueError, match="does not fit"):
        sparsifier.load_state_dict(conv_state)
    other = mlp()
    two_groups = fs.Sparsifier(other, None, [fs.Static(sparsity=0.5, include="0.*"),
                                             fs.Static(sparsity=0.5, include=["2.*", "4.*"])]).state_dict()
    with pytest.raises(ValueError, match="algorithm groups"):
        sparsifier.load_state_dict(two_groups)
    assert sparsifier.step_count == 0


def test_fraction_schedule_without_total_steps_fails_clearly_and_changes_no_mask():
    # a stop given as a fraction of training needs total_steps (or the wrapper's pct_train)
    # (refused when the engine is built, not at the first update deep inside training)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"RigL.* reads its schedules in fractions of training: pass total_steps"):
        fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5, update=UpdateSchedule(freq=1, stop=0.75)))
    _assert_untouched(model, snap)
    with pytest.raises(ValueError, match="pass total_steps"):   # no stop: the drop fraction decays over all of training
        fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5, update=UpdateSchedule(freq=1)))
    _assert_untouched(model, snap)
    fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5, update=UpdateSchedule(freq=1, stop=300)))   # every point in steps
