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
import struct
import tempfile
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT_VERSION", "SparseFileError", "save_sparse", "load_sparse", "read_sparse",
    "size_report", "SizeReport", "SizeRow", "SparseFile", "export_command", "infer_model_spec",
    "build_model", "encoded_bytes", "pack_bits", "unpack_bits",
]

FORMAT_VERSION = 1
FORMAT_NAME = "fastsparse-sparse"
FORMATS = ("auto", "bitmask", "csr")
_MASK_SUFFIX = "_mask"
_SEP = "::"
_KINDS = ("dense", "bitmask", "csr", "dense_masked")
_KEY_PARTS = {
    "dense": ("data",),
    "bitmask": ("bits", "values"),
    "csr": ("crow", "col", "values"),
    "dense_masked": ("data", "bits"),
}
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                 "int8", "uint8", "bool", "complex64", "complex128")
    if hasattr(torch, name)
}
_CROW_DTYPES = (torch.int16, torch.int32, torch.int64)
_COL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_ST_DTYPES = {  # safetensors header names -> torch dtypes
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SparseFileError(ValueError):
    """A sparse checkpoint that is truncated, corrupt, of an unknown version or does not fit the model."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("compressed export needs safetensors: pip install 'fastsparse[export]'") from e
    return st


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(name: str, part: str) -> str:
    return name if part == "data" else f"{name}{_SEP}{part}"


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view CSR uses: (shape[0], prod(shape[1:])); a 0-D or 1-D tensor is one row."""
    if len(shape) <= 1:
        return 1, int(math.prod(shape))
    return int(shape[0]), int(math.prod(shape[1:]))


def _crow_dtype(nnz: int) -> torch.dtype:
    if nnz <= 32767:
        return torch.int16
    return torch.int32 if nnz <= 2**31 - 1 else torch.int64


def _col_dtype(cols: int) -> torch.dtype:
    if cols <= 256:
        return torch.uint8
    if cols <= 32768:
        return torch.int16
    return torch.int32 if cols <= 2**31 else torch.int64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def encoded_bytes(shape: tuple[int, ...], nnz: int, dtype: torch.dtype, fmt: str) -> int:
    """Bytes of tensor data a masked tensor takes under ``fmt`` (``bitmask`` or ``csr``)."""
    n = int(math.prod(shape))
    value_bytes = nnz * _itemsize(dtype)
    if fmt == "bitmask":
        return (n + 7) // 8 + value_bytes
    rows, cols = _matrix_shape(shape)
    return (rows + 1) * _itemsize(_crow_dtype(nnz)) + nnz * _itemsize(_col_dtype(cols)) + value_bytes


# ---------------------------------------------------------------------------------- bits

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Flat bool tensor -> uint8 tensor of ``ceil(n / 8)`` bytes; element 8j+i is bit i of byte j."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS) & 1
    return bits.reshape(-1)[:n].bool()


def _crc32(parts: Iterable[Tensor]) -> int:
    """CRC-32 of the bytes of ``parts`` in order (detects corruption the structure checks cannot)."""
    crc = 0
    for t in parts:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(memoryview(data), crc)
    return crc


# -------------------------------------------------------------------------------- encode

def _find_masks(state: Mapping[str, Tensor]) -> dict[str, str]:
    """{tensor name: mask name} for every bool ``<name>_mask`` entry of ``<name>``'s shape."""
    pairs = {}
    for key, mask in state.items():
        if not key.endswith(_MASK_SUFFIX) or not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            continue
        target = key[: -len(_MASK_SUFFIX)]
        t = state.get(target)
        if isinstance(t, Tensor) and t.shape == mask.shape and t.dtype != torch.bool:
            pairs[target] = key
    return pairs


def _encode_masked(name: str, value: Tensor, mask: Tensor, fmt: str) -> tuple[dict, dict[str, Tensor]]:
    value = value.detach().cpu().contiguous()
    mask = mask.detach().cpu().contiguous()
    shape = tuple(value.shape)
    n = value.numel()
    nnz = int(mask.sum())
    entry: dict[str, Any] = {
        "shape": list(shape), "dtype": _dtype_name(value.dtype), "nnz": nnz,
        "sparsity": (1.0 - nnz / n) if n else 0.0,
    }
    outside = int(torch.count_nonzero(value.masked_select(~mask))) if n else 0
    if outside:
        warnings.warn(
            f"{name} has {outside} nonzero weights outside its mask (masks not enforced?); "
            "it is stored dense with its packed mask so that nothing is lost. Apply the masks "
            "(fastsparse.apply_masks) before exporting to store it compressed.", stacklevel=3)
        entry["kind"] = "dense_masked"
        return entry, {_key(name, "data"): value.clone(), _key(name, "bits"): pack_bits(mask)}
    if fmt == "auto":
        fmt = min(("bitmask", "csr"), key=lambda f: encoded_bytes(shape, nnz, value.dtype, f))
    entry["kind"] = fmt
    values = value.reshape(-1).masked_select(mask.reshape(-1))
    if fmt == "bitmask":
        return entry, {_key(name, "bits"): pack_bits(mask), _key(name, "values"): values}
    rows, cols = _matrix_shape(shape)
    m2 = mask.reshape(rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(m2.sum(1), 0, out=crow[1:])
    col = m2.nonzero()[:, 1]
    return entry, {
        _key(name, "crow"): crow.to(_crow_dtype(nnz)),
        _key(name, "col"): col.to(_col_dtype(cols)),
        _key(name, "values"): values,
    }


def _state_of(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    if isinstance(model_or_state, Mapping):
        return model_or_state
    raise TypeError(f"save_sparse needs a model or a state_dict, got {type(model_or_state).__name__}")


def infer_model_spec(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict | None:
    """``{"name": "mlp", "sizes": [...]}`` when the model is (or the state_dict has the layout
    of) :class:`fastsparse.experiments.models.MLP`: Linear layers with biases at indices 0, 2, 4, ...
    whose shapes chain; ``None`` otherwise."""
    if isinstance(model_or_state, nn.Module):
        from ..experiments.models import MLP
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
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastsparse-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"format_version": FORMAT_VERSION, "tensors": entries, "model_spec": model_spec}


# ---------------------------------------------------------------------------------- read

def _read_header(path: str) -> tuple[dict, dict]:
    """The safetensors header ({key: {dtype, shape, data_offsets}}) and metadata, checked
    against the file's length so that a truncated file is reported as such."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SparseFileError(f"cannot read {path}: {e}") from e
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SparseFileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SparseFileError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                f"the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseFileError(f"{path} has a corrupt header (not JSON): {e}") from e
    if not isinstance(header, dict):
        raise SparseFileError(f"{path} has a corrupt header")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for key, info in header.items():
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise SparseFileError(f"{path}: corrupt header entry for {key!r}") from e
        end = max(end, int(stop))
    if 8 + n + end != size:
        raise SparseFileError(
            f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}")
    return header, meta


def _read_metadata(path: str) -> tuple[dict, dict, list[dict], dict | None]:
    header, meta = _read_header(path)
    if meta.get("format") != FORMAT_NAME:
        raise SparseFileError(
            f"{path} is a safetensors file but not a fastsparse sparse checkpoint "
            f"(metadata format={meta.get('format')!r}); write one with fastsparse.save_sparse")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as e:
        raise SparseFileError(f"{path}: format_version {meta.get('format_version')!r} is not an integer") from e
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise SparseFileError(
            f"{path} has format version {version}, written by {newer} fastsparse; "
            f"this one reads version {FORMAT_VERSION}")
    try:
        entries = json.loads(meta["tensors"])
        spec = json.loads(meta["model_spec"]) if "model_spec" in meta else None
    except (KeyError, json.JSONDecodeError) as e:
        raise SparseFileError(f"{path}: corrupt metadata ({e})") from e
    if not isinstance(entries, list):
        raise SparseFileError(f"{path}: corrupt metadata (tensors is not a list)")
    return header, meta, entries, spec


def _check_entry(path: str, e: Any, header: dict) -> None:
    where = f"{path}: entry {e.get('name')!r}" if isinstance(e, dict) else f"{path}: entry {e!r}"
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise SparseFileError(f"{where} is malformed")
    if e.get("kind") not in _KINDS:
        raise SparseFileError(f"{where} has unknown encoding {e.get('kind')!r}")
    if e.get("dtype") not in _DTYPES:
        raise SparseFileError(f"{where} has unknown dtype {e.get('dtype')!r}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SparseFileError(f"{where} has a malformed shape {shape!r}")
    if not isinstance(e.get("crc32"), int):
        raise SparseFileError(f"{where} has no checksum")
    if e["kind"] != "dense" and not isinstance(e.get("mask"), str):
        raise SparseFileError(f"{where} names no mask")
    for part in _KEY_PARTS[e["kind"]]:
        if _key(e["name"], part) not in header:
            raise SparseFileError(f"{where}: tensor {_key(e['name'], part)!r} is missing from the file")


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
    header, _, entries, spec = _read_metadata(path)
    for e in entries:
        _check_entry(path, e, header)
    names = [e["name"] for e in entries] + [e["mask"] for e in entries if e["kind"] != "dense"]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise SparseFileError(f"{path}: names stored twice: {dup}")
    used = {_key(e["name"], p) for e in entries for p in _KEY_PARTS[e["kind"]]}
    extra = sorted(set(header) - used)
    if extra:
        raise SparseFileError(f"{path}: tensors no metadata entry describes (corrupt): {extra[:5]}")
    for key, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise SparseFileError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    st = _safetensors()
    try:
        raw = st.load_file(path)
    except Exception as e:  # safetensors raises its own error type for every corruption
        raise SparseFileError(f"{path} is truncated or corrupt: {e}") from e
    state: OrderedDict[str, Tensor] = OrderedDict()
    for e in entries:
        state.update(_decode(path, e, raw))
    masks = {e["name"]: e["mask"] for e in entries if e["kind"] != "dense"}
    return SparseFile(state, entries, spec, FORMAT_VERSION, masks)


# ---------------------------------------------------------------------------------- load

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
    sf = read_sparse(path)
    own = model.state_dict(keep_vars=True)
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
        raise SparseFileError(f"{path} does not fit the model (nothing was loaded):\n  " + "\n  ".join(problems))
    for key, target in own.items():
        target.copy_(sf.state_dict[key])
    for mask_name, module, buf, param in new_masks:
        module.register_buffer(buf, sf.state_dict[mask_name].to(param.device), persistent=True)
    return model


# ---------------------------------------------------------------------------------- size

@dataclass
class SizeRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    sparsity: float | None
    dense_fp32_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_fp32_bytes if self.dense_fp32_bytes else float("nan")


@dataclass
class SizeReport:
    """Per tensor: bytes in the file against the same tensor dense in fp32 (masks are not
    part of a dense model, so they count only on the file side)."""

    path: str
    rows: list[SizeRow]
    file_bytes: int

    @property
    def dense_fp32_bytes(self) -> int:
        return sum(r.dense_fp32_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.dense_fp32_bytes if self.dense_fp32_bytes else float("nan")

    def __str__(self) -> str:
        head = f"{'tensor':<32} {'stored as':<12} {'shape':<18} {'sparsity':>8} {'dense fp32':>12} {'in file':>12} {'ratio':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            sp = f"{r.sparsity:.1%}" if r.sparsity is not None else "-"
            lines.append(f"{r.name:<32} {r.kind:<12} {str(list(r.shape)):<18} {sp:>8} "
                         f"{_human(r.dense_fp32_bytes):>12} {_human(r.stored_bytes):>12} {r.ratio:>6.3f}x")
        lines.append("-" * len(head))
        lines.append(f"file {self.path}: {_human(self.file_bytes)} ({self.file_bytes} bytes, header included) "
                     f"vs dense fp32 state dict {_human(self.dense_fp32_bytes)} "
                     f"({self.dense_fp32_bytes} bytes): {self.ratio:.3f}x")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def size_report(path: str | os.PathLike) -> SizeReport:
    """Bytes per tensor in a file written by :func:`save_sparse` against dense fp32
    (floating tensors at 4 bytes per element, integer buffers at their own size)."""
    path = os.fspath(path)
    header, _, entries, _ = _read_metadata(path)
    rows = []
    for e in entries:
        _check_entry(path, e, header)
        numel = int(math.prod(e["shape"]))
        dtype = _DTYPES[e["dtype"]]
        per = 8 if dtype.is_complex else 4 if dtype.is_floating_point else _itemsize(dtype)
        stored = 0
        for part in _KEY_PARTS[e["kind"]]:
            start, stop = header[_key(e["name"], part)]["data_offsets"]
            stored += int(stop) - int(start)
        rows.append(SizeRow(e["name"], e["kind"], tuple(e["shape"]), e.get("sparsity"), numel * per, stored))
    return SizeReport(path, rows, os.path.getsize(path))


# ------------------------------------------------------------------------ command line

def _load_checkpoint_state(source: str) -> Mapping[str, Tensor]:
    if os.path.isdir(source):
        ckpt = os.path.join(source, "checkpoint.pt")
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{source} is a folder without checkpoint.pt; pass a run folder or a checkpoint file")
        source = ckpt
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such checkpoint: {source}")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {source} as a torch checkpoint: {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} holds no model state_dict (expected a dict with the key 'model', "
                         "or a state_dict itself)")
    return obj


def export_command(source: str, out: str, format: str = "auto",
                   model_spec: Mapping[str, Any] | None = None) -> str:
    """``fastsparse export``: write ``source``'s model state_dict to ``out`` compressed and
    return the size report (per tensor, and the file against the dense fp32 state dict).

    ``source`` is a checkpoint saved with ``torch.save({"model": state_dict, ...})`` (or a
    bare state_dict), or a run folder holding such a ``checkpoint.pt``. No model is built:
    the masks are read from the state_dict's ``<name>_mask`` entries. The MLP layout is
    recognised and recorded as the model spec unless ``model_spec`` is given.
    """
    state = _load_checkpoint_state(os.fspath(source))
    save_sparse(state, out, format=format, model_spec=model_spec)
    report = size_report(out)
    n_masked = sum(1 for r in report.rows if r.kind != "dense")
    return (f"exported {source} -> {out} (format {format}; {n_masked} masked tensors compressed, "
            f"{len(report.rows) - n_masked} stored dense)\n{report}")


def build_model(spec: Mapping[str, Any] | None) -> nn.Module | None:
    """The model a spec describes (today: ``{"name": "mlp", "sizes": [...]}``), else ``None``."""
    if not spec or spec.get("name") != "mlp":
        return None
    sizes = spec.get("sizes")
    if not isinstance(sizes, list) or len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise SparseFileError(f"model spec {dict(spec)!r} has no valid 'sizes'")
    from ..experiments.models import MLP
    return MLP(sizes)

