"""What a compressed file holds and weighs (``fastsparse export``), and the model it describes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..core.integrity import INTEGRITY_KEY, IntegrityError, verify
from ..core.nets import MLP
from .check import read_checked
from .export import save_sparse
from .format import _DTYPES, _KEY_PARTS, SparseFileError, _itemsize, _key

__all__ = ["size_report", "SizeReport", "SizeRow", "export_command", "build_model"]


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
    checked = read_checked(path)
    header, entries = checked.header, checked.entries
    rows = []
    for e in entries:
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

def _sharded_folder(source: str) -> str | None:
    """The sharded checkpoint of ``source`` (a run folder of ``parallel: fsdp``, or the checkpoint's
    own folder), else None."""
    for folder in (os.path.join(source, "checkpoint.dcp"), source):
        if os.path.isfile(os.path.join(folder, "manifest.json")):
            return folder
    return None


def _load_checkpoint_state(source: str) -> Mapping[str, Tensor]:
    if os.path.isdir(source):
        ckpt = os.path.join(source, "checkpoint.pt")
        sharded = _sharded_folder(source) if not os.path.isfile(ckpt) else None
        if sharded is not None:   # read whole in this process, verified; no model is built
            from ..engine.sharded_checkpoint import read_sharded_model

            return read_sharded_model(sharded)
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{source} is a folder without checkpoint.pt or checkpoint.dcp; pass a run folder "
                                    "or a checkpoint file")
        source = ckpt
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such checkpoint: {source}")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = next((x.strip() for x in str(e).splitlines() if "GLOBAL" in x), str(e).splitlines()[0] if str(e) else "")
        raise ValueError(f"cannot read {source} as a torch checkpoint of tensors and plain data "
                         f"({type(e).__name__}: {reason[:200]}); nothing in it ran") from None
    if isinstance(obj, Mapping) and INTEGRITY_KEY in obj:   # a checkpoint of `fastsparse train`: checksummed
        try:
            verify(obj)
        except IntegrityError as e:
            raise ValueError(f"{source} is corrupt: {e}") from None
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
    bare state_dict), or a run folder holding such a ``checkpoint.pt``, or a sharded checkpoint
    (a run folder of ``parallel: fsdp`` and its ``checkpoint.dcp``, read whole here, verified
    against its manifest). No model is built:
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
    return MLP(sizes)
