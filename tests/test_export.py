"""Compressed sparse checkpoints: exact round trips, sizes, format choice, clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
import safetensors.torch as st  # noqa: E402

import fastsparse as sparse  # noqa: E402
from fastsparse.deploy import (  # noqa: E402
    FORMAT_VERSION, SparseFileError, build_model, encoded_bytes, export_command, infer_model_spec,
    load_sparse, pack_bits, read_sparse, save_sparse, size_report, unpack_bits,
)
from fastsparse.core.masks import attach_mask, sparse_params  # noqa: E402
from fastsparse.experiments.models import MLP  # noqa: E402
from helpers import ConvNet  # noqa: E402


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_state(model_a: nn.Module, model_b: nn.Module) -> None:
    """Bit for bit: every entry; under a mask, masked-out weights are compared as zeros
    (their sign is not stored, documented), every kept weight bit for bit."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        a, b = sa[key], sb[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        mask = sa.get(key + "_mask")
        if mask is not None and mask.dtype == torch.bool:
            assert _bits(a[mask]) == _bits(b[mask]), key
            assert torch.equal(a[~mask], torch.zeros_like(a[~mask])), key
            assert torch.equal(b[~mask], torch.zeros_like(b[~mask])), key
        else:
            assert _bits(a) == _bits(b), key


def _mlp(sparsity: float, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP([20, 32, 16, 5])
    sparse.sparsify_model(model, sparsity, seed=seed).remove()
    # a 100%-dense layer (mask all True) and a 100%-sparse one (mask all False)
    sps = {sp.name: sp for sp in sparse_params(model)}
    attach_mask(sps["2.weight"], torch.ones(16, 32, dtype=torch.bool))
    attach_mask(sps["4.weight"], torch.zeros(5, 16, dtype=torch.bool))
    return model


def _convnet(sparsity: float, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet()
    sparse.sparsify_model(model, sparsity, seed=seed).remove()
    model.train()
    model(torch.randn(4, 1, 8, 8))  # non-default BN running statistics and batch count
    return model


@pytest.mark.parametrize("fmt", ["auto", "bitmask", "csr"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_round_trip_mlp_into_fresh_and_resparsified_models(tmp_path, fmt, sparsity):
    model = _mlp(sparsity)
    path = tmp_path / "m.safetensors"
    save_sparse(model, path, format=fmt)
    fresh = MLP([20, 32, 16, 5])                       # no masks: they are registered
    load_sparse(path, fresh)
    assert_same_state(model, fresh)
    assert [sp.name for sp in sparse_params(fresh)] == ["0.weight", "2.weight", "4.weight"]
    other = MLP([20, 32, 16, 5])                       # other masks: overwritten in place
    sparse.sparsify_model(other, 0.7, seed=3).remove()
    load_sparse(path, other)
    assert_same_state(model, other)


@pytest.mark.parametrize("fmt", ["auto", "csr"])
@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_round_trip_convnet_with_batchnorm(tmp_path, fmt, sparsity):
    model = _convnet(sparsity)
    path = tmp_path / "c.safetensors"
    save_sparse(model, path, format=fmt)
    fresh = ConvNet()
    load_sparse(path, fresh)
    assert_same_state(model, fresh)
    assert int(fresh.bn.num_batches_tracked) == 1
    model.eval(), fresh.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), fresh(x))


def test_canonical_zeros_round_trip_every_byte(tmp_path):
    model = _mlp(0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.0)                               # -0.0 + 0.0 = +0.0; nothing else changes
    save_sparse(model, tmp_path / "m.st")
    fresh = load_sparse(tmp_path / "m.st", MLP([20, 32, 16, 5]))
    for key, value in model.state_dict().items():
        assert _bits(value) == _bits(fresh.state_dict()[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_other_dtypes_and_special_values(tmp_path, dtype):
    model = _mlp(0.8).to(dtype)
    sp = sparse_params(model)[0]
    with torch.no_grad():
        kept = sp.mask.nonzero()[:3]
        for (i, j), v in zip(kept.tolist(), [float("inf"), float("nan"), 1e-30]):
            sp.param[i, j] = v
    save_sparse(model, tmp_path / "m.st")
    fresh = load_sparse(tmp_path / "m.st", MLP([20, 32, 16, 5]).to(dtype))
    assert_same_state(model, fresh)


def test_auto_picks_the_smaller_encoding_and_sizes_match(tmp_path):
    lin = nn.Linear(64, 64, bias=False)
    for sparsity, expected in [(0.5, "bitmask"), (0.99, "csr")]:
        sparse.sparsify_model(lin, sparsity).remove()
        path = tmp_path / f"l{sparsity}.st"
        save_sparse(lin, path)
        sf = read_sparse(path)
        assert [e["kind"] for e in sf.entries] == [expected]
        row = size_report(path).rows[0]
        nnz = int(lin.weight_mask.sum())
        assert row.stored_bytes == encoded_bytes((64, 64), nnz, torch.float32, expected)
        assert row.stored_bytes < encoded_bytes((64, 64), nnz, torch.float32,
                                                {"csr": "bitmask", "bitmask": "csr"}[expected])


def test_csr_index_dtypes_follow_the_shape(tmp_path):
    wide = nn.Linear(40000, 2, bias=False)              # > 32768 columns: int32 column indices
    narrow = nn.Linear(300, 2, bias=False)              # <= 32768 columns: int16
    tiny = nn.Linear(100, 2, bias=False)                # <= 256 columns: uint8
    model = nn.ModuleDict({"wide": wide, "narrow": narrow, "tiny": tiny})
    sparse.sparsify_model(model, 0.99).remove()
    save_sparse(model, tmp_path / "m.st", format="csr")
    raw = st.load_file(tmp_path / "m.st")
    assert raw["wide.weight::col"].dtype == torch.int32
    assert raw["narrow.weight::col"].dtype == torch.int16
    assert raw["tiny.weight::col"].dtype == torch.uint8
    assert raw["wide.weight::crow"].dtype == torch.int16
    fresh = nn.ModuleDict({"wide": nn.Linear(40000, 2, bias=False), "narrow": nn.Linear(300, 2, bias=False),
                           "tiny": nn.Linear(100, 2, bias=False)})
    assert_same_state(model, load_sparse(tmp_path / "m.st", fresh))


def test_file_size_goals_at_90_and_99_percent(tmp_path):
    lin = nn.Linear(512, 512, bias=False)
    ratios = {}
    for sparsity in (0.9, 0.99):
        sparse.sparsify_model(lin, sparsity).remove()
        save_sparse(lin, tmp_path / "l.st")
        ratios[sparsity] = size_report(tmp_path / "l.st").ratio
    assert ratios[0.9] <= 0.14 and ratios[0.99] <= 0.03, ratios


def test_pack_bits_round_trip_and_order():
    mask = torch.rand(1001) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), mask)
    assert pack_bits(torch.tensor([True, False, False, True])).tolist() == [0b1001]


def test_weights_outside_the_mask_are_kept_dense_with_a_warning(tmp_path):
    model = _mlp(0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)                        # masks not enforced
    with pytest.warns(UserWarning, match="outside its mask"):
        save_sparse(model, tmp_path / "m.st")
    kinds = {e["name"]: e["kind"] for e in read_sparse(tmp_path / "m.st").entries}
    assert kinds["0.weight"] == "dense_masked"
    fresh = load_sparse(tmp_path / "m.st", MLP([20, 32, 16, 5]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_metadata_records_version_shapes_dtypes_sparsity_and_model_spec(tmp_path):
    model = _mlp(0.9)
    save_sparse(model, tmp_path / "m.st")
    with open(tmp_path / "m.st", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["model_spec"]) == {"name": "mlp", "sizes": [20, 32, 16, 5]}
    entries = {e["name"]: e for e in json.loads(meta["tensors"])}
    assert entries["0.weight"]["shape"] == [32, 20] and entries["0.weight"]["dtype"] == "float32"
    assert entries["0.weight"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert entries["2.weight"]["sparsity"] == 0.0 and entries["4.weight"]["sparsity"] == 1.0
    assert entries["0.bias"]["kind"] == "dense"
    assert build_model(json.loads(meta["model_spec"]))[0].in_features == 20


def test_save_from_a_state_dict_and_spec_inference():
    model = _mlp(0.9)
    assert infer_model_spec(model.state_dict()) == {"name": "mlp", "sizes": [20, 32, 16, 5]}
    assert infer_model_spec(ConvNet().state_dict()) is None
    assert infer_model_spec(nn.Sequential(nn.Linear(3, 4))) is None   # a model that is not an MLP


def test_export_command_from_checkpoint_and_run_folder(tmp_path):
    model = _mlp(0.9)
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    text = export_command(str(tmp_path / "ckpt.pt"), str(tmp_path / "a.st"))
    assert "dense fp32 state dict" in text and "0.weight" in text and "x" in text.splitlines()[-1]
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict()}, run / "checkpoint.pt")
    (run / "config.yaml").write_text("sparsity: {algorithm: static}\n")
    export_command(str(run), str(tmp_path / "b.st"), format="csr")
    assert_same_state(model, load_sparse(tmp_path / "b.st", MLP([20, 32, 16, 5])))
    assert read_sparse(tmp_path / "b.st").model_spec == {"name": "mlp", "sizes": [20, 32, 16, 5]}
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        export_command(str(tmp_path), str(tmp_path / "c.st"))
    torch.save({"optimizer": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no model state_dict"):
        export_command(str(tmp_path / "bad.pt"), str(tmp_path / "c.st"))


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        save_sparse(_mlp(0.5), tmp_path / "m.st", format="zip")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ errors

def _saved(tmp_path, sparsity=0.9, fmt="auto"):
    path = tmp_path / "m.st"
    save_sparse(_mlp(sparsity), path, format=fmt)
    return path


def _untouched(model: nn.Module):
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def check():
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(before[k], after[k]) for k in before)
    return check


@pytest.mark.parametrize("cut", [1, 100, 2000, "header"])
def test_truncated_file_is_a_clear_error_and_loads_nothing(tmp_path, cut):
    path = _saved(tmp_path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    data = data[: 8 + n // 2] if cut == "header" else data[:-cut]
    path.write_bytes(data)
    model = MLP([20, 32, 16, 5])
    check = _untouched(model)
    with pytest.raises(SparseFileError, match="truncated"):
        load_sparse(path, model)
    check()


def test_empty_and_foreign_files(tmp_path):
    (tmp_path / "empty.st").write_bytes(b"")
    with pytest.raises(SparseFileError, match="truncated"):
        read_sparse(tmp_path / "empty.st")
    st.save_file({"w": torch.ones(2)}, tmp_path / "plain.st")
    with pytest.raises(SparseFileError, match="not a fastsparse"):
        read_sparse(tmp_path / "plain.st")


def _rewrite(path, meta_change=None, tensor_change=None):
    raw = st.load_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(raw)
    st.save_file(raw, path, metadata=meta)


@pytest.mark.parametrize("version", ["3", "1", "0", "one"])
def test_wrong_version_is_a_clear_error(tmp_path, version):
    path = _saved(tmp_path)
    _rewrite(path, lambda m: m.update(format_version=version))
    model = MLP([20, 32, 16, 5])
    check = _untouched(model)
    with pytest.raises(SparseFileError, match="version"):
        load_sparse(path, model)
    check()


def test_wrong_shapes_are_a_clear_error_and_nothing_is_loaded(tmp_path):
    path = _saved(tmp_path)
    model = MLP([20, 32, 16, 6])                    # only the last layer differs
    check = _untouched(model)
    with pytest.raises(SparseFileError, match=r"4\.weight: shape \(5, 16\) in the file, \(6, 16\) in the model"):
        load_sparse(path, model)
    check()
    assert sparse_params(model) == []               # no mask registered either


def test_missing_unexpected_and_dtype_mismatch(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(SparseFileError, match="the model lacks: .*4.weight"):
        load_sparse(path, MLP([20, 32, 16]))
    bigger = MLP([20, 32, 16, 5])
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(SparseFileError, match="the file lacks .*extra.weight"):
        load_sparse(path, bigger)
    masked = MLP([20, 32, 16, 5])
    save_sparse(MLP([20, 32, 16, 5]), tmp_path / "dense.st")          # file without masks
    sparse.sparsify_model(masked, 0.5).remove()
    with pytest.raises(SparseFileError, match="lacks .*_mask"):
        load_sparse(tmp_path / "dense.st", masked)
    half = MLP([20, 32, 16, 5]).half()
    check = _untouched(half)
    with pytest.raises(SparseFileError, match="dtype"):
        load_sparse(path, half)
    check()


@pytest.mark.parametrize("damage", [
    ("csr", lambda raw: raw["0.weight::col"].__setitem__(0, 200), "column index out of range"),
    ("csr", lambda raw: raw["0.weight::crow"].__setitem__(-1, 3), "row pointers"),
    ("csr", lambda raw: raw.__setitem__("0.weight::values", raw["0.weight::values"][:-1]), "values|row pointers"),
    ("csr", lambda raw: raw["0.weight::col"].__setitem__(1, raw["0.weight::col"][0]), "increasing|range"),
    ("bitmask", lambda raw: raw.__setitem__("0.weight::values", raw["0.weight::values"][:-1]), "values"),
    ("bitmask", lambda raw: raw["0.weight::bits"].__setitem__(0, int(raw["0.weight::bits"][0]) ^ 1),
     "keeps"),
    ("bitmask", lambda raw: raw["0.weight::values"].__setitem__(0, 123.0), "checksum"),
    ("csr", lambda raw: raw["0.weight::values"].__setitem__(0, 123.0), "checksum"),
    ("bitmask", lambda raw: raw.__setitem__("0.weight::bits", raw["0.weight::bits"][:-1]), "bitmask"),
    ("bitmask", lambda raw: raw.pop("0.bias"), "missing"),
    ("bitmask", lambda raw: raw.__setitem__("stray", torch.ones(1)), "no metadata entry"),
])
def test_corrupt_arrays_are_detected_before_loading(tmp_path, damage):
    fmt, change, message = damage
    path = _saved(tmp_path, 0.9, fmt)
    _rewrite(path, tensor_change=change)
    model = MLP([20, 32, 16, 5])
    check = _untouched(model)
    with pytest.raises(SparseFileError, match=message):
        load_sparse(path, model)
    check()


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "m.st"
    save_sparse(_mlp(0.5), path)
    save_sparse(_mlp(0.9), path)
    assert os.listdir(tmp_path) == ["m.st"]
    assert read_sparse(path).entries[0]["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_non_tensor_state_is_refused(tmp_path):
    with pytest.raises(TypeError, match="not a tensor"):
        save_sparse({"w": torch.ones(2), "step": 3}, tmp_path / "m.st")
