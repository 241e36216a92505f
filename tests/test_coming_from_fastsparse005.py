"""fastsparse 0.0.5, name by name (the table in docs/coming-from/fastsparse-0.0.5.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.engine.handle import is_sparseable_module, sparse_mask, sparse_mask_like, sparseable_modules, top_k_mask
from fastsparse.core.masks import n_keep

from helpers import ConvNet, mlp


def _xy(n=32, features=8, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_sparse_mask_and_sparse_mask_like_have_exact_counts():
    m = sparse_mask((10, 7), 0.9, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (10, 7) and int(m.sum()) == n_keep(70, 0.9) == 7
    p = torch.zeros(5, 4)
    assert int(sparse_mask_like(p, 0.5).sum()) == 10
    with pytest.raises(ValueError, match="sparsity"):
        sparse_mask((3,), 1.5)


def test_top_k_mask_and_topk_mask():
    t = torch.tensor([0.1, 5.0, -2.0, 3.0])
    assert top_k_mask(t, 2).tolist() == [False, True, False, True]
    assert torch.equal(top_k_mask(t, 2), sparse.topk_mask(t, 2))


def test_is_sparseable_module_and_sparseable_modules():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3), nn.LSTM(3, 3))
    assert [type(m).__name__ for m in sparseable_modules(model)] == ["Conv2d", "LazyLinear", "LSTM"]
    assert not is_sparseable_module(nn.BatchNorm2d(2))
    assert is_sparseable_module(nn.BatchNorm2d(2), additional_types=[nn.BatchNorm2d])


def test_sparse_params_and_apply_masks():
    model = mlp((8, 10, 4))
    sparse.sparsify_model(model, 0.5, enforce_masks=False)
    sps = sparse.sparse_params(model)
    assert [sp.name for sp in sps] == ["0.weight", "2.weight"]
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    sparse.apply_masks([sp.param for sp in sps], [sp.mask for sp in sps])
    assert int((model[0].weight != 0).sum()) == 40


@pytest.mark.parametrize("dist, expected", [
    (sparse.uniform_sparsity, [0.8, 0.8]),
    (sparse.first_layer_dense_uniform, [0.0, 0.8]),
])
def test_sparse_f_uniform_and_first_layer_dense_uniform(dist, expected):
    model = mlp((8, 10, 4))
    sparse.sparsify_model(model, 0.8, sparse_f=dist)
    got = [1 - float(sp.mask.float().mean()) for sp in sparse.sparse_params(model)]
    assert got == pytest.approx(expected)


def test_erdos_renyi_sparsity_include_kernel_and_erk_power_scale():
    shapes = [(4, 2, 3, 3), (8, 4, 3, 3)]
    erk = sparse.erdos_renyi_sparsity(shapes, 0.5)
    er = sparse.erdos_renyi_sparsity(shapes, 0.5, include_kernel=False)
    flat = sparse.erdos_renyi_sparsity(shapes, 0.5, erk_power_scale=0.0)
    assert flat == pytest.approx([0.5, 0.5])                        # p = 0 is uniform
    # kept weights sum to half of all: ERK and ER both meet the budget
    for s in (erk, er):
        assert sum((1 - x) * n for x, n in zip(s, (72, 288))) == pytest.approx(180)
    assert erk[0] < erk[1]                                         # the smaller layer is denser


def test_sparsify_model_arguments_and_spellings():
    for kw in ({"sparse_f": sparse.erdos_renyi_sparsity}, {"sparse_init_f": sparse.erdos_renyi_sparsity},
               {"sparsify_method": sparse.erdos_renyi_sparsity}):
        model = mlp((8, 10, 4))
        torch.manual_seed(0)
        hooks = sparse.sparsify_model(model, model_sparsity=0.6, **kw)
        assert len(hooks) == 2
    model = mlp((8, 10, 4))
    hooks = sparse.sparsify_model(model, 0.5, enforce_mask=False)   # the seed's singular spelling
    assert len(hooks) == 0


def test_enforce_masks_false_leaves_weights_to_the_user_and_remove_stops_enforcement():
    x, y = _xy()
    model = mlp((8, 10, 4))
    sparse.sparsify_model(model, 0.5, enforce_masks=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _step(model, opt, x, y)
    opt.step()
    assert int((model[0].weight != 0).sum()) > 40                   # not enforced: weights regrew
    model = mlp((8, 10, 4))
    sparse_hooks = sparse.sparsify_model(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _step(model, opt, x, y)
    opt.step()
    assert int((model[0].weight != 0).sum()) == 40                  # enforced after the step
    sparse_hooks.remove()
    _step(model, opt, x, y)
    opt.step()
    assert int((model[0].weight != 0).sum()) > 40 and hasattr(model[0], "weight_mask")


def test_sparsify_model_takes_a_learner():
    class FakeLearner:          # anything with .model, as fastai's Learner
        def __init__(self, model):
            self.model = model

    model = mlp((8, 10, 4))
    sparse.sparsify_model(FakeLearner(model), 0.5)
    assert int(model[0].weight_mask.sum()) == 40


@pytest.mark.parametrize("preset, grow", [("SET_presets", sparse.random_score), ("SNFS_presets", sparse.gradient_momentum),
                                          ("RigL_presets", sparse.gradient_magnitude)])
def test_presets_keep_score_f_grow_score_f(preset, grow):
    p = getattr(sparse, preset)
    assert p["keep_score_f"] is sparse.weight_magnitude and p["grow_score_f"] is grow
    assert p["initial_drop_grow_pct"] == 0.3 and p["stop_pct"] == 0.75


def test_scores_weight_magnitude_gradient_magnitude_gradient_momentum_random_score():
    model = mlp((8, 10, 4))
    x, y = _xy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt, x, y)
    opt.step()
    _step(model, opt, x, y)
    w = model[0].weight
    assert torch.equal(sparse.weight_magnitude(w), w.abs())
    assert torch.equal(sparse.gradient_magnitude(w), w.grad.abs())
    assert torch.equal(sparse.gradient_momentum(w, opt), opt.state[w]["momentum_buffer"].abs())
    r = sparse.random_score(w, generator=torch.Generator().manual_seed(0))
    assert r.shape == w.shape


def _wrapper_run(**kw):
    torch.manual_seed(0)
    model = mlp((8, 40, 4))
    sparse.sparsify_model(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, **kw)
    x, y = _xy()
    for step in range(1, 11):
        _step(model, wrapper, x, y)
        wrapper.step(step, step / 10)
        wrapper.zero_grad()
    return model, wrapper


def test_wrapper_batches_per_update_initial_drop_grow_pct_stop_pct():
    # updates every 2 batches while pct < stop_pct 0.5: at steps 2 and 4 (pct 0.2, 0.4)
    model, wrapper = _wrapper_run(**{**sparse.RigL_presets, "batches_per_update": 2, "stop_pct": 0.5,
                                     "initial_drop_grow_pct": 0.3})
    steps = [r["step"] for r in wrapper.sparsifier.history]
    assert steps == [2, 4]
    assert [int(sp.mask.sum()) for sp in sparse.sparse_params(model)] == [64, 32]   # counts kept exactly
    with pytest.raises(ValueError, match="stop_pct"):
        _wrapper_run(stop_pct=1.5)
    with pytest.raises(ValueError, match="batches_per_update"):
        _wrapper_run(batches_per_update=0)


def test_wrapper_sparse_modules_only_those_are_rewired():
    torch.manual_seed(0)
    model = mlp((8, 40, 4))
    sparse.sparsify_model(model, 0.8)
    before = model[2].weight_mask.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse_opt = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, sparse_modules=[model[0]],
                                                              batches_per_update=1, **sparse.SET_presets)
    x, y = _xy()
    for step in range(1, 4):
        pct_train = step / 10
        _step(model, sparse_opt, x, y)
        sparse_opt.step(step, pct_train)
        sparse_opt.zero_grad()
    assert torch.equal(model[2].weight_mask, before) and len(sparse_opt.sparsifier.history) == 3


def test_custom_keep_score_f_and_grow_score_f():
    def keep_first(param, opt):            # the seed's custom keep score: larger = keep
        return -torch.arange(param.numel(), dtype=param.dtype).view(param.shape)

    def grow_last(param, opt):
        return torch.arange(param.numel(), dtype=param.dtype).view(param.shape)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 1, bias=False))
    sparse.sparsify_model(model, 0.5, init_method="topk")
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 11.0))
    sparse.sparsify_model(model, 0.5, init_method="topk")          # keeps 6..10
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapper = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, keep_score_f=keep_first,
                                                           grow_score_f=grow_last, batches_per_update=1,
                                                           initial_drop_grow_pct=0.4, stop_pct=1.0)
    model(torch.ones(1, 10)).sum().backward()
    wrapper.step(1, 0.0)
    # drop floor(0.4 · 5) = 2 actives with the lowest keep score (the last ones: 9, 10), grow 2 by
    # the highest grow score among the inactive or just dropped (the last ones again: 9, 10)
    assert model[0].weight_mask.view(-1).nonzero().view(-1).tolist() == [5, 6, 7, 8, 9]
    wrapper.remove()   # one engine per optimizer
    with pytest.raises(ValueError, match="shape"):
        bad = sparse.DynamicSparseTrainingOptimizerWrapper(model, opt, keep_score_f=lambda p, opt: p.sum(),
                                                           batches_per_update=1)
        model(torch.ones(1, 10)).sum().backward()
        bad.step(1, 0.0)


def test_dynamic_sparse_training_callback_with_gradient_accumulation():
    from fastai.basics import DataLoaders, Learner
    from fastai.callback.training import GradientAccumulation

    x, y = _xy(64)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=8)
    torch.manual_seed(0)
    model = mlp((8, 40, 4))
    learn = Learner(dls, model, loss_func=nn.functional.cross_entropy)
    sparse.sparsify_model(learn.model, 0.8, sparse_f=sparse.erdos_renyi_sparsity)
    counts = [int(sp.mask.sum()) for sp in sparse.sparse_params(model)]
    cb = sparse.DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=2)
    learn.fit(2, cbs=[cb, GradientAccumulation(n_acc=16)])      # 2 batches of 8 per optimizer step
    # 8 optimizer steps; updates every 2 until stop_pct 0.75 (step 6 is at 0.75: none)
    assert cb.sparsifier.step_count == 8 and [r["step"] for r in cb.sparsifier.history] == [2, 4]
    assert [int(sp.mask.sum()) for sp in sparse.sparse_params(model)] == counts


def test_save_model_load_model_round_trip_with_masks(tmp_path):
    from fastai.learner import load_model, save_model

    torch.manual_seed(0)
    model = mlp((8, 10, 4))
    sparse.sparsify_model(model, 0.7, sparse_f=sparse.erdos_renyi_sparsity)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_model(tmp_path / "m.pth", model, opt)                    # masks are buffers: in the state_dict
    torch.manual_seed(1)
    again = mlp((8, 10, 4))
    sparse.sparsify_model(again, 0.7, sparse_f=sparse.erdos_renyi_sparsity, seed=1)   # other masks first
    load_model(tmp_path / "m.pth", again, torch.optim.SGD(again.parameters(), lr=0.1))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
