"""Crafted compressed files (issue 13): every metadata field is checked against an allow-list before
it is used, the header's size and nesting are bounded before it is parsed, and the metadata is
covered by a checksum. Each crafted file is refused with one SparseFileError sentence, the model
untouched. The crafting helpers rewrite the checksum too (as an attacker would), so that each
check is shown to hold on its own; a few cases leave the checksum stale to show that it holds."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

pytest.importorskip("safetensors")

import fastsparse as sparse  # noqa: E402
from fastsparse.core.masks import sparse_params  # noqa: E402
from fastsparse.deploy import SparseFileError, bench_inference_command, load_sparse, read_sparse, save_sparse  # noqa: E402
from fastsparse.deploy import check as check_module  # noqa: E402
from fastsparse.deploy.check import metadata_checksum, _depth  # noqa: E402
from fastsparse.deploy import size_report  # noqa: E402
from fastsparse.experiments.models import MLP  # noqa: E402

SIZES = [20, 32, 16, 5]


def _model(seed=0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(SIZES)
    sparse.sparsify_model(model, 0.8, seed=seed).remove()
    return model


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "m.st"
    save_sparse(_model(), p, format="csr")
    return p


def _parts(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header, body, raw_header: bytes | None = None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + body)


def _edit(path, entries=None, meta=None, reseal=True):
    """Change the metadata (entries by name, or the metadata dict), recompute its checksum, write back."""
    header, body = _parts(path)
    m = header["__metadata__"]
    if entries is not None:
        listed = json.loads(m["tensors"])
        entries({e["name"]: e for e in listed})
        m["tensors"] = json.dumps(listed)
    if meta is not None:
        meta(m)
    if reseal:
        m["metadata_sha256"] = metadata_checksum(m)
    _write(path, header, body)


def _refused(path, *words, model=True):
    """load_sparse (into a fresh model, checked untouched) and read_sparse both refuse, with ``words``."""
    target = MLP(SIZES)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for call in ((lambda: load_sparse(path, target)), (lambda: read_sparse(path))) if model else \
            ((lambda: read_sparse(path)),):
        with pytest.raises(SparseFileError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message, message
        for w in words:
            assert w in message, message
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert sparse_params(target) == [], "a mask was registered from a refused file"


# --- masks must be their tensor's own ---------------------------------------------------------------
@pytest.mark.parametrize("mask", ["2.weight_mask", "4.weight_mask", "0.weight", "0.bias", "nope_mask", "", 3, None])
def test_a_mask_field_naming_anything_but_the_tensors_own_mask_is_refused(path, mask):
    _edit(path, entries=lambda e: e["0.weight"].update(mask=mask))
    _refused(path, "entry '0.weight' names the mask", "the mask of '0.weight' is '0.weight_mask'")


# --- shapes: bounded, consistent with the stored bytes ----------------------------------------------
@pytest.mark.parametrize("shape, words", [
    ([16, 10**12], "integers in [0, 2147483647]"),        # the CSR claim
    ([32, 2**40], "integers in [0, 2147483647]"),
    ([2**31 - 1] * 3, "elements; at most"),                # each dim allowed, the product not
    ([32, -20], "integers in [0, 2147483647]"),
    ([32, 20.0], "integers in [0, 2147483647]"),
    ([32, True], "integers in [0, 2147483647]"),
    ([[32], 20], "integers in [0, 2147483647]"),
    ("32x20", "integers in [0, 2147483647]"),
    ([1] * 9 + [640], "at most 8"),
    ([31, 20], "row pointers"),                            # in bounds, but not what the arrays hold
    ([32, 21], "do not match the file's weights"),          # the arrays allow it; the model spec does not
    ([33, 20], "row pointers"),
    ([640], "row pointers"),
])
def test_a_crafted_shape_is_refused_before_anything_is_allocated(path, shape, words):
    def change(e):
        e["0.weight"]["shape"] = shape
        try:   # the sparsity the new shape gives, so that the shape check itself is what refuses
            e["0.weight"]["sparsity"] = 1.0 - e["0.weight"]["nnz"] / int(torch.tensor(shape).prod())
        except (TypeError, ValueError, RuntimeError):
            pass
    _edit(path, entries=change)
    _refused(path, words)


def test_a_shape_in_bounds_that_decodes_past_this_machines_memory_is_refused(tmp_path):
    """A CSR entry's dense shape is not bounded by its stored bytes: 32 rows of 2^31 - 1 float64
    columns (512 GiB) must be refused, not allocated."""
    p = tmp_path / "w.st"
    w = torch.zeros(32, 4, dtype=torch.float64)
    w[0, 0] = 1.0
    save_sparse({"w": w, "w_mask": w != 0}, p, format="csr")
    _edit(p, entries=lambda e: e["w"].update(shape=[32, 2**31 - 1], sparsity=1.0 - 1 / (32 * (2**31 - 1))))
    with pytest.raises(SparseFileError, match="GiB of dense tensors, more than this machine's"):
        read_sparse(p)


def test_a_dense_entry_whose_shape_disagrees_with_its_stored_bytes_is_refused(path):
    _edit(path, entries=lambda e: e["0.bias"].update(shape=[31]))
    _refused(path, "entry '0.bias': stored as F32 [32], the metadata says float32 [31]")


# --- dtypes, counts, fields, names ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float33", "torch.float32", "F32", None, 5, "complex64"])
def test_a_wrong_dtype_name_is_refused(path, dtype):
    _edit(path, entries=lambda e: e["0.bias"].update(dtype=dtype))
    _refused(path, "entry '0.bias'")


@pytest.mark.parametrize("change, words", [
    (lambda e: e["0.weight"].update(nnz=-1), "keeps -1 values"),
    (lambda e: e["0.weight"].update(nnz=10**6), "keeps 1000000 values"),
    (lambda e: e["0.weight"].update(nnz=e["0.weight"]["nnz"] + 1, sparsity=e["0.weight"]["sparsity"] - 1 / 640),
     "values stored, the metadata says"),
    (lambda e: e["0.weight"].update(sparsity=0.5), "claims sparsity 0.5"),
    (lambda e: e["0.weight"].update(sparsity="0.8"), "claims sparsity 0.8"),
    (lambda e: e["0.weight"].update(crc32=-1), "no valid checksum"),
    (lambda e: e["0.weight"].update(crc32=2**32), "no valid checksum"),
    (lambda e: e["0.weight"].update(run="os.system('x')"), "has the wrong fields ['run']"),
    (lambda e: e["0.weight"].pop("nnz"), "has the wrong fields ['nnz']"),
    (lambda e: e["0.bias"].update(mask="0.bias_mask"), "has the wrong fields ['mask']"),
    (lambda e: e["0.weight"].update(kind="zip"), "unknown encoding 'zip'"),
    (lambda e: e["0.weight"].update(kind="dense"), "wrong fields"),
    (lambda e: e["0.bias"].update(name="0.bias::values"), "may not contain '::'"),
    (lambda e: e["0.bias"].update(name=""), "is not a mapping with a name"),
])
def test_every_entry_field_is_checked(path, change, words):
    _edit(path, entries=change)
    _refused(path, words)


def test_an_entry_that_is_not_a_mapping_is_refused(path):
    _edit(path, meta=lambda m: m.update(tensors=json.dumps(json.loads(m["tensors"]) + ["x"])))
    _refused(path, "is not a mapping with a name")


def test_unknown_metadata_fields_are_refused(path):
    _edit(path, meta=lambda m: m.update(loader="pickle"))
    _refused(path, "unknown metadata fields ['loader']")


# --- the metadata checksum ---------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    lambda m: m.update(tensors=m["tensors"].replace('"sparsity": 0.8', '"sparsity": 0.5', 1)),
    lambda m: m.update(model_spec=json.dumps({"name": "mlp", "sizes": [20, 32, 16, 6]})),
    lambda m: m.update(torch_version="0.0"),
    lambda m: m.pop("model_spec"),
])
def test_a_modified_metadata_field_fails_the_checksum(path, change):
    _edit(path, meta=change, reseal=False)
    _refused(path, "the metadata does not match its checksum")


def test_metadata_without_a_checksum_is_refused(path):
    _edit(path, meta=lambda m: m.pop("metadata_sha256"), reseal=False)
    _refused(path, "the metadata has no checksum")


# --- the header: size, nesting, lengths -------------------------------------------------------------
def test_a_deeply_nested_header_is_refused_before_parsing(path):
    header, body = _parts(path)
    raw = json.dumps(header).encode()
    deep = raw[:-1] + b', "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    _write(path, None, body, raw_header=deep)
    _refused(path, "the header nests 200001 levels deep; at most 32")


@pytest.mark.parametrize("field", ["tensors", "model_spec"])
def test_deeply_nested_metadata_json_is_refused_before_parsing(path, field):
    _edit(path, meta=lambda m: m.update({field: "[" * 100_000 + "]" * 100_000}))
    _refused(path, "nests 100000 levels deep")


def test_brackets_inside_strings_do_not_count():
    assert _depth(b'{"a": "[[[[[[{{{{", "b": [1, {"c": "]]]"}]}') == 3
    assert _depth(b'{"a": "\\"[[[["}') == 1


def test_a_header_over_the_size_bound_is_refused(path, monkeypatch):
    monkeypatch.setattr(check_module, "MAX_HEADER_BYTES", 100)
    _refused(path, "at most 100 are allowed")


@pytest.mark.parametrize("cut", ["header", "length"])
def test_a_truncated_header_is_refused(path, cut):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:5] if cut == "length" else data[:8 + n // 3])
    _refused(path, "truncated")


@pytest.mark.parametrize("claim", [lambda n, size: size, lambda n, size: 2**63, lambda n, size: 2**64 - 1])
def test_a_header_claiming_more_bytes_than_the_file_has_is_refused(path, claim):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(claim(n, len(data)).to_bytes(8, "little") + data[8:])
    _refused(path, "truncated or not a safetensors file: its header claims")


def test_stored_tensors_whose_data_overlap_are_refused(path):
    header, body = _parts(path)
    a, b = "0.bias", "2.bias"
    assert header[a]["shape"] != header[b]["shape"]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    header[b]["shape"] = header[a]["shape"]
    _write(path, header, body)
    _refused(path, "overlap or leave gaps")


@pytest.mark.parametrize("change, words", [
    (lambda h: h["0.bias"].update(dtype="F128"), "unsupported dtype 'F128'"),
    (lambda h: h["0.bias"].update(shape=[-32]), "integers in [0, 2147483647]"),
    (lambda h: h["0.bias"].update(data_offsets=[0]), "corrupt data offsets"),
    (lambda h: h["0.bias"].update(extra=1), "corrupt header entry"),
    (lambda h: h.update({"__metadata__": {"format": 1}}), "not a mapping of strings to strings"),
    (lambda h: h["0.bias"].update(shape=[16]), "its offsets span 128 bytes, its shape and dtype need 64"),
])
def test_a_crafted_safetensors_header_entry_is_refused(path, change, words):
    header, body = _parts(path)
    change(header)
    _write(path, header, body)
    _refused(path, words)


# --- the model spec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{"name": "mlp", "sizes": [20, 10**9, 16, 5]}, {"name": "mlp", "sizes": [20, -32]},
                                  {"name": "mlp", "sizes": "20,32"}, {"name": "mlp", "sizes": [20, 32, 16, 6]}, [1, 2]])
def test_a_model_spec_that_does_not_match_the_file_is_refused_before_a_model_is_built(path, spec):
    _edit(path, meta=lambda m: m.update(model_spec=json.dumps(spec)))
    with pytest.raises(SparseFileError, match="model spec"):
        bench_inference_command(str(path), [1])
    _refused(path, "model spec")


def test_an_intact_file_still_loads_and_reports(path):
    model = load_sparse(path, MLP(SIZES))
    assert len(sparse_params(model)) == 3
    assert "0.weight" in str(size_report(path))


# --- file permissions follow the umask (issue 13, lenient inputs) ------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_exported_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_sparse(_model(), tmp_path / "m.st")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.st").stat().st_mode) == mode
    assert os.listdir(tmp_path) == ["m.st"]
