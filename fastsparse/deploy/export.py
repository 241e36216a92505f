"""Compressed sparse checkpoints: safetensors files a sparse model really is small in.

Every tensor that has a mask (a bool ``<name>_mask`` entry of its shape in the state_dict,
see :mod:`fastsparse.core.masks`) is stored as the mask's pattern plus the values under it,
in one of two encodings:

``bitmask``
    the mask packed 8 entries per byte (``ceil(n / 8)`` bytes, little-endian bit order)
    plus the kept values in row-major order;
``csr``
    the tensor viewed as ``(shape[0], prod(shape[1:]))``: row pointers (int16, int32 or
    int64, the smallest that holds the number of kept values), column indices (uint8
    where a row has at most 256 columns, int16 up to 32768, else int32) and the values.

``format="auto"`` picks, per tensor, whichever is smaller; every other tensor is stored
dense. The metadata (JSON strings, as safetensors requires) records the format version,
every tensor's shape, dtype, encoding and sparsity, and optionally a model spec such as
``{"name": "mlp", "sizes": [784, 300, 100, 10]}`` from which a model can be rebuilt.

What is stored is exactly the state_dict, bit for bit, with one documented exception:
a weight outside its mask is zero, and its sign is not stored (a masked ``-0.0`` comes
back as ``+0.0``; the two compare equal, and keeping the sign would cost one more bit
per weight). A masked tensor that has nonzero weights outside its mask (masks not
enforced) is stored dense with its packed mask, with a warning, so nothing is lost.

:func:`load_sparse` checks the whole file (version, every key, shapes, dtypes, index
ranges, lengths, and a CRC-32 of every tensor's stored bytes) and its fit to the model before it writes anything into the model.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..core.nets import MLP
from ..core.sparse_linear import dense_state_dict
from .check import metadata_checksum, read_checked
from .format import (
    FORMAT_NAME, FORMAT_VERSION, FORMATS, SparseFileError, _COL_DTYPES, _CROW_DTYPES, _DTYPES, _KEY_PARTS,
    _MASK_SUFFIX, _SEP, _SHIFTS, _crc32, _dtype_name, _encode_masked, _find_masks, _key, _matrix_shape,
    _safetensors,
)

__all__ = ["save_sparse", "load_sparse", "read_sparse", "SparseFile", "infer_model_spec", "SparseFileError",
           "FORMAT_VERSION"]


def _state_of(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dense_state_dict(model_or_state)   # sparse-executed layers as masked Linear weights
    if isinstance(model_or_state, Mapping):
        return model_or_state
    raise TypeError(f"save_sparse needs a model or a state_dict, got {type(model_or_state).__name__}")


def infer_model_spec(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict | None:
    """``{"name": "mlp", "sizes": [...]}`` when the model is (or the state_dict has the layout
    of) :class:`fastsparse.experiments.models.MLP`: Linear layers with biases at indices 0, 2, 4, ...
    whose shapes chain; ``None`` otherwise."""
    if isinstance(model_or_state, nn.Module):
        if not isinstance(model_or_state, MLP):
            return None
    state = _state_of(model_or_state)
    masks = set(_find_masks(state).values())
    keys = [k for k in state if k not in masks]
    n_layers = len(keys) // 2
    if n_layers == 0 or len(keys) != 2 * n_layers:
        return None
    expected = [f"{2 * i}.{p}" for i in range(n_layers) for p in ("weight", "bias")]
    if sorted(keys) != sorted(expected):
        return None
    sizes = []
    for i in range(n_layers):
        w, b = state[f"{2 * i}.weight"], state[f"{2 * i}.bias"]
        if w.dim() != 2 or b.shape != (w.shape[0],) or (sizes and sizes[-1] != w.shape[1]):
            return None
        if not sizes:
            sizes.append(int(w.shape[1]))
        sizes.append(int(w.shape[0]))
    return {"name": "mlp", "sizes": sizes}


def save_sparse(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    format: str = "auto",
    model_spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s state_dict (or a state_dict) to ``path`` as a compressed safetensors file.

    ``format``: ``"auto"`` (per tensor, the smaller of bitmask and CSR), ``"bitmask"`` or
    ``"csr"``. ``model_spec``: a JSON-serialisable description of the model stored in the
    metadata (inferred for :class:`fastsparse.experiments.models.MLP`). The file is written to a
    temporary name and renamed, so a crash never leaves a half-written file at ``path``.
    Returns the metadata that was written (decoded).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {list(FORMATS)}")
    st = _safetensors()
    state = _state_of(model)
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor; "
                            "only tensors can be stored in a safetensors file")
        if t.layout != torch.strided:
            raise TypeError(f"state_dict entry {key!r} has layout {t.layout}; only dense tensors can be stored")
        if t.dtype not in _DTYPES.values():
            raise TypeError(f"state_dict entry {key!r} has dtype {t.dtype}, which this format does not store")
        if _SEP in key:
            raise ValueError(f"state_dict key {key!r} contains {_SEP!r}, which the file format reserves")
    if model_spec is None:
        model_spec = infer_model_spec(model)
    pairs = _find_masks(state)
    mask_names = set(pairs.values())
    entries, tensors = [], OrderedDict()
    for name, t in state.items():
        if name in mask_names:
            continue
        if name in pairs:
            entry, stored = _encode_masked(name, t, state[pairs[name]], format)
            entry["mask"] = pairs[name]
        else:
            entry = {"kind": "dense", "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
            stored = {name: t.detach().cpu().contiguous().clone()}
        entry = {"name": name, **entry, "crc32": _crc32(stored.values())}
        entries.append(entry)
        tensors.update(stored)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "torch_version": torch.__version__,
        "tensors": json.dumps(entries),
    }
    if model_spec is not None:
        metadata["model_spec"] = json.dumps(dict(model_spec))
    metadata["metadata_sha256"] = metadata_checksum(metadata)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastsparse-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())   # what open() would give; mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"format_version": FORMAT_VERSION, "tensors": entries, "model_spec": model_spec}


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------- read

def _fail(path: str, name: str, msg: str):
    raise SparseFileError(f"{path}: {name}: {msg}")


def _decode(path: str, e: dict, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """{name: tensor} (plus {mask name: mask}) from one entry, after checking every array."""
    out = _decode_checked(path, e, raw)
    parts = [raw[_key(e["name"], part)] for part in _KEY_PARTS[e["kind"]]]
    if _crc32(parts) != e.get("crc32"):
        _fail(path, e["name"], "checksum mismatch: the stored data is corrupt")
    return out


def _decode_checked(path: str, e: dict, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    name, kind = e["name"], e["kind"]
    dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
    n = int(math.prod(shape))
    get = {part: raw[_key(name, part)] for part in _KEY_PARTS[kind]}
    if "data" in get:
        data = get["data"]
        if data.dtype != dtype or tuple(data.shape) != shape:
            _fail(path, name, f"stored as {data.dtype} {tuple(data.shape)}, the metadata says {dtype} {shape}")
    if "values" in get:
        values = get["values"]
        if values.dtype != dtype or values.dim() != 1:
            _fail(path, name, f"values are {values.dtype} of shape {tuple(values.shape)}, expected a 1-D {dtype}")
        nnz = values.numel()
        if e.get("nnz", nnz) != nnz or nnz > n:
            _fail(path, name, f"{nnz} stored values, the metadata says {e.get('nnz')} of {n}")
    if "bits" in get:
        bits = get["bits"]
        if bits.dtype != torch.uint8 or tuple(bits.shape) != ((n + 7) // 8,):
            _fail(path, name, f"bitmask is {bits.dtype} {tuple(bits.shape)}, expected uint8 ({(n + 7) // 8},)")
        full = ((bits.reshape(-1, 1) >> _SHIFTS) & 1).reshape(-1).bool()
        if bool(full[n:].any()):
            _fail(path, name, "bitmask has bits set past the tensor's end (corrupt)")
        mask = full[:n]
        if kind == "bitmask" and int(mask.sum()) != values.numel():
            _fail(path, name, f"bitmask keeps {int(mask.sum())} entries, {values.numel()} values are stored")
    if kind == "dense":
        return {name: data}
    if kind == "dense_masked":
        return {name: data, e["mask"]: mask.view(shape)}
    if kind == "bitmask":
        out = torch.zeros(n, dtype=dtype)
        out[mask] = values
        return {name: out.view(shape), e["mask"]: mask.view(shape)}
    # csr
    rows, cols = _matrix_shape(shape)
    crow, col = get["crow"], get["col"]
    if crow.dtype not in _CROW_DTYPES or tuple(crow.shape) != (rows + 1,):
        _fail(path, name, f"row pointers are {crow.dtype} {tuple(crow.shape)}, expected an integer ({rows + 1},)")
    if col.dtype not in _COL_DTYPES or tuple(col.shape) != (nnz,):
        _fail(path, name, f"column indices are {col.dtype} {tuple(col.shape)}, expected an integer ({nnz},)")
    crow, col = crow.long(), col.long()
    counts = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        _fail(path, name, "row pointers do not run from 0 to the number of values without decreasing (corrupt)")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        _fail(path, name, f"column index out of range [0, {cols}) (corrupt)")
    row = torch.repeat_interleave(torch.arange(rows), counts)
    if nnz > 1:
        same_row = row[1:] == row[:-1]
        if bool((col[1:] <= col[:-1])[same_row].any()):
            _fail(path, name, "column indices are not strictly increasing within a row (corrupt)")
    flat_index = row * cols + col
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flat_index] = True
    out = torch.zeros(n, dtype=dtype)
    out[flat_index] = values
    return {name: out.view(shape), e["mask"]: mask.view(shape)}


@dataclass
class SparseFile:
    """What :func:`read_sparse` returns: the state_dict (masks included) and the metadata."""

    state_dict: "OrderedDict[str, Tensor]"
    entries: list[dict]
    model_spec: dict | None
    format_version: int = FORMAT_VERSION
    masks: dict[str, str] = field(default_factory=dict)  # tensor name -> mask name


def read_sparse(path: str | os.PathLike) -> SparseFile:
    """Read and fully check a file written by :func:`save_sparse`; no model needed."""
    path = os.fspath(path)
    return _decode_file(path, read_checked(path))


def _decode_file(path: str, checked) -> SparseFile:
    st = _safetensors()
    try:
        raw = st.load_file(path)
    except Exception as e:  # safetensors raises its own error type for every corruption
        raise SparseFileError(f"{path} is truncated or corrupt: {str(e).splitlines()[0][:200] if str(e) else e}") \
            from None
    state: OrderedDict[str, Tensor] = OrderedDict()
    for e in checked.entries:
        try:
            state.update(_decode(path, e, raw))
        except (RuntimeError, MemoryError) as err:   # an allocation the machine cannot make
            raise SparseFileError(f"{path}: {e['name']}: cannot be decoded here ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:120]})") from None
    masks = {e["name"]: e["mask"] for e in checked.entries if e["kind"] != "dense"}
    return SparseFile(state, checked.entries, checked.model_spec, FORMAT_VERSION, masks)


# ---------------------------------------------------------------------------------- load

def _check_fit_by_metadata(path: str, entries: list[dict], own: Mapping[str, Tensor]) -> None:
    """Shapes and dtypes the file claims against the model, before a tensor is decoded (a crafted
    shape never reaches an allocation)."""
    wrong = []
    for e in entries:
        shape, dtype = tuple(e["shape"]), _DTYPES[e["dtype"]]
        for name, want in ((e["name"], dtype), (e.get("mask"), torch.bool)):
            target = own.get(name) if name is not None else None
            if target is None:
                continue   # a key the model lacks: reported after decoding, with the full lists
            if tuple(target.shape) != shape:
                wrong.append(f"{name}: shape {shape} in the file, {tuple(target.shape)} in the model")
            elif target.dtype != want:
                wrong.append(f"{name}: dtype {want} in the file, {target.dtype} in the model")
    if wrong:
        raise SparseFileError(f"{path} does not fit the model (nothing was loaded): " + "; ".join(wrong[:4]))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


@torch.no_grad()
def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Restore weights, masks and buffers from ``path`` into ``model``, bit for bit.

    ``model`` may be sparsified already (its masks are overwritten in place) or not (mask
    buffers are registered on the modules that own the masked parameters). The file must
    fit the model exactly: the same state_dict keys (masks aside), shapes and dtypes.
    Everything is checked before the first tensor is copied; on any error the model is
    left untouched and a :class:`SparseFileError` says what is wrong. Returns ``model``.
    """
    path = os.fspath(path)
    checked = read_checked(path)
    own = model.state_dict(keep_vars=True)
    _check_fit_by_metadata(path, checked.entries, own)
    sf = _decode_file(path, checked)
    masks_in_file = set(sf.masks.values())
    new_masks = []
    problems = []
    for mask_name in sorted(masks_in_file - set(own)):
        target = mask_name[: -len(_MASK_SUFFIX)]
        if target not in own:
            continue  # reported below as a key the model lacks
        try:
            module, attr = _owner(model, target)
        except AttributeError:
            problems.append(f"cannot find the module owning {target}")
            continue
        if attr not in module._parameters and attr not in module._buffers:
            problems.append(f"{target} is not a parameter or buffer of its module")
            continue
        new_masks.append((mask_name, module, attr + _MASK_SUFFIX, own[target]))
    expected = set(own) | {m for m, *_ in new_masks}
    missing = sorted(expected - set(sf.state_dict))
    unexpected = sorted(set(sf.state_dict) - expected)
    if missing:
        problems.append(f"the file lacks {len(missing)} entries the model has: {missing[:8]}")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} entries the model lacks: {unexpected[:8]}")
    for key, value in sf.state_dict.items():
        target = own.get(key)
        if target is None:
            continue
        if tuple(target.shape) != tuple(value.shape):
            problems.append(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model")
        elif target.dtype != value.dtype:
            problems.append(f"{key}: dtype {value.dtype} in the file, {target.dtype} in the model")
    if problems:
        raise SparseFileError(f"{path} does not fit the model (nothing was loaded): " + "; ".join(problems))
    for key, target in own.items():
        target.copy_(sf.state_dict[key])
    for mask_name, module, buf, param in new_masks:
        module.register_buffer(buf, sf.state_dict[mask_name].to(param.device), persistent=True)
    return model


# ---------------------------------------------------------------------------------- size
