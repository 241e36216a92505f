"""Checksums of saved state: every tensor's SHA-256 (a manifest) and one digest of everything.

:func:`seal` adds to a state dict (plain data and tensors, as ``torch.save`` writes it) the entry
``integrity``::

    {"format": 1,
     "tensors": {"model/0.weight": "float32 (300, 64) <sha256 of the bytes>", ...},
     "digest": "<sha256 of a canonical encoding of the whole state, tensors by their manifest line>"}

:func:`verify` recomputes both from what was loaded: a changed byte in a tensor names that
tensor; a changed shape, dtype, key, counter or metric changes the digest; a missing or
malformed record is refused too. The encoding is type-tagged and length-prefixed, so two
different states never encode alike (``1`` and ``1.0`` and ``True``, ``"ab","c"`` and
``"a","bc"`` differ). These are checksums against corruption and mix-ups, not signatures: whoever
can write the file can also rewrite its checksums.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

__all__ = ["INTEGRITY_KEY", "IntegrityError", "seal", "verify", "tensor_checksum"]

INTEGRITY_KEY = "integrity"
_FORMAT = 1


class IntegrityError(ValueError):
    """Saved state whose checksums do not match what was read (corrupt, truncated or edited)."""


def tensor_checksum(t: torch.Tensor) -> str:
    """``"<dtype> <shape> <sha256 of the bytes>"`` of a dense tensor (on any device)."""
    if t.layout != torch.strided:
        raise TypeError(f"cannot checksum a tensor of layout {t.layout}")
    data = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(memoryview(data.numpy())).hexdigest()
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} {digest}"


def _encode(obj: Any, path: str, h: "hashlib._Hash", manifest: dict[str, str]) -> None:
    def put(tag: bytes, payload: bytes = b"") -> None:
        h.update(tag + len(payload).to_bytes(8, "little") + payload)

    if isinstance(obj, torch.Tensor):
        line = tensor_checksum(obj)
        manifest[path] = line
        put(b"x", line.encode())
    elif isinstance(obj, Mapping):
        put(b"d", str(len(obj)).encode())
        for key, value in obj.items():
            _encode(key, f"{path}/<key>", h, {})
            _encode(value, f"{path}/{key}" if path else str(key), h, manifest)
    elif isinstance(obj, (list, tuple)):   # torch.Size is a tuple
        put(b"l" if isinstance(obj, list) else b"t", str(len(obj)).encode())
        for i, value in enumerate(obj):
            _encode(value, f"{path}/{i}", h, manifest)
    elif obj is None:
        put(b"n")
    elif isinstance(obj, bool):
        put(b"B", b"1" if obj else b"0")
    elif isinstance(obj, int):
        put(b"i", str(obj).encode())
    elif isinstance(obj, float):
        put(b"f", obj.hex().encode())
    elif isinstance(obj, str):
        put(b"s", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        put(b"b", bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device)):
        put(b"y", str(obj).encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} at {path or 'the top level'}: a checkpoint "
                        "holds tensors and plain data only")


def _checksums(state: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    h = hashlib.sha256()
    manifest: dict[str, str] = {}
    _encode({k: v for k, v in state.items() if k != INTEGRITY_KEY}, "", h, manifest)
    return manifest, h.hexdigest()


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus its ``integrity`` record (the input is not modified)."""
    manifest, digest = _checksums(state)
    return {**{k: v for k, v in state.items() if k != INTEGRITY_KEY},
            INTEGRITY_KEY: {"format": _FORMAT, "tensors": manifest, "digest": digest}}


def _names(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def verify(state: Any) -> None:
    """Raise :class:`IntegrityError` (one sentence) unless ``state`` matches its ``integrity`` record."""
    if not isinstance(state, Mapping):
        raise IntegrityError(f"it holds a {type(state).__name__}, not a mapping of saved state")
    record = state.get(INTEGRITY_KEY)
    if record is None:
        raise IntegrityError("it has no checksums (written by an older fastsparse, or not by fastsparse)")
    if (not isinstance(record, Mapping) or record.get("format") != _FORMAT or not isinstance(record.get("digest"), str)
            or not isinstance(record.get("tensors"), Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in record["tensors"].items())):
        raise IntegrityError(f"its checksum record is malformed (expected format {_FORMAT} with a tensor manifest "
                             "and a digest)")
    try:
        manifest, digest = _checksums(state)
    except TypeError as e:
        raise IntegrityError(str(e)) from None
    saved = record["tensors"]
    changed = [p for p in manifest if p in saved and saved[p] != manifest[p]]
    if changed:
        first = changed[0]
        old, new = saved[first].rsplit(" ", 1)[0], manifest[first].rsplit(" ", 1)[0]
        what = "its bytes differ" if old == new else f"saved as {old}, read as {new}"
        raise IntegrityError(f"tensor {_names(changed)} is corrupt ({what} from the checksum saved with it)")
    missing, extra = sorted(set(saved) - set(manifest)), sorted(set(manifest) - set(saved))
    if missing or extra:
        parts = ([f"{_names(missing)} missing"] if missing else []) + ([f"{_names(extra)} not in its checksums"]
                                                                      if extra else [])
        raise IntegrityError(f"its tensors differ from its checksums: {'; '.join(parts)}")
    if digest != record["digest"]:
        raise IntegrityError("its plain data (counters, settings, metrics or keys) differs from the checksum "
                             "saved with it")
