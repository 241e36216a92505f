"""Pruning at initialisation: SNIP, GraSP, SynFlow, the sanity-check transforms."""
import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.algorithms.pai import (
    grasp_scores, hessian_gradient_product, pai_masks, snip_scores, synflow_scores,
)
from fastsparse.core.masks import n_keep, select_params

from helpers import ConvNet, batch, mlp


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grasp_hessian_gradient_product_matches_finite_differences():
    torch.manual_seed(0)
    model = mlp((5, 7, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = select_params(model)
    g, hg = hessian_gradient_product(model, params, (x, y), temperature=2.0)
    eps = 1e-5

    def grads_at(sign):
        with torch.no_grad():
            for sp, v in zip(params, g):
                sp.param.add_(sign * eps * v)
        out = torch.autograd.grad(nn.functional.cross_entropy(model(x) / 2.0, y), [sp.param for sp in params])
        with torch.no_grad():
            for sp, v in zip(params, g):
                sp.param.sub_(sign * eps * v)
        return out

    plus, minus = grads_at(1.0), grads_at(-1.0)
    for h, a, b in zip(hg, plus, minus):
        fd = (a - b) / (2 * eps)
        assert torch.allclose(h, fd, rtol=1e-5, atol=1e-9)
    scores = grasp_scores(model, params, (x, y), temperature=2.0)
    assert all(torch.allclose(s, sp.param.detach() * h) for s, sp, h in zip(scores, params, hg))


def test_synflow_conservation_in_a_bias_free_mlp():
    torch.manual_seed(0)
    model = mlp((6, 9, 7, 3), bias=False)
    params = select_params(model)
    scores = synflow_scores(model, params, (6,))
    linear = nn.Sequential(*[nn.Linear(m.in_features, m.out_features, bias=False) for m in model if isinstance(m, nn.Linear)])
    with torch.no_grad():
        for dst, src in zip([m for m in linear], [m for m in model if isinstance(m, nn.Linear)]):
            dst.weight.copy_(src.weight.abs())
        r = float(linear.double()(torch.ones(1, 6, dtype=torch.float64)).sum())
    totals = [float(s.sum()) for s in scores]
    assert all(t == pytest.approx(r, rel=1e-10) for t in totals)


def test_synflow_needs_no_data_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y)          # moves the BN statistics off their defaults
    model.train()
    before = _state(model)
    params = select_params(model)
    masks = pai_masks(model, params, "synflow", [0.9] * len(params), "global", input_shape=(1, 8, 8), iterations=10)
    assert _same(before, _state(model)) and model.training and model.bn.training
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == n_keep(total, 0.9)
    assert all(int(m.sum()) >= 1 for m in masks)
    with pytest.raises(ValueError, match="input_shape"):
        pai_masks(model, params, "synflow", [0.9] * len(params), "global")


def test_synflow_prune_at_init_without_data():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    masks = sparse.prune_at_init(model, "synflow", 0.8, iterations=20)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == n_keep(total, 0.8)


def test_snip_scores_and_no_side_effects():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = _state(model)
    params = select_params(model)
    scores = snip_scores(model, params, (x, y))
    assert _same(before, _state(model)) and all(p.grad is None for p in model.parameters())
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [(sp.param.grad * sp.param).detach().abs() for sp in params]
    total = sum(float(r.sum()) for r in raw)
    assert all(torch.allclose(s, r / total, atol=1e-9) for s, r in zip(scores, raw))
    assert sum(float(s.sum()) for s in scores) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_at_init_exact_counts(method, scope):
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    masks = sparse.prune_at_init(model, method, 0.7, batch=batch(), scope=scope, iterations=5,
                                 distribution="erk")
    numels = [m.numel() for m in masks.values()]
    counts = [int(m.sum()) for m in masks.values()]
    if scope == "local":
        sps = sparse.erdos_renyi_sparsity([tuple(m.shape) for m in masks.values()], 0.7)
        assert counts == [n_keep(n, s) for n, s in zip(numels, sps)]
    else:
        assert sum(counts) == n_keep(sum(numels), 0.7)
    for sp in sparse.sparse_params(model):
        assert (sp.param[~sp.mask] == 0).all()


@pytest.mark.parametrize("scope", ["local", "global"])
def test_pruned_scores_never_above_kept_scores(scope):
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    params = select_params(model)
    scores = snip_scores(model, params, batch())
    masks = pai_masks(model, params, "snip", [0.8] * 3, scope, batch=batch())
    if scope == "local":
        for s, m in zip(scores, masks):
            assert s[~m].max() <= s[m].min()
    else:
        assert torch.cat([s[~m] for s, m in zip(scores, masks)]).max() <= \
            torch.cat([s[m] for s, m in zip(scores, masks)]).min()


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_methods_need_a_batch(method):
    model = mlp()
    with pytest.raises(ValueError, match=rf"{method} scores weights on a batch of data: pass batch=\(inputs, targets\)"):
        sparse.prune_at_init(model, method, 0.9)
    with pytest.raises(ValueError, match="batch"):
        sparse.Sparsifier(model, None, sparse.create(method, sparsity=0.9))
    assert not sparse.sparse_params(model)


def test_unknown_method_and_bad_sparsity():
    with pytest.raises(ValueError, match=r"unknown pruning-at-initialisation method 'snap'; valid: \["):
        sparse.prune_at_init(mlp(), "snap", 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparse.prune_at_init(mlp(), "magnitude", 1.2)


def test_registered_algorithms_score_through_the_engine():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    params = select_params(model)
    expected = pai_masks(model, params, "snip", [0.8] * 3, "global", batch=batch())
    engine = sparse.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               sparse.SNIP(0.8, batch=batch()))
    assert all(torch.equal(sp.mask, m) for sp, m in zip(engine.groups[0].params, expected))


# --- sanity checks --------------------------------------------------------------------------------
def test_invert_scores_keeps_the_lowest():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    w = [p.detach().abs().clone() for n, p in model.named_parameters() if n.endswith("weight")]
    masks = sparse.prune_at_init(model, "magnitude", 0.7, scope="local", score_transform=sparse.invert_scores)
    for a, m in zip(w, masks.values()):
        assert a[m].max() <= a[~m].min()


def test_shuffle_masks_keeps_layer_counts():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    params = select_params(model)
    plain = pai_masks(model, params, "magnitude", [0.7] * 3, "global")
    shuffled = sparse.shuffle_masks(plain, seed=1)
    assert [int(m.sum()) for m in shuffled] == [int(m.sum()) for m in plain]
    assert any(not torch.equal(a, b) for a, b in zip(plain, shuffled))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, sparse.shuffle_masks(plain, seed=1)))
    w = {sp.name: sp.param.detach().clone() for sp in params}
    masks = sparse.prune_at_init(model, "magnitude", 0.7, mask_transform=lambda ms: sparse.shuffle_masks(ms, 1))
    for name, m in masks.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), w[name] * m)


def test_reinit_weights_keeps_masks_and_zeros():
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    masks = sparse.prune_at_init(model, "magnitude", 0.7)
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse.reinit_weights(model, seed=5)
    for sp in sparse.sparse_params(model):
        assert torch.equal(sp.mask, masks[sp.name])
        assert (sp.param[~sp.mask] == 0).all()
        assert not torch.equal(sp.param.detach(), kept[sp.name])
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse.reinit_weights(model, seed=5)     # seeded: the same draw again
    assert all(torch.equal(p.detach(), reference[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="no masks"):
        sparse.reinit_weights(mlp())
