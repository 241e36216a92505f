"""Checking a compressed file before anything is built from it: the safetensors header and our
metadata, field by field, against an allow-list (see :mod:`.export` for the format).

Nothing in the file is trusted until it is checked:

- the header length is at most 100 MB and within the file; its JSON (and every JSON string in
  the metadata) nests at most 32 levels, checked on the raw text before ``json.loads``;
- every stored tensor has a known dtype, a bounded shape and offsets that tile the data exactly;
- the metadata is covered by a SHA-256 (``metadata_sha256``) of its other fields;
- every entry has exactly the allowed keys: a name that is a plain key (no ``::``), a known
  encoding and dtype, a shape of at most 8 dims, each in [0, 2^31), of at most 2^36 elements,
  consistent with the stored arrays' lengths; its mask is ``<name>_mask`` (never another entry);
  ``nnz`` and ``sparsity`` agree with each other and with the stored values;
- an ``mlp`` model spec has sizes that match the file's weights;
- the dense tensors the file decodes to fit in this machine's memory (a CSR entry's shape is not
  bounded by its stored bytes: a crafted one could otherwise claim terabytes).

Each failure is one :class:`SparseFileError` sentence; nothing has been allocated from the file's
numbers by then.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .format import (
    FORMAT_NAME, FORMAT_VERSION, SparseFileError, _DTYPES, _KEY_PARTS, _KINDS, _MASK_SUFFIX, _SEP, _ST_DTYPES, _key,
    _matrix_shape,
)

__all__ = ["MAX_HEADER_BYTES", "MAX_DEPTH", "MAX_NUMEL", "metadata_checksum", "CheckedFile", "read_checked"]

MAX_HEADER_BYTES = 100_000_000   # safetensors' own bound
MAX_DEPTH = 32
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_NUMEL = 2**36
_CHECKSUM_KEY = "metadata_sha256"
_ENTRY_KEYS = {"dense": {"name", "kind", "shape", "dtype", "crc32"},
               "masked": {"name", "kind", "shape", "dtype", "crc32", "nnz", "sparsity", "mask"}}
_META_KEYS = {"format", "format_version", "torch_version", "tensors", "model_spec", _CHECKSUM_KEY}
_ITEMSIZE = {name: torch.empty((), dtype=d).element_size() for name, d in _ST_DTYPES.items()}
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def metadata_checksum(meta: dict[str, str]) -> str:
    """SHA-256 of every metadata field but the checksum itself (sorted, as JSON)."""
    rest = {k: v for k, v in meta.items() if k != _CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _depth(raw: bytes) -> int:
    """How deep ``[`` and ``{`` nest in JSON text, strings left out (no recursion, no Python loop)."""
    brackets = re.sub(rb"[^\[\]{}]", b"", _STRINGS.sub(b"", raw))
    if not brackets:
        return 0
    t = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    step = (t == ord("[")).to(torch.int64) + (t == ord("{")).to(torch.int64) - (t == ord("]")).to(torch.int64) \
        - (t == ord("}")).to(torch.int64)
    return int(step.cumsum(0).max())


def _json(path: str, raw: bytes | str, what: str) -> Any:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth = _depth(data)
    if depth > MAX_DEPTH:
        raise SparseFileError(f"{path}: the {what} nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise SparseFileError(f"{path}: the {what} is not valid JSON ({str(e)[:120]})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(path: str, where: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape):
        raise SparseFileError(f"{where} has the shape {str(shape)[:80]}; a shape is a list of at most {MAX_DIMS} "
                              f"integers in [0, {MAX_DIM}]")
    if math.prod(shape) > MAX_NUMEL:
        raise SparseFileError(f"{where} has the shape {shape} of {math.prod(shape):,} elements; at most "
                              f"{MAX_NUMEL:,} are allowed")
    return tuple(shape)


def _read_header(path: str) -> tuple[dict, dict]:
    """The safetensors header ({key: {dtype, shape, data_offsets}}, each checked) and the metadata."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SparseFileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SparseFileError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                      f"the file has {size - 8} after the length field")
            if n > MAX_HEADER_BYTES:
                raise SparseFileError(f"{path}: its header claims {n:,} bytes; at most {MAX_HEADER_BYTES:,} are allowed")
            raw = f.read(n)
    except OSError as e:
        raise SparseFileError(f"cannot read {path}: {e.strerror or e}") from None
    header = _json(path, raw, "header")
    if not isinstance(header, dict):
        raise SparseFileError(f"{path} has a corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SparseFileError(f"{path}: the metadata is not a mapping of strings to strings")
    spans = []
    for key, info in header.items():
        where = f"{path}: stored tensor {key[:80]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SparseFileError(f"{where} has a corrupt header entry (expected dtype, shape, data_offsets)")
        if info["dtype"] not in _ST_DTYPES:
            raise SparseFileError(f"{where} has unsupported dtype {str(info['dtype'])[:20]!r}; allowed: "
                                  f"{sorted(_ST_DTYPES)}")
        shape = _shape(path, where, info["shape"])
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise SparseFileError(f"{where} has corrupt data offsets {str(offsets)[:60]}")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[info["dtype"]]:
            raise SparseFileError(f"{where}: its offsets span {offsets[1] - offsets[0]} bytes, its shape and dtype "
                                  f"need {math.prod(shape) * _ITEMSIZE[info['dtype']]}")
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise SparseFileError(f"{path} is corrupt: its tensors' data overlap or leave gaps (at byte {start})")
        end = stop
    if 8 + n + end != size:
        raise SparseFileError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, "
                              f"the file has {size}")
    return header, meta


@dataclass
class CheckedFile:
    header: dict
    meta: dict
    entries: list[dict]
    model_spec: dict | None


def _check_meta(path: str, meta: dict) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise SparseFileError(f"{path} is a safetensors file but not a fastsparse sparse checkpoint "
                              f"(metadata format={str(meta.get('format'))[:40]!r}); write one with fastsparse.save_sparse")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise SparseFileError(f"{path}: format_version {str(meta.get('format_version'))[:20]!r} is not an "
                              "integer") from None
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise SparseFileError(f"{path} has format version {version}, written by {newer} fastsparse; this one reads "
                              f"version {FORMAT_VERSION} (export the model again)")
    extra = sorted(set(meta) - _META_KEYS)
    if extra:
        raise SparseFileError(f"{path}: unknown metadata fields {extra[:5]}; allowed: {sorted(_META_KEYS)}")
    if meta.get(_CHECKSUM_KEY) != metadata_checksum(meta):
        what = "has no checksum" if _CHECKSUM_KEY not in meta else "does not match its checksum (modified or corrupt)"
        raise SparseFileError(f"{path}: the metadata {what}")


def _check_entry(path: str, e: Any, header: dict) -> None:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
        raise SparseFileError(f"{path}: a metadata entry is not a mapping with a name")
    name = e["name"]
    where = f"{path}: entry {name[:80]!r}"
    if _SEP in name or len(name) > 1000:
        raise SparseFileError(f"{where}: a name may not contain {_SEP!r} or exceed 1000 characters")
    if e.get("kind") not in _KINDS:
        raise SparseFileError(f"{where} has unknown encoding {str(e.get('kind'))[:20]!r}; allowed: {list(_KINDS)}")
    allowed = _ENTRY_KEYS["dense" if e["kind"] == "dense" else "masked"]
    if set(e) != allowed:
        wrong = sorted(set(e) ^ allowed)
        raise SparseFileError(f"{where} has the wrong fields {wrong[:5]}; a {e['kind']} entry has {sorted(allowed)}")
    if e["dtype"] not in _DTYPES:
        raise SparseFileError(f"{where} has unknown dtype {str(e['dtype'])[:20]!r}; allowed: {sorted(_DTYPES)}")
    shape = _shape(path, where, e["shape"])
    if not _is_int(e["crc32"]) or not 0 <= e["crc32"] < 2**32:
        raise SparseFileError(f"{where} has no valid checksum (crc32 must be an integer in [0, 2^32))")
    for part in _KEY_PARTS[e["kind"]]:
        if _key(name, part) not in header:
            raise SparseFileError(f"{where}: tensor {_key(name, part)!r} is missing from the file")
    n = math.prod(shape)
    stored = {part: header[_key(name, part)] for part in _KEY_PARTS[e["kind"]]}
    if "data" in stored and (tuple(stored["data"]["shape"]) != shape
                             or _ST_DTYPES[stored["data"]["dtype"]] != _DTYPES[e["dtype"]]):
        raise SparseFileError(f"{where}: stored as {stored['data']['dtype']} {stored['data']['shape']}, the metadata "
                              f"says {e['dtype']} {list(shape)}")
    if "bits" in stored and stored["bits"]["shape"] != [(n + 7) // 8]:
        raise SparseFileError(f"{where}: its bitmask holds {stored['bits']['shape']} bytes, a shape of {n} elements "
                              f"needs [{(n + 7) // 8}]")
    if e["kind"] == "dense":
        return
    if e["mask"] != name + _MASK_SUFFIX:
        raise SparseFileError(f"{where} names the mask {str(e['mask'])[:80]!r}; the mask of {name!r} is "
                              f"{name + _MASK_SUFFIX!r}")
    nnz, sparsity = e["nnz"], e["sparsity"]
    if not _is_int(nnz) or not 0 <= nnz <= n:
        raise SparseFileError(f"{where} keeps {str(nnz)[:20]} values; a count in [0, {n}] is allowed")
    expected = (1.0 - nnz / n) if n else 0.0
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or sparsity != expected:
        raise SparseFileError(f"{where} claims sparsity {str(sparsity)[:20]}, its {nnz} of {n} values give {expected}")
    if "values" in stored and stored["values"]["shape"] != [nnz]:
        raise SparseFileError(f"{where}: {stored['values']['shape']} values stored, the metadata says {nnz}")
    if e["kind"] == "csr":
        rows, _ = _matrix_shape(shape)
        if stored["crow"]["shape"] != [rows + 1] or stored["col"]["shape"] != [nnz]:
            raise SparseFileError(f"{where}: row pointers {stored['crow']['shape']} and column indices "
                                  f"{stored['col']['shape']} do not fit {rows} rows and {nnz} values")


def _check_spec(path: str, spec: Any, entries: list[dict]) -> None:
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise SparseFileError(f"{path}: the model spec is not a mapping")
    if spec.get("name") != "mlp":
        return   # an opaque description; only an mlp spec is built from
    sizes = spec.get("sizes")
    if not isinstance(sizes, list) or len(sizes) < 2 or not all(_is_int(s) and 0 < s <= MAX_DIM for s in sizes):
        raise SparseFileError(f"{path}: the mlp model spec needs 'sizes', a list of at least two positive integers")
    shapes = {e["name"]: e["shape"] for e in entries}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if shapes.get(f"{2 * i}.weight") != [b, a]:
            raise SparseFileError(f"{path}: the mlp model spec's sizes {sizes[:10]} do not match the file's weights "
                                  f"({2 * i}.weight is {shapes.get(f'{2 * i}.weight')}, the spec says {[b, a]})")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):   # not POSIX
        return None


def _check_decoded_size(path: str, entries: list[dict]) -> None:
    total = sum(math.prod(e["shape"]) * (torch.empty((), dtype=_DTYPES[e["dtype"]]).element_size()
                                         + (e["kind"] != "dense")) for e in entries)
    memory = _physical_memory()
    if memory is not None and total > memory:
        raise SparseFileError(f"{path} decodes to {total / 2**30:,.1f} GiB of dense tensors, more than this machine's "
                              f"{memory / 2**30:,.1f} GiB of memory (a corrupt or crafted shape?)")


def read_checked(path: str) -> CheckedFile:
    """Header, metadata, entries and model spec of ``path``, every field checked; no tensor read."""
    header, meta = _read_header(path)
    _check_meta(path, meta)
    if "tensors" not in meta:
        raise SparseFileError(f"{path}: the metadata lists no tensors")
    entries = _json(path, meta["tensors"], "metadata's tensor list")
    if not isinstance(entries, list):
        raise SparseFileError(f"{path}: the metadata's tensor list is not a list")
    spec = _json(path, meta["model_spec"], "model spec") if "model_spec" in meta else None
    for e in entries:
        _check_entry(path, e, header)
    names = [e["name"] for e in entries] + [e["mask"] for e in entries if e["kind"] != "dense"]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise SparseFileError(f"{path}: names stored twice: {dup[:5]}")
    used = {_key(e["name"], p) for e in entries for p in _KEY_PARTS[e["kind"]]}
    extra = sorted(set(header) - used)
    if extra:
        raise SparseFileError(f"{path}: tensors no metadata entry describes (corrupt): {extra[:5]}")
    if spec is not None:
        _check_spec(path, spec, entries)
    _check_decoded_size(path, entries)
    return CheckedFile(header, meta, entries, spec)
