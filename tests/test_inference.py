"""Sparse inference: same function from CSR weights, per-layer decisions, benchmark plumbing.

No test here asserts a speed: timings are only checked for shape and for the decision
rule applied to them (speed figures live in benchmarks/inference.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.deploy import modules
from fastsparse.deploy import (
    LayerDecision, SparseLinear, SparseMultiheadAttention, bench_inference, bench_inference_command, inference,
    is_2to4, plan_inference,
    to_inference,
)
from fastsparse.core.masks import sparse_params
from fastsparse.experiments.models import MLP
from helpers import AttnNet, ConvNet

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _sparse_weight(out_f, in_f, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return w * (torch.rand(out_f, in_f, generator=g) >= sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_f_linear_in_every_input_shape(sparsity, bias):
    w = _sparse_weight(24, 40, sparsity)
    b = torch.randn(24) if bias else None
    mod = SparseLinear(w, b)
    assert mod.nnz == int(torch.count_nonzero(w))
    assert mod.col_indices.dtype == torch.int32 and mod.crow_indices.dtype == torch.int32
    assert torch.equal(mod.to_dense_weight(), w)
    for shape in [(40,), (7, 40), (3, 5, 40)]:
        x = torch.randn(*shape)
        ref = torch.nn.functional.linear(x, w, b)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                got = mod(x)
            assert got.shape == ref.shape
            if ref.abs().max() > 0:
                assert rel_err(got, ref) <= 1e-5
            else:
                assert torch.equal(got, ref)


def test_sparse_linear_copies_moves_and_saves(tmp_path):
    mod = SparseLinear(_sparse_weight(8, 16, 0.8), torch.randn(8))
    clone = copy.deepcopy(mod).double()
    assert clone.values.dtype == torch.float64 and clone.crow_indices.dtype == torch.int32
    torch.save(mod.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(state) == {"crow_indices", "col_indices", "values", "bias"}
    x = torch.randn(3, 16, dtype=torch.float64)
    assert rel_err(clone(x), mod(x.float()).double()) <= 1e-5


def _models():
    torch.manual_seed(0)
    mlp = MLP([32, 64, 48, 10])
    sparse.sparsify_model(mlp, 0.9).remove()
    conv = ConvNet()
    sparse.sparsify_model(conv, 0.8).remove()
    attn = AttnNet()
    sparse.sparsify_model(attn, 0.9).remove()
    return [
        ("mlp", mlp, lambda: torch.randn(6, 32)),
        ("conv", conv, lambda: torch.randn(4, 1, 8, 8)),
        ("attn", attn, lambda: torch.randint(0, 20, (3, 7))),
    ]


@pytest.mark.parametrize("case", range(3), ids=["mlp", "conv", "attn"])
def test_converted_model_computes_the_same_function(case):
    name, model, make_input = _models()[case]
    model.eval()
    before = copy.deepcopy(model.state_dict())
    converted = to_inference(model, threshold=0.0)   # every Linear and projection converted
    assert all(d.converted for d in converted.sparse_inference_plan)
    assert not any(type(m) is nn.Linear for m in converted.modules())
    if name == "attn":
        assert isinstance(converted.attn, SparseMultiheadAttention)
        assert isinstance(converted.attn.out_proj, SparseLinear)
    if name == "conv":
        assert isinstance(converted.conv, nn.Conv2d) and isinstance(converted.fc, SparseLinear)
    for _ in range(3):
        x = make_input()
        with torch.no_grad():
            ref = model(x)
            got_eval = converted(x)
        with torch.inference_mode():
            got_inf = converted(x)
        assert rel_err(got_eval, ref) <= 1e-5 and rel_err(got_inf, ref) <= 1e-5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the original is untouched


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", [
    {},
    {"need_weights": False},
    {"average_attn_weights": False},
    {"key_padding_mask": "bool"},
    {"attn_mask": "bool"},
    {"attn_mask": "float", "key_padding_mask": "float"},
    {"attn_mask": "3d"},
    {"attn_mask": "bool", "is_causal": True},
])
def test_sparse_attention_matches_multihead_attention(batch_first, options):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    sparse.sparsify_model(mha, 0.7).remove()
    conv = SparseMultiheadAttention(mha, sparse_in=True, sparse_out=False)
    bsz, tgt, src = 3, 5, 6
    q = torch.randn(bsz, tgt, 16)
    kv = torch.randn(bsz, src, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kwargs = dict(options)
    if kwargs.get("key_padding_mask") == "bool":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5 + [True]] * bsz)
    elif kwargs.get("key_padding_mask") == "float":
        kwargs["key_padding_mask"] = torch.randn(bsz, src)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(tgt, src)
    elif kwargs.get("attn_mask") == "3d":
        kwargs["attn_mask"] = torch.randn(bsz * 4, tgt, src)
    with torch.inference_mode():
        ref_out, ref_w = mha(q, kv, kv, **kwargs)
        out, w = conv(q, kv, kv, **kwargs)
    assert rel_err(out, ref_out) <= 1e-5
    assert (w is None) == (ref_w is None)
    if w is not None:
        assert w.shape == ref_w.shape and rel_err(w, ref_w) <= 1e-5


def test_sparse_attention_unbatched_and_separate_kv_dims():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5).eval()
    sparse.sparsify_model(mha, 0.5).remove()
    assert {sp.name for sp in sparse_params(mha)} >= {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    conv = SparseMultiheadAttention(mha, sparse_in=True, sparse_out=True)
    q, k, v = torch.randn(4, 8), torch.randn(3, 6), torch.randn(3, 5)
    with torch.inference_mode():
        ref_out, ref_w = mha(q, k, v)
        out, w = conv(q, k, v)
    assert out.shape == ref_out.shape and rel_err(out, ref_out) <= 1e-5 and rel_err(w, ref_w) <= 1e-5
    with pytest.raises(RuntimeError, match="is_causal"):
        conv(q, k, v, is_causal=True)


def test_attention_with_bias_kv_stays_dense():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    plan = plan_inference(model, threshold=0.0)
    assert [d.use for d in plan] == ["dense", "dense"] and "add_bias_kv" in plan[0].reason
    assert isinstance(to_inference(model, plan=plan).attn, nn.MultiheadAttention)


def _fake_measure(ratios):
    """A stand-in for the timer: dense takes 1.0; sparse 1/ratio at each batch, in call order."""
    calls = iter(ratios)

    def measure(fns, reps=7, min_sample_s=1e-3, device="cpu"):
        for fn in fns.values():
            fn()
        return {"dense": 1.0, "sparse": 1.0 / next(calls)}
    return measure


@pytest.mark.parametrize("ratios, expected", [
    ([3.0, 2.0, 1.5], "csr"),        # faster at every batch by more than the margin
    ([3.0, 2.0, 1.05], "dense"),     # faster, but within the margin at batch 128
    ([3.0, 0.8, 2.0], "dense"),      # slower at batch 16: never make a layer slower
])
def test_decision_rule_needs_a_speedup_at_every_batch(monkeypatch, ratios, expected):
    monkeypatch.setattr(inference, "measure", _fake_measure(ratios))
    lin = nn.Sequential(nn.Linear(16, 16))
    sparse.sparsify_model(lin, 0.9).remove()
    (d,) = plan_inference(lin, batches=[128, 1, 16], min_speedup=1.1)
    assert d.use == expected and sorted(d.timings) == [1, 16, 128]
    assert [d.speedup(b) for b in (1, 16, 128)] == pytest.approx(ratios)
    converted = to_inference(lin, plan=[d])
    assert isinstance(converted[0], SparseLinear) == (expected == "csr")


def test_low_sparsity_is_not_timed_and_threshold_mode(monkeypatch):
    monkeypatch.setattr(inference, "measure", _fake_measure([]))   # any timing would fail
    model = MLP([16, 16, 16])
    sparse.sparsify_model(model, 0.3).remove()
    plan = plan_inference(model, batches=[1])
    assert [d.use for d in plan] == ["dense", "dense"] and all("not timed" in d.reason for d in plan)
    model2 = MLP([16, 16, 16])
    sparse.sparsify_model(model2, 0.95).remove()
    plan = plan_inference(model2, threshold=0.9)
    assert [d.use for d in plan] == ["csr", "csr"] and all(d.timings == {} for d in plan)
    assert [d.use for d in plan_inference(model, threshold=0.9)] == ["dense", "dense"]


def test_calibration_records_timings_and_follows_its_rule():
    model = MLP([64, 128, 10])
    sparse.sparsify_model(model, 0.95).remove()
    plan = plan_inference(model, batches=[1, 8], reps=1, min_speedup=1.1)
    for d in plan:
        assert sorted(d.timings) == [1, 8] and all(t > 0 for pair in d.timings.values() for t in pair)
        assert d.converted == (min(d.speedup(b) for b in (1, 8)) >= 1.1)
        assert 0.94 <= d.sparsity <= 0.96


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_layers_without_a_csr_kernel_stay_dense(monkeypatch, threshold):
    # as on CPU for fp16/bf16: "addmm_out_sparse_csr_impl_mkl" not implemented for 'Half'
    def no_kernel(self, x):
        raise RuntimeError("addmm_out_sparse_csr_impl_mkl not implemented for 'Half'")
    monkeypatch.setattr(SparseLinear, "forward", no_kernel)
    model = MLP([16, 16, 4])
    sparse.sparsify_model(model, 0.9).remove()
    plan = plan_inference(model, batches=[1], threshold=threshold, reps=1)
    assert [d.use for d in plan] == ["dense", "dense"]
    assert all("CSR kernels unavailable" in d.reason and "Half" in d.reason for d in plan)
    converted = to_inference(model, plan=plan)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(converted(x), model.eval()(x))


def test_bad_arguments():
    model = MLP([4, 4])
    with pytest.raises(ValueError, match="batch"):
        plan_inference(model, batches=[0])
    with pytest.raises(ValueError, match="threshold"):
        plan_inference(model, threshold=1.5)
    with pytest.raises(ValueError, match="min_speedup"):
        plan_inference(model, min_speedup=0.9)


def test_two_four_pattern_detection_and_cpu_statement():
    w = torch.randn(8, 16)
    w.view(8, 4, 4)[:, :, 2:] = 0
    assert is_2to4(w)
    w[0, 2] = 1.0
    assert not is_2to4(w) and not is_2to4(torch.randn(4, 6))
    lin = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        lin[0].weight.view(8, 4, 4)[:, :, 2:] = 0
    (d,) = plan_inference(lin, threshold=0.0)
    assert "CUDA-only" in d.reason and "not used on CPU" in d.reason
    with pytest.raises(RuntimeError, match="CUDA-only"):
        modules.SemiStructuredLinear(lin[0].weight, None)


def test_enforcement_hooks_are_removed_from_the_converted_model():
    model = MLP([8, 8, 4])
    handle = sparse.sparsify_model(model, 0.9)
    converted = to_inference(model, threshold=0.0)
    assert len(converted._forward_pre_hooks) == 0
    assert len(model._forward_pre_hooks) == 1                   # the original keeps enforcing
    handle.remove()


def test_bench_inference_on_a_model_and_on_files(tmp_path):
    pytest.importorskip("safetensors")
    from fastsparse.deploy import save_sparse
    model = MLP([32, 64, 10])
    sparse.sparsify_model(model, 0.9).remove()
    result = bench_inference(model, [1, 4], reps=1)
    assert [d.name for d in result.layers] == ["0", "2"]
    assert all(sorted(d.timings) == [1, 4] for d in result.layers)
    assert sorted(result.end_to_end) == [1, 4]
    text = str(result)
    assert "end to end" in text and "CUDA-only" in text

    save_sparse(model, tmp_path / "mlp.st")
    text = bench_inference_command(str(tmp_path / "mlp.st"), [2])
    assert "model rebuilt from the file's spec" in text and "end to end" in text

    conv = ConvNet()
    sparse.sparsify_model(conv, 0.9).remove()
    save_sparse(conv, tmp_path / "conv.st")
    result = bench_inference(str(tmp_path / "conv.st"), [2], reps=1)
    assert [d.name for d in result.layers] == ["fc.weight"] and result.end_to_end == {}
    assert "no end-to-end figure" in str(result)


def test_layer_decision_speedup():
    d = LayerDecision("x", (2, 2), 0.5, "csr", "", {1: (2.0, 0.5)})
    assert d.converted and d.speedup(1) == 4.0
