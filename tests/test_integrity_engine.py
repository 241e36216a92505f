"""The engine refuses inconsistent set-ups, empty layers and late surprises before it changes
anything, and keeps masked weights exactly 0 whatever a step wrote into them (issue: integrity)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse.core.masks import attach_mask, sparse_params, zero_outside_

from helpers import batch, mlp

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


# --- inconsistent set-ups ------------------------------------------------------------------------
def test_an_optimizer_that_holds_none_or_some_of_the_sparse_weights_is_refused():
    model = mlp()
    snap = _snapshot(model)
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer does not update none of the sparse parameters"):
        fs.Sparsifier(model, other, fs.RigL(0.5), total_steps=100)
    _untouched(model, snap)
    partial = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    with pytest.raises(ValueError, match=r"does not update \['2.weight', '4.weight'\]"):
        fs.Sparsifier(model, partial, fs.RigL(0.5), total_steps=100)
    _untouched(model, snap)


def test_two_engines_on_one_optimizer_are_refused_until_the_first_is_removed():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = fs.Sparsifier(model, opt, fs.RigL(0.5), total_steps=100)
    with pytest.raises(ValueError, match="already drives Sparsifier.*remove"):
        fs.Sparsifier(model, opt, fs.RigL(0.5), total_steps=100)
    first.remove()
    fs.Sparsifier(model, opt, fs.RigL(0.5), total_steps=100)


def test_an_algorithm_on_a_model_masked_at_another_sparsity_is_refused():
    model = mlp()
    fs.sparsify_model(model, 0.9)
    masks = [sp.mask.clone() for sp in sparse_params(model)]
    with pytest.raises(ValueError, match=r"sparsity 0\.89.*RigL\(sparsity=0\.5.*asks for"):
        fs.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), fs.RigL(sparsity=0.5), total_steps=100)
    with pytest.raises(ValueError, match="asks for"):
        fs.Sparsifier(model, None, fs.Static(sparsity=0.5))
    assert all(torch.equal(sp.mask, m) for sp, m in zip(sparse_params(model), masks))


# --- empty layers: refused everywhere ---------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda m: fs.Sparsifier(m, None, fs.RigL(sparsity=0.9999), total_steps=100),
    lambda m: fs.Sparsifier(m, None, fs.Static(sparsity=0.9999)),
    lambda m: fs.sparsify_model(m, 0.9999),
    lambda m: fs.from_config(m, None, {"algorithm": "rigl", "sparsity": 0.9999}, total_steps=100),
    lambda m: fs.Sparsifier(m, None, fs.GMP(sparsity=0.9999, scope="local"), total_steps=100),
])
def test_a_sparsity_that_empties_a_layer_is_refused(build):
    model = mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"would leave no weight in .*0\.weight.*a sparse layer keeps at least one"):
        build(model)
    assert not sparse_params(model)
    _untouched(model, snap)


def test_a_one_weight_layer_at_half_sparsity_is_refused_and_the_bound_is_given():
    layer = nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"weight \(1 weights at sparsity 0\.5\).*sparsity below 0\.5"):
        fs.Sparsifier(layer, None, fs.Static(sparsity=0.5))
    fs.Sparsifier(nn.Linear(4, 1), None, fs.Static(sparsity=0.5))   # 2 of 4 kept


def test_the_cli_refuses_it_in_one_line(tmp_path):
    from typer.testing import CliRunner
    from fastsparse.experiments.cli import app

    path = tmp_path / "empty.yaml"
    path.write_text("model: {name: mlp, sizes: [64, 8, 10]}\nsparsity: {algorithm: rigl, sparsity: 0.9999}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "would leave no weight" in result.stderr and "Traceback" not in result.output


# --- NaN and inf never survive in a masked weight --------------------------------------------------
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_masked_weights_are_exactly_zero_after_a_nan_step(opt_name):
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    fs.Sparsifier(model, opt, fs.Static(sparsity=0.75))
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad.fill_(float("nan"))   # a bad step: every gradient NaN
    opt.step()
    for sp in sparse_params(model):
        masked = sp.param[~sp.mask]
        assert torch.equal(masked, torch.zeros_like(masked)) and not torch.signbit(masked).any()


def test_zero_outside_keeps_the_active_bits_and_zeroes_nan_inf_and_minus_zero():
    w = torch.tensor([1.5, float("nan"), float("inf"), -0.0, -2.0, float("-inf")])
    m = torch.tensor([True, False, False, False, True, True])
    zero_outside_(w, m)
    assert w[0] == 1.5 and w[4] == -2.0 and w[5] == float("-inf")
    assert torch.equal(w[~m], torch.zeros(3)) and not torch.signbit(w[~m]).any()
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    attach_mask(fs.SparseParam("weight", model, "weight"), torch.tensor([[True, False, True], [False, False, True]]))
    assert torch.equal(model.weight[~model.weight_mask], torch.zeros(3))


# --- checked when the engine is built, not at the first step ------------------------------------------
@pytest.mark.parametrize("total", [0, -5, "100", True, 1.5])
def test_a_bad_total_steps_is_refused_at_construction(total):
    model = mlp()
    with pytest.raises(ValueError, match=r"total_steps must be a whole number of optimizer steps ≥ 1"):
        fs.Sparsifier(model, None, fs.RigL(0.5), total_steps=total)
    assert not sparse_params(model)


def test_a_score_function_with_the_wrong_arguments_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"keep score function .* must take \(param, optimizer\)"):
        fs.DST(keep_score=lambda p: p.abs())
    with pytest.raises(ValueError, match=r"grow score function .* must take \(param, optimizer\)"):
        fs.RigL(grow_score=lambda p, opt, extra: p)
    fs.DST(keep_score=lambda p, opt: p.abs(), grow_score=lambda p, opt, generator=None: p)


@pytest.mark.parametrize("value", ["0.9", b"0.9", True, None, [0.9]])
def test_a_sparsity_that_is_not_a_number_is_refused(value):
    with pytest.raises(TypeError, match="sparsity must be a number in"):
        fs.RigL(sparsity=value)
    model = mlp()
    with pytest.raises(TypeError, match="must be a number in"):
        fs.sparsify_model(model, value)
    assert not sparse_params(model)
