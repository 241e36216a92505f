"""The compressed file format of fastsparse: encodings, checksums, errors (see :mod:`.export`)."""
from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "FORMAT_NAME", "FORMATS", "SparseFileError", "encoded_bytes", "pack_bits",
           "unpack_bits"]

FORMAT_VERSION = 2   # 2: the metadata carries metadata_sha256
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
