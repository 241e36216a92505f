"""The seed's public API: sparsify_model and its spellings, SparseHandle, the optimizer wrapper."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse import DynamicSparseTrainingOptimizerWrapper as Wrapper
from helpers import ConvNet, batch, mlp

PRESETS = {"set": fs.SET_presets, "snfs": fs.SNFS_presets, "rigl": fs.RigL_presets}


def _ce_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _masked_nonzero(model):
    return sum(int((sp.param[~sp.mask] != 0).sum()) for sp in fs.sparse_params(model))


def _masks(model):
    return [sp.mask.clone() for sp in fs.sparse_params(model)]


# --- sparsify_model ---------------------------------------------------------------------------

def test_sparsify_model_as_documented_keeps_weights_sparse_under_adam():
    torch.manual_seed(0)
    model = ConvNet()
    sparse_hooks = fs.sparsify_model(model, model_sparsity=0.9, sparse_f=fs.erdos_renyi_sparsity)
    assert isinstance(sparse_hooks, fs.SparseHandle) and len(sparse_hooks) == 2
    assert len(list(sparse_hooks)) == 2
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(3):
        _ce_step(model, opt, x, y)
        assert _masked_nonzero(model) == 0
    assert {k for k in model.state_dict() if k.endswith("_mask")} == {"conv.weight_mask", "fc.weight_mask"}


def test_sparsify_model_exact_counts_uniform():
    model = mlp()
    fs.sparsify_model(model, 0.7)
    # round(0.3 * 128) = 38, round(0.3 * 192) = 58 (57.6), round(0.3 * 48) = 14 (14.4)
    assert [int(sp.mask.sum()) for sp in fs.sparse_params(model)] == [38, 58, 14]


def test_sparse_handle_remove_stops_enforcement_masks_stay():
    torch.manual_seed(0)
    model = mlp()
    handle = fs.sparsify_model(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    _ce_step(model, opt, x, y)
    assert _masked_nonzero(model) == 0
    masks = _masks(model)
    handle.remove()
    assert len(handle) == 0
    _ce_step(model, opt, x, y)
    assert _masked_nonzero(model) > 0
    sd = model.state_dict()
    for sp, m in zip(fs.sparse_params(model), masks):
        assert torch.equal(sd[sp.mask_name], m)
    handle.remove()  # twice is harmless


def test_handle_masks_before_forward_after_manual_edit():
    model = mlp()
    fs.sparsify_model(model, 0.5)
    with torch.no_grad():
        model[0].weight.fill_(1.0)   # the user writes the weights directly: dense now
    x, _ = batch()
    model(x)                          # the forward pre-hook re-applies the masks
    assert int((model[0].weight != 0).sum()) == 64


def test_handle_enforces_for_optimizer_without_post_hook_registration():
    # an optimizer step that is not a torch one (e.g. a hand-written update): masks return at the next forward
    model = mlp()
    fs.sparsify_model(model, 0.5)
    x, y = batch()
    model(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert _masked_nonzero(model) > 0
    model(x)
    assert _masked_nonzero(model) == 0


def test_enforce_masks_false_attaches_without_enforcing():
    torch.manual_seed(0)
    model = mlp()
    handle = fs.sparsify_model(model, 0.8, enforce_masks=False)
    assert len(handle) == 0
    assert int(model[0].weight_mask.sum()) == 26  # round(0.2 * 128) = 25.6 -> 26
    assert _masked_nonzero(model) == 0            # attach zeroes the masked weights once
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _ce_step(model, opt, *batch())
    assert _masked_nonzero(model) > 0


def test_seed_spellings_are_equivalent():
    def build(**kw):
        torch.manual_seed(0)
        model = mlp()
        handle = fs.sparsify_model(model, 0.75, **kw)
        return model, handle

    ref, _ = build(sparse_f=fs.first_layer_dense_uniform)
    assert bool(ref[0].weight_mask.all())
    for kw in ({"sparse_init_f": fs.first_layer_dense_uniform}, {"sparsify_method": fs.first_layer_dense_uniform},
               {"sparse_f": "first_layer_dense"}):
        model, _ = build(**kw)
        assert all(torch.equal(a, b) for a, b in zip(_masks(model), _masks(ref))), kw
    _, h1 = build(enforce_mask=False)
    _, h2 = build(enforce_masks=False)
    assert len(h1) == len(h2) == 0
    # the same value under two spellings is accepted
    _, h3 = build(enforce_masks=True, enforce_mask=True)
    assert len(h3) == 2
    model, _ = build(sparse_f=fs.erdos_renyi_sparsity, sparse_init_f=fs.erdos_renyi_sparsity)
    assert int(model[0].weight_mask.sum()) != 128


@pytest.mark.parametrize("kw", [
    {"sparse_f": fs.erdos_renyi_sparsity, "sparse_init_f": fs.uniform_sparsity},
    {"sparse_f": "erk", "sparsify_method": "uniform"},
    {"sparse_init_f": fs.erdos_renyi_sparsity, "sparsify_method": fs.first_layer_dense_uniform},
    {"enforce_masks": True, "enforce_mask": False},
])
def test_conflicting_spellings_raise_before_any_change(kw):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="spellings"):
        fs.sparsify_model(model, 0.5, **kw)
    assert fs.sparse_params(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_methods_through_sparsify_model():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.8, 0.3, 0.0], [-0.5, 0.2, 0.0, 0.7]]))
    w = lin.weight.detach().clone()
    fs.sparsify_model(lin, 0.5, init_method="topk")
    assert lin.weight_mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    with torch.no_grad():
        lin.weight.copy_(w)
    fs.sparsify_model(lin, 0.5, init_method="from_zeros")
    assert lin.weight_mask.tolist() == [[True, True, True, False], [True, True, False, True]]
    lin2 = nn.Linear(10, 10)
    fs.sparsify_model(lin2, 0.37, init_method="random", seed=3)
    assert int(lin2.weight_mask.sum()) == 63     # round(0.63 * 100)


def test_sparsify_model_seed_controls_random_masks():
    masks = []
    for seed in (0, 0, 1):
        model = mlp()
        fs.sparsify_model(model, 0.5, seed=seed)
        masks.append(model[2].weight_mask.clone())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_sparsify_model_twice_replaces_masks_and_handle():
    model = mlp()
    h1 = fs.sparsify_model(model, 0.5)
    buf = model[0].weight_mask
    h2 = fs.sparsify_model(model, 0.9, enforce_masks=True)
    assert model[0].weight_mask is buf and int(buf.sum()) == 13   # round(0.1 * 128) = 12.8
    assert len(h1) == 0 and len(h2) == 2


def test_include_exclude_through_sparsify_model():
    model = mlp()
    fs.sparsify_model(model, 0.5, include="*.weight", exclude="4.*")
    assert [sp.name for sp in fs.sparse_params(model)] == ["0.weight", "2.weight"]


# --- DynamicSparseTrainingOptimizerWrapper ------------------------------------------------------

def test_presets_are_the_seed_dicts():
    for name, grow in (("set", fs.random_score), ("snfs", fs.gradient_momentum), ("rigl", fs.gradient_magnitude)):
        p = PRESETS[name]
        assert p["keep_score_f"] is fs.weight_magnitude and p["grow_score_f"] is grow
        assert p["initial_drop_grow_pct"] == 0.3 and p["stop_pct"] == 0.75
    # the seed's presets keep every layer's count; SNFS's redistribution is one key away
    assert fs.SET_presets["redistribution"] == fs.SNFS_presets["redistribution"] == "none"
    assert fs.RigL_presets["redistribution"] == "none"
    assert fs.get_algorithm("snfs")().redistribution == "momentum"


def _wrapped(preset, k, sparsity=0.5, **over):
    torch.manual_seed(0)
    model = mlp()
    fs.sparsify_model(model, sparsity)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapper = Wrapper(model, opt, **{**PRESETS[preset], **over}, batches_per_update=k)
    return model, opt, wrapper


def _wrapped_step(model, wrapper, step, pct, x, y):
    wrapper.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    wrapper.step(step, pct)


@pytest.mark.parametrize("preset", ["set", "snfs", "rigl"])
def test_wrapper_updates_exactly_on_schedule(preset):
    model, opt, wrapper = _wrapped(preset, k=4)
    x, y = batch()
    total = sum(int(m.sum()) for m in _masks(model))
    n = 40
    changed_at = []
    for step in range(n):
        before = _masks(model)
        _wrapped_step(model, wrapper, step, step / n, x, y)
        if any(not torch.equal(a, b) for a, b in zip(before, _masks(model))):
            changed_at.append(step)
        assert _masked_nonzero(model) == 0
        assert sum(int(m.sum()) for m in _masks(model)) == total
    # step % 4 == 0, step > 0, pct = step / 40 < 0.75 (step 28 is the last; 32 / 40 = 0.8)
    expected = [4, 8, 12, 16, 20, 24, 28]
    assert [r["step"] for r in wrapper.sparsifier.history] == expected
    assert set(changed_at) <= set(expected) and changed_at[:3] == [4, 8, 12]
    assert wrapper.sparsifier.step_count == n


def _prefer_inactive(model):
    """A grow score that prefers positions the current mask has off: a dropped weight never
    grows back, so the number of changed positions equals the number dropped."""
    masks = {id(sp.param): sp.mask for sp in fs.sparse_params(model)}
    return lambda param, opt=None: (~masks[id(param)]).float()


@pytest.mark.parametrize("preset", ["set", "snfs", "rigl"])
def test_wrapper_drop_fraction_is_cosine_of_pct(preset):
    model, opt, wrapper = _wrapped(preset, k=4)
    wrapper.sparsifier.groups[0].algorithm.grow_score = _prefer_inactive(model)
    x, y = batch()
    # active per layer at 0.5: 64, 96, 24. f = 0.3 / 2 * (1 + cos(pi * pct / 0.75)):
    # pct 0    -> f = 0.3:   floor(19.2) + floor(28.8) + floor(7.2) = 19 + 28 + 7 = 54
    # pct 0.25 -> f = 0.225: floor(14.4) + floor(21.6) + floor(5.4) = 14 + 21 + 5 = 40
    # pct 0.5  -> f = 0.075: floor(4.8) + floor(7.2) + floor(1.8)   = 4 + 7 + 1   = 12
    for step, pct, dropped in ((4, 0.0, 54), (8, 0.25, 40), (12, 0.5, 12)):
        for s in range(step - 3, step):
            _wrapped_step(model, wrapper, s, pct, x, y)
        _wrapped_step(model, wrapper, step, pct, x, y)
        rec = wrapper.sparsifier.history[-1]
        assert rec["step"] == step and rec["changed"] == dropped and rec["active"] == 184
    if preset != "snfs":
        assert [int(m.sum()) for m in _masks(model)] == [64, 96, 24]


def test_wrapper_default_batches_per_update_is_100():
    torch.manual_seed(0)
    model = mlp()
    fs.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapper = Wrapper(model, opt, **fs.RigL_presets)
    x, y = batch()
    for step in (50, 99, 100):
        _wrapped_step(model, wrapper, step, 0.1, x, y)
    assert [r["step"] for r in wrapper.sparsifier.history] == [100]


def test_wrapper_requires_masks_first():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sparsify_model"):
        Wrapper(model, opt, **fs.RigL_presets)


def test_wrapper_sparse_modules_limits_updates_but_all_masks_stay_enforced():
    torch.manual_seed(0)
    model = mlp()
    fs.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = Wrapper(model, opt, sparse_modules=[model[0]], **fs.RigL_presets, batches_per_update=2)
    assert [r["name"] for r in wrapper.sparsifier.report()] == ["0.weight"]
    before = _masks(model)
    x, y = batch()
    for step in range(7):
        _wrapped_step(model, wrapper, step, step / 20, x, y)
        assert _masked_nonzero(model) == 0  # the layers outside sparse_modules stay sparse too
    after = _masks(model)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])


def test_wrapper_passthroughs_state_and_remove():
    model, opt, wrapper = _wrapped("set", k=2)
    assert wrapper.param_groups is opt.param_groups
    x, y = batch()
    for step in range(3):
        _wrapped_step(model, wrapper, step, step / 10, x, y)
    assert all(p.grad is not None for p in model.parameters())
    wrapper.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    state = wrapper.state_dict()
    assert state["sparsifier"]["step_count"] == 3 and "state" in state["optimizer"]
    model2, opt2, wrapper2 = _wrapped("set", k=2)
    wrapper2.load_state_dict(state)
    assert wrapper2.sparsifier.step_count == 3
    assert wrapper2.sparsifier.history == wrapper.sparsifier.history
    wrapper.remove()
    _wrapped_step(model, wrapper, 4, 0.4, x, y)
    assert wrapper.sparsifier.step_count == 3


def test_wrapper_resume_matches_uninterrupted_run():
    x, y = batch()

    def run(model, wrapper, steps):
        for step in steps:
            _wrapped_step(model, wrapper, step, step / 20, x, y)

    ref_model, _, ref_wrapper = _wrapped("set", k=3)
    run(ref_model, ref_wrapper, range(12))
    model, _, wrapper = _wrapped("set", k=3)
    run(model, wrapper, range(5))
    ckpt = copy.deepcopy({"model": model.state_dict(), "wrapper": wrapper.state_dict()})
    model2, _, wrapper2 = _wrapped("set", k=3)
    model2.load_state_dict(ckpt["model"])
    wrapper2.load_state_dict(ckpt["wrapper"])
    run(model2, wrapper2, range(5, 12))
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert wrapper2.sparsifier.history == ref_wrapper.sparsifier.history
    assert [r["step"] for r in ref_wrapper.sparsifier.history] == [3, 6, 9]  # pct 9/20 < 0.75
