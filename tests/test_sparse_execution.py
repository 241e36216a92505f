"""Sparse execution against masked training on digits: the same masks (static, SET; RigL up to
ties under float rounding), the same losses, exact counts, exact zeros, zeroed state of grown
weights; every mask-changing method and the seed API run on it; the optimizer is swapped in
place; the choice per layer is reported with its reason; checkpoints resume; exports load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.core.sparse_linear import SparseLinear
from fastsparse.experiments.data import load_digits_split
from fastsparse.experiments.models import MLP

from helpers import ConvNet

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

X, Y, XT, YT = load_digits_split()


def _batches(steps: int, seed: int = 0, bs: int = 64):
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(len(X), generator=g)
        out += [perm[i:i + bs] for i in range(0, len(X) - bs + 1, bs)]
    return out[:steps]


def _masks_of(model) -> dict[str, torch.Tensor]:
    out = {sp.name: sp.mask.clone() for sp in sparse_params(model)}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            out[f"{name}.weight"] = m.mask()
    return out


def _train(algorithm, execution, steps=200, seed=0, opt_name="sgd", total=None, sizes=(64, 300, 100, 10)):
    torch.manual_seed(seed)
    model = MLP(sizes)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-3), "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3)}
    opt = make[opt_name](model.parameters())
    engine = fs.Sparsifier(model, opt, algorithm, total_steps=total or steps, seed=seed, execution=execution)
    losses, masks = [], [(0, _masks_of(model))]
    for idx in _batches(steps, seed):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if engine.history and engine.history[-1]["step"] == engine.step_count:
            masks.append((engine.step_count, _masks_of(model)))
    return model, opt, engine, losses, masks


def _rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["static", "set"])
def test_static_and_set_give_the_same_masks_and_losses(name):
    alg = lambda: fs.create(name, sparsity=0.95, distribution="erk",  # noqa: E731
                            **({"update": fs.UpdateSchedule(freq=25, stop=0.75)} if name == "set" else {}))
    _, _, me, loss_m, masks_m = _train(alg(), "masked")
    model, _, se, loss_s, masks_s = _train(alg(), "sparse")
    assert {c.execution for c in se.choices} == {"sparse"} and any(isinstance(m, SparseLinear) for m in model.modules())
    assert [s for s, _ in masks_m] == [s for s, _ in masks_s] and len(masks_m) == (1 if name == "static" else 6)
    for (_, a), (_, b) in zip(masks_m, masks_s):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rel(loss_s, loss_m) <= 1e-4
    assert me.history == se.history if name == "static" else \
        [(r["step"], r["changed"], r["active"]) for r in me.history] == [(r["step"], r["changed"], r["active"])
                                                                            for r in se.history]


def test_rigl_masks_agree_on_at_least_999_per_mille_at_every_update():
    alg = lambda: fs.RigL(sparsity=0.95, distribution="erk", update=fs.UpdateSchedule(freq=25, stop=0.75))  # noqa: E731
    _, _, _, loss_m, masks_m = _train(alg(), "masked")
    _, _, _, loss_s, masks_s = _train(alg(), "sparse")
    assert [s for s, _ in masks_m] == [s for s, _ in masks_s] and len(masks_m) == 6
    for (_, a), (_, b) in zip(masks_m, masks_s):
        for k in a:
            assert int(a[k].sum()) == int(b[k].sum())                       # exact counts
            agree = float((a[k] == b[k]).float().mean())
            assert agree >= 0.999, (k, agree)
    assert _rel(loss_s[:50], loss_m[:50]) <= 1e-4


def _accuracy(model) -> float:
    with torch.no_grad():
        return float((model(XT).argmax(1) == YT).float().mean())


@pytest.mark.slow
def test_rigl_final_accuracy_over_three_seeds_is_within_half_a_point():
    accs = {"masked": [], "sparse": []}
    for seed in (0, 1, 2):
        for mode in accs:
            alg = fs.RigL(sparsity=0.98, distribution="erk", update=fs.UpdateSchedule(freq=50, stop=0.75))
            model = _train(alg, mode, steps=100 * 21, seed=seed)[0]
            accs[mode].append(_accuracy(model))
    mean = {k: sum(v) / 3 for k, v in accs.items()}
    assert abs(mean["sparse"] - mean["masked"]) <= 0.005, accs


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_grown_weights_start_at_zero_with_zeroed_state_and_counts_are_exact(opt_name):
    torch.manual_seed(0)
    model = MLP((64, 64, 10))
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": lambda p: torch.optim.Adam(p),
           "adamw": lambda p: torch.optim.AdamW(p)}[opt_name](model.parameters())
    engine = fs.Sparsifier(model, opt, fs.SET(sparsity=0.9, update=fs.UpdateSchedule(freq=3)), total_steps=12,
                           execution="sparse")
    layer = model[0]
    assert isinstance(layer, SparseLinear) and any(p is layer.values for g in opt.param_groups for p in g["params"])
    assert not any(p.dim() == 2 for g in opt.param_groups for p in g["params"])   # no dense weight left in it
    for idx in _batches(12):
        before = layer.structure.flat()
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        after = layer.structure.flat()
        fresh = ~torch.isin(after, before)
        if fresh.any():
            assert (layer.values[fresh] == 0).all()
            for v in opt.state[layer.values].values():
                if isinstance(v, torch.Tensor) and v.shape == layer.values.shape:
                    assert (v[fresh] == 0).all()
        assert layer.nnz == n_keep(64 * 64, 0.9)
    assert len(engine.history) == 4
    dense = layer.to_dense()
    assert int((dense != 0).sum()) <= layer.nnz and torch.equal(dense[~layer.mask()], torch.zeros(0).new_zeros(
        int((~layer.mask()).sum())))


@pytest.mark.parametrize("make", [
    lambda: fs.SNFS(sparsity=0.9, update=fs.UpdateSchedule(freq=20), grow_score="gradient"),  # counts move
    lambda: fs.GMP(sparsity=0.9, freq=20, end=0.8),                                  # counts shrink
    lambda: fs.GraNet(sparsity=0.9, freq=20, end=0.8),
    lambda: fs.create("itop", sparsity=0.9, freq=20),
    lambda: fs.RigL(sparsity=0.9, redistribution="magnitude", update=fs.UpdateSchedule(freq=20)),
], ids=["snfs", "gmp", "granet", "itop", "dst_redistribution"])
def test_every_mask_changing_method_runs_on_it_with_the_masked_runs_counts(make):
    _, _, me, _, masks_m = _train(make(), "masked", steps=100)
    model, _, se, _, masks_s = _train(make(), "sparse", steps=100)
    assert [r["step"] for r in me.history] == [r["step"] for r in se.history] and se.history
    total = lambda m: sum(int(v.sum()) for v in m.values())  # noqa: E731
    assert [total(m) for _, m in masks_m] == [total(m) for _, m in masks_s]
    for (_, a), (_, b) in zip(masks_m, masks_s):
        agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        assert agree >= 0.99
    assert abs(me.sparsity() - se.sparsity()) < 1e-9


def test_the_seed_api_runs_on_it():
    def run(execution):
        torch.manual_seed(0)
        model = MLP((64, 300, 100, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        fs.sparsify_model(model, 0.9, sparse_f=fs.erdos_renyi_sparsity)
        wrapper = fs.DynamicSparseTrainingOptimizerWrapper(model, opt, **fs.SET_presets, batches_per_update=10,
                                                           execution=execution)
        for step, idx in enumerate(_batches(40)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            wrapper.step(step, step / 40)
        return _masks_of(model), wrapper.sparsifier

    masked, reference = run("masked")
    sparse, engine = run("sparse")
    assert len(engine.history) == len(reference.history) == 2   # steps 10 and 20; 30 is at stop_pct
    assert all(torch.equal(masked[k], sparse[k]) for k in masked)


def test_auto_and_ineligible_layers_say_why():
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = fs.Sparsifier(model, opt, fs.RigL(sparsity=0.5), total_steps=10, execution="auto", execution_batch=8)
    by_name = {c.name: c for c in engine.choices}
    assert by_name["conv.weight"].execution == "masked" and "Conv2d has no sparse path" in by_name["conv.weight"].reason
    fc = by_name["fc.weight"]
    assert fc.masked_ms > 0 and fc.sparse_ms > 0 and fc.reason.startswith("measured")
    assert fc.execution == ("sparse" if fc.sparse_ms < 0.95 * fc.masked_ms else "masked")
    mlp = MLP((64, 32, 10))
    imp = fs.Sparsifier(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1), fs.IMP(0.5), total_steps=100,
                        execution="auto")
    assert {c.execution for c in imp.choices} == {"masked"}
    assert all("imp's recipe rewinds or superposes" in c.reason for c in imp.choices)
    snfs = fs.Sparsifier(MLP((64, 32, 10)), None, fs.SNFS(0.5), total_steps=100, execution="auto")
    assert all("grows by the momentum of every position" in c.reason for c in snfs.choices)


def test_an_explicit_ask_that_cannot_be_met_is_refused_before_anything_changes():
    from fastsparse.engine.execution import ExecutionRefused

    mlp = MLP((64, 32, 10))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with pytest.raises(ExecutionRefused, match="no sparse parameter can run sparse .*imp's recipe rewinds"):
        fs.Sparsifier(mlp, opt, fs.IMP(0.5), total_steps=100, execution="sparse")
    with pytest.raises(ExecutionRefused, match=r"execution names \['0.wieght'\]"):
        fs.Sparsifier(mlp, opt, fs.RigL(0.5), total_steps=100, execution={"0.wieght": "sparse"})
    with pytest.raises(ExecutionRefused, match="cannot run sparse as asked: 0.weight: snfs"):
        fs.Sparsifier(mlp, opt, fs.SNFS(0.5), total_steps=100, execution={"0.weight": "sparse"})
    assert not sparse_params(mlp) and mlp.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
    engine = fs.Sparsifier(mlp, opt, fs.RigL(0.5), total_steps=100, execution={"2.weight": "sparse"})
    assert {c.name: c.execution for c in engine.choices} == {"0.weight": "masked", "2.weight": "sparse"}


def test_a_checkpoint_resumes_bit_for_bit_with_the_recorded_choice(tmp_path):
    alg = lambda: fs.GMP(sparsity=0.9, freq=10, end=0.5)  # noqa: E731 (counts shrink: the values change size)
    ref_model, _, ref, _, _ = _train(alg(), "sparse", steps=60)
    model, opt, engine, _, _ = _train(alg(), "sparse", steps=30, total=60)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "engine": engine.state_dict()},
               tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    twin = MLP((64, 300, 100, 10))
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    engine2 = fs.Sparsifier(twin, opt2, alg(), total_steps=60, seed=0, execution=state["engine"]["execution"])
    twin.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    engine2.load_state_dict(state["engine"])
    for idx in _batches(60)[30:]:
        opt2.zero_grad()
        nn.functional.cross_entropy(twin(X[idx]), Y[idx]).backward()
        opt2.step()
    assert engine2.history == ref.history
    for (k, a), b in zip(ref_model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_sparse_executed_model_exports_and_runs_for_inference(tmp_path):
    model, _, _, _, _ = _train(fs.SET(sparsity=0.9, update=fs.UpdateSchedule(freq=20)), "sparse", steps=40)
    fs.save_sparse(model, tmp_path / "m.safetensors")
    masked = MLP((64, 300, 100, 10))
    fs.load_sparse(tmp_path / "m.safetensors", masked)
    with torch.no_grad():
        assert torch.allclose(masked(XT), model(XT), atol=1e-5)
        fast = fs.to_inference(model, min_sparsity=0.5)
        assert torch.allclose(fast(XT), model(XT), atol=1e-5)


def test_bad_execution_values_are_refused_before_anything_changes():
    model = MLP((64, 32, 10))
    for bad in ("fast", None, {"0.weight": "dense"}):
        with pytest.raises(ValueError, match="execution must be one of|must be 'sparse' or 'masked'"):
            fs.Sparsifier(model, None, fs.RigL(0.5), total_steps=10, execution=bad)
    assert not sparse_params(model)
