"""The engine: exact zeros (invariant 2), determinism and resume (4), AMP (6), nothing outside
the filter touched (7), init methods, groups, state and removal."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fastsparse as fs
from fastsparse.core.schedules import Constant, UpdateSchedule
from helpers import layer_input, one_layer, AttnNet, ConvNet, batch, mlp

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
}
SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)


def _every_step(cls, sparsity=0.5, f=0.3, **kw):
    return cls(sparsity=sparsity, drop_fraction=Constant(f), update=UpdateSchedule(freq=1), **kw)


def _algorithm(name, s):
    if name == "static":
        return fs.Static(sparsity=s)
    return _every_step({"set": fs.SET, "rigl": fs.RigL, "snfs": fs.SNFS}[name], s, 0.3)


_one_layer, _input = one_layer, layer_input


def _assert_exactly_sparse(model):
    sd = model.state_dict()
    masks = [k for k in sd if k.endswith("_mask")]
    assert masks
    for k in masks:
        w = sd[k[: -len("_mask")]]
        assert (w[~sd[k]] == 0).all(), k


def _ce_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# --- invariant 2: exact zeros after every step; checkpoints between steps are sparse -----------

@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, s=st.floats(0.0, 1.0, exclude_max=True), opt_name=st.sampled_from(sorted(OPTIMIZERS)),
       alg=st.sampled_from(["static", "set", "rigl", "snfs"]), seed=st.integers(0, 10_000))
def test_exact_zeros_after_every_step_property(shape, s, opt_name, alg, seed):
    assume(round((1 - s) * math.prod(shape)) >= 1)   # a layer left empty is refused
    torch.manual_seed(seed)
    layer = _one_layer(shape)
    opt = OPTIMIZERS[opt_name](layer.parameters())
    fs.Sparsifier(layer, opt, _algorithm(alg, s), seed=seed)
    _assert_exactly_sparse(layer)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        out = layer(_input(shape, g))
        (out.pow(2).mean() + out.sum()).backward()
        _assert_exactly_sparse(layer)          # between backward and step
        opt.step()
        mask = layer.weight_mask
        assert (layer.weight[~mask] == 0).all()
        _assert_exactly_sparse(layer)          # a checkpoint right after the step


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_masked_weights_would_move_without_the_engine(opt_name):
    # the control for invariant 2: dense gradients do reach masked weights, so the zeros are the engine's work
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sparsifier = fs.Sparsifier(model, opt, fs.Static(sparsity=0.8))
    x, y = batch()
    _ce_step(model, opt, x, y)
    _assert_exactly_sparse(model)
    sparsifier.remove()
    _ce_step(model, opt, x, y)
    assert (model[0].weight[~model[0].weight_mask] != 0).any()


# --- invariant 4: determinism and resume -------------------------------------------------------

STEPS = 20  # updates every 3 steps before 0.8 * 20 = 16: at 3, 6, 9, 12, 15
RUN = 16


def _data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _build(alg_name, opt_name, init_seed=0):
    torch.manual_seed(init_seed)
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    cls = {"set": fs.SET, "rigl": fs.RigL, "snfs": fs.SNFS}[alg_name]
    alg = cls(sparsity=0.7, drop_fraction=0.3, update=UpdateSchedule(freq=3, stop=0.8))
    sparsifier = fs.Sparsifier(model, opt, alg, total_steps=STEPS, seed=5)
    return model, opt, sparsifier


def _run(model, opt, steps):
    for t in steps:
        _ce_step(model, opt, *_data(t))


def _assert_same_state(a_model, a_opt, b_model, b_opt):
    sa, sb = a_model.state_dict(), b_model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a_opt.state_dict()["state"], b_opt.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)


@pytest.mark.parametrize("alg_name", ["set", "rigl", "snfs"])
def test_same_seed_same_data_bit_identical(alg_name):
    m1, o1, s1 = _build(alg_name, "sgd")
    m2, o2, s2 = _build(alg_name, "sgd")
    _run(m1, o1, range(RUN))
    _run(m2, o2, range(RUN))
    _assert_same_state(m1, o1, m2, o2)
    assert s1.history == s2.history
    assert [r["step"] for r in s1.history] == [3, 6, 9, 12, 15]
    assert sum(r["changed"] for r in s1.history) > 0


def test_different_seed_gives_different_masks():
    m1, o1, _ = _build("set", "sgd")
    torch.manual_seed(0)
    m2 = mlp()
    fs.Sparsifier(m2, None, fs.SET(sparsity=0.7, update=UpdateSchedule(freq=3, stop=0.8)), total_steps=STEPS, seed=6)
    assert not torch.equal(m1[2].weight_mask, m2[2].weight_mask)


@pytest.mark.parametrize("alg_name,opt_name,cut", [
    ("set", "sgd", 7), ("rigl", "sgd", 7), ("set", "adam", 4), ("rigl", "adamw", 11), ("rigl", "adam", 8),
])
def test_resume_from_checkpoint_is_bit_identical(alg_name, opt_name, cut):
    ref_model, ref_opt, ref_sp = _build(alg_name, opt_name)
    _run(ref_model, ref_opt, range(RUN))

    model, opt, sp = _build(alg_name, opt_name)
    _run(model, opt, range(cut))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict()})
    masks_at_cut = {k: v for k, v in ckpt["model"].items() if k.endswith("_mask")}
    del model, opt, sp

    # a fresh process: another init, then everything loaded
    model2, opt2, sp2 = _build(alg_name, opt_name, init_seed=123)
    assert any(not torch.equal(model2.state_dict()[k], v) for k, v in masks_at_cut.items())
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sparsifier"])
    assert sp2.step_count == cut
    _run(model2, opt2, range(cut, RUN))

    _assert_same_state(ref_model, ref_opt, model2, opt2)
    assert sp2.history == ref_sp.history
    # masks did change after the cut, so the comparison covers updates made after resuming
    assert any(r["step"] > cut and r["changed"] > 0 for r in sp2.history)
    assert any(not torch.equal(model2.state_dict()[k], v) for k, v in masks_at_cut.items())


def test_resume_without_sparsifier_state_diverges():
    # the control: the clock lives in the sparsifier state; without it updates fall on other steps
    ref_model, ref_opt, ref_sp = _build("rigl", "sgd")
    _run(ref_model, ref_opt, range(RUN))
    model, opt, sp = _build("rigl", "sgd")
    _run(model, opt, range(7))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2, sp2 = _build("rigl", "sgd", init_seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _run(model2, opt2, range(7, RUN))
    assert sp2.history != ref_sp.history[-len(sp2.history):]
    assert any(not torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), model2.state_dict().values()))


# --- invariant 6: AMP, a skipped step never updates masks --------------------------------------

def _scaled_backward(model, opt, scaler, x, y, poison=False):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison:
        model[2].weight.grad[0, 0] = float("inf")


def test_grad_scaler_skipped_step_keeps_masks_and_clock():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.RigL, 0.7, 0.3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch()

    _scaled_backward(model, opt, scaler, x, y, poison=True)
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0  # the scaler did see the inf and skip
    assert sparsifier.step_count == 0 and sparsifier.history == []
    for sp, m in zip(fs.sparse_params(model), masks):
        assert torch.equal(sp.mask, m)
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)

    # the control: a finite step advances the clock and updates the masks
    _scaled_backward(model, opt, scaler, x, y)
    scaler.step(opt)
    scaler.update()
    assert sparsifier.step_count == 1 and len(sparsifier.history) == 1
    assert any(not torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))
    _assert_exactly_sparse(model)


def test_grad_scaler_overflow_without_poison_is_skipped():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.SET, 0.7, 0.3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # float32 gradients overflow
    x, y = batch()
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * 4).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 127
    assert sparsifier.step_count == 0 and sparsifier.history == []
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))


# --- invariant 7: nothing outside the filter is touched ---------------------------------------

def test_attention_projections_masked_everything_else_untouched():
    torch.manual_seed(0)
    model = AttnNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse_names = [sp.name for sp in fs.select_params(model)]
    assert sparse_names == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n in sparse_names], lr=0.01)
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.RigL, 0.8, 0.3))
    masks = sorted(n for n, _ in model.named_buffers() if n.endswith("_mask"))
    assert masks == sorted(n + "_mask" for n in sparse_names)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, y = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
        _ce_step(model, opt, tokens, y)
    assert len(sparsifier.history) == 3
    for n, p in model.named_parameters():
        if n in sparse_names:
            assert not torch.equal(p, before[n])
            assert int((p == 0).sum()) >= round(0.8 * p.numel())
        else:  # embedding, norm, every bias: bit for bit
            assert torch.equal(p, before[n]), n
            assert n + "_mask" not in dict(model.named_buffers())
    _assert_exactly_sparse(model)


def test_excluded_parameter_has_no_mask_and_updates_never_touch_it():
    torch.manual_seed(0)
    model = mlp()
    alg = _every_step(fs.RigL, 0.7, 0.5, exclude="2.*")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = fs.Sparsifier(model, None, alg)
    assert [sp.name for sp in fs.sparse_params(model)] == ["0.weight", "4.weight"]
    assert not hasattr(model[2], "weight_mask")
    x, y = batch()
    masks = [m.clone() for m in (model[0].weight_mask, model[4].weight_mask)]
    for _ in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert sparsifier.step()   # enforcement + an update, no optimizer step
    assert not torch.equal(model[0].weight_mask, masks[0])
    for n in ("0.bias", "2.weight", "2.bias", "4.bias"):
        assert torch.equal(dict(model.named_parameters())[n], before[n]), n


def test_excluded_parameter_keeps_no_zeros_under_training():
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    fs.Sparsifier(model, opt, _every_step(fs.SET, 0.9, 0.5, include=["0.weight", "4.weight"]))
    x, y = batch()
    for _ in range(4):
        _ce_step(model, opt, x, y)
    assert int((model[2].weight == 0).sum()) == 0 and int((model[2].bias == 0).sum()) == 0
    assert int((model[0].weight == 0).sum()) >= 115  # 128 - round(0.1 * 128) = 115 masked


def test_batchnorm_untouched_in_conv_model():
    torch.manual_seed(0)
    model = ConvNet()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    fs.Sparsifier(model, None, _every_step(fs.SET, 0.5, 0.3))
    after = model.state_dict()
    for n in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "conv.bias", "fc.bias"):
        assert torch.equal(after[n], before[n]), n
    assert not any(k.startswith("bn.") and k.endswith("_mask") for k in after)


# --- init methods, groups, existing masks -----------------------------------------------------

def _lin_arange():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.8, 0.3, 0.0], [-0.5, 0.2, 0.0, 0.7]]))
    return lin


def test_init_topk_keeps_largest_magnitudes():
    lin = _lin_arange()
    fs.Sparsifier(lin, None, fs.Static(sparsity=0.5, init_method="topk"))
    # |w| sorted: 0.8 (flat 1), 0.7 (7), 0.5 (4), 0.3 (2) kept
    assert lin.weight_mask.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_init_from_zeros_uses_existing_zeros():
    lin = _lin_arange()
    fs.Sparsifier(lin, None, fs.Static(sparsity=0.5, init_method="from_zeros"))
    assert lin.weight_mask.tolist() == [[True, True, True, False], [True, True, False, True]]


def test_init_random_exact_seeded_and_independent_of_global_rng():
    masks = []
    for seed, global_seed in ((1, 0), (1, 99), (2, 0)):
        torch.manual_seed(0)
        model = mlp()
        torch.manual_seed(global_seed)
        fs.Sparsifier(model, None, fs.Static(sparsity=0.75), seed=seed)
        masks.append(model[0].weight_mask.clone())
        assert int(model[0].weight_mask.sum()) == 32  # round(0.25 * 128)
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_two_algorithms_on_disjoint_parameters():
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    sparsifier = fs.Sparsifier(model, opt, [_every_step(fs.RigL, 0.5, 0.3, include="0.weight"),
                                            fs.Static(sparsity=0.9, include=["2.weight", "4.weight"])])
    static_masks = [model[2].weight_mask.clone(), model[4].weight_mask.clone()]
    rigl_mask = model[0].weight_mask.clone()
    assert int(rigl_mask.sum()) == 64 and int(static_masks[0].sum()) == 19 and int(static_masks[1].sum()) == 5
    x, y = batch()
    for _ in range(3):
        _ce_step(model, opt, x, y)
    assert not torch.equal(model[0].weight_mask, rigl_mask)
    assert torch.equal(model[2].weight_mask, static_masks[0]) and torch.equal(model[4].weight_mask, static_masks[1])
    assert {r["algorithm"] for r in sparsifier.report()} == {"rigl", "static"}


def test_engine_adopts_masks_already_on_the_model():
    torch.manual_seed(0)
    model = mlp()
    fs.sparsify_model(model, 0.6, seed=4)
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    # an algorithm that asks for other counts is refused: the masks are not silently kept at 0.6
    with pytest.raises(ValueError, match=r"already carries masks.*sparsity 0\.6.*RigL\(sparsity=0\.95.*asks for"):
        fs.Sparsifier(model, None, fs.RigL(sparsity=0.95), total_steps=100)
    sparsifier = fs.Sparsifier(model, None, fs.RigL(sparsity=0.6), total_steps=100)   # the same counts: adopted
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))
    sparsifier.remove()
    sparsifier = fs.Sparsifier(model, None)   # no algorithm: train the masks as they are
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))
    assert [r["target_sparsity"] for r in sparsifier.report()] == pytest.approx([0.6, 0.6, 0.6], abs=1e-2)


# --- report, state, removal --------------------------------------------------------------------

def test_report_and_sparsity():
    model = mlp()
    sparsifier = fs.Sparsifier(model, None, fs.Static(sparsity=0.75))
    rows = sparsifier.report()
    assert [(r["name"], r["shape"], r["active"], r["numel"]) for r in rows] == [
        ("0.weight", (16, 8), 32, 128), ("2.weight", (12, 16), 48, 192), ("4.weight", (4, 12), 12, 48)]
    assert all(r["target_sparsity"] == 0.75 and r["sparsity"] == 0.75 for r in rows)
    assert sparsifier.sparsity() == 0.75
    assert "static" in repr(sparsifier)


def test_state_dict_contents_and_round_trip():
    model, opt, sp = _build("rigl", "sgd")
    _run(model, opt, range(4))
    state = sp.state_dict()
    assert state["step_count"] == 4 and state["seed"] == 5 and state["total_steps"] == STEPS
    assert state["masks"] == {"0.weight": (16, 8), "2.weight": (12, 16), "4.weight": (4, 12)}
    assert [r["step"] for r in state["history"]] == [3]
    _, _, other = _build("rigl", "sgd")
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_remove_stops_enforcement_and_updates_masks_stay():
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    sparsifier = fs.Sparsifier(model, opt, _every_step(fs.RigL, 0.8, 0.3))
    x, y = batch()
    _ce_step(model, opt, x, y)
    assert sparsifier.step_count == 1
    masks = [sp.mask.clone() for sp in fs.sparse_params(model)]
    sparsifier.remove()
    _ce_step(model, opt, x, y)
    assert sparsifier.step_count == 1 and len(sparsifier.history) == 1
    assert all(torch.equal(sp.mask, m) for sp, m in zip(fs.sparse_params(model), masks))
    assert "0.weight_mask" in model.state_dict()
    assert (model[0].weight[~model[0].weight_mask] != 0).any()
