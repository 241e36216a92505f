"""``checkpoint.pt``: what a run saves to continue bit for bit, and everything ``--resume`` checks
before it changes anything.

A checkpoint is written sealed (:func:`fastsparse.core.integrity.seal`: a SHA-256 of every tensor
and a digest of all the rest) by a temporary file and a rename. Reading it:

1. ``torch.load(weights_only=True)``: tensors and plain data only; a pickled object of any
   other kind is refused before it is built, so nothing in the file runs;
2. integrity: the file's checksums match what was read (a changed byte names its tensor; a
   truncated or empty file is reported as such);
3. shape: exactly the keys a checkpoint has, of the right kinds;
4. identity: the checkpoint's config hash is the run's (otherwise the differences are listed);
5. invariants: every mask holds the active count recorded beside it, and every weight outside
   its mask is exactly zero;
6. fit: the model's and the optimizer's tensors have the shapes and dtypes of the saved ones.

Every failure is a :class:`ResumeError` (one sentence) raised before the model, the optimizer,
the engine or any file of the run folder changes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..core.integrity import INTEGRITY_KEY, IntegrityError, seal, verify
from ..core.sparse_linear import compact_layers
from .config import config_hash
from .rundir import atomic_save, config_diff

__all__ = ["ResumeError", "CHECKPOINT_KEYS", "save_checkpoint", "read_checkpoint", "check_identity", "check_masks",
           "check_fit", "mask_counts", "leftover_files"]

CHECKPOINT_KEYS = frozenset({
    "epoch", "phase", "model", "optimizer", "scheduler", "sparsifier", "phase_state", "data_rng", "torch_rng",
    "metrics", "updates", "accumulators", "config_hash", "config", "mask_counts", INTEGRITY_KEY})
_MASK = "_mask"


class ResumeError(ValueError):
    """A run folder that cannot be continued as asked (config changed, nothing to resume, a checkpoint
    that is corrupt, of another run or does not fit)."""


def mask_counts(model_state: Mapping[str, Tensor]) -> dict[str, int]:
    """{mask key: active entries} of every bool ``<name>_mask`` entry of a model state_dict."""
    return {k: int(v.sum()) for k, v in model_state.items()
            if k.endswith(_MASK) and isinstance(v, Tensor) and v.dtype == torch.bool}


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Seal and write atomically (rank 0 only): a killed process leaves the old checkpoint or the new one."""
    atomic_save(seal({**state, "mask_counts": mask_counts(state["model"])}), path)


def _unpickle_refusal(e: Exception) -> str | None:
    """The global (a class or function) a weights-only load refused to build (None: another error)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else None


def _reason(e: Exception) -> str:
    """One line of a load error (torch's are paragraphs)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    line = next((x.split("error:", 1)[1].strip() for x in lines if "WeightsUnpickler error:" in x), None)
    line = line or (lines[0] if lines else "")
    return f"{type(e).__name__}: {line[:200]}" if line else type(e).__name__


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded without running anything and checked against its checksums."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ResumeError(f"cannot read {path}: {e.strerror or e}") from None
    if size == 0:
        raise ResumeError(f"{path} is empty (0 bytes): the run was killed before its first checkpoint was "
                          "complete, or the file was emptied; delete it to start the run over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch and pickle raise many types for a damaged file
        refused = _unpickle_refusal(e)
        if refused is not None:
            raise ResumeError(f"{path} holds a pickled {refused}; a checkpoint may hold only tensors and plain "
                              "data, so it was not loaded (nothing in it ran)") from None
        raise ResumeError(f"{path} is truncated or not a checkpoint ({size} bytes; torch says: {_reason(e)}; "
                          "nothing in it ran)") from None
    try:
        verify(state)
    except IntegrityError as e:
        raise ResumeError(f"{path} is corrupt: {e}; delete it to start the run over") from None
    keys = set(state)
    missing, extra = sorted(CHECKPOINT_KEYS - keys), sorted(keys - CHECKPOINT_KEYS)
    if missing or extra:
        what = "; ".join(([f"lacks {missing}"] if missing else []) + ([f"has unknown {extra}"] if extra else []))
        raise ResumeError(f"{path} is not a checkpoint of this fastsparse: it {what}")
    kinds = {"epoch": int, "phase": int, "model": Mapping, "optimizer": Mapping, "scheduler": Mapping,
             "metrics": list, "updates": list, "accumulators": Mapping, "config_hash": str, "config": Mapping,
             "mask_counts": Mapping, "data_rng": Tensor, "torch_rng": Tensor}
    for key, kind in kinds.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ResumeError(f"{path}: {key!r} is a {type(state[key]).__name__}, expected a {kind.__name__}")
    if not all(isinstance(v, Tensor) for v in state["model"].values()):
        raise ResumeError(f"{path}: 'model' holds entries that are not tensors")
    return state


def check_identity(state: Mapping[str, Any], resolved: dict[str, Any], path: Path) -> None:
    """The checkpoint was written by a run of this very config."""
    ours = config_hash(resolved)
    if state["config_hash"] == ours and config_hash(dict(state["config"])) == ours:
        return
    diff = config_diff(dict(state["config"]), resolved)
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise ResumeError(f"{path} belongs to a run of another config (hash {state['config_hash']}, this run "
                      f"{ours}): {shown or 'its config record does not match its hash'}. Put it back in its own "
                      "run folder, or delete it to start this run over")


def check_masks(state: Mapping[str, Any], path: Path) -> None:
    """Every mask holds the count recorded beside it; every weight outside its mask is exactly 0."""
    model, recorded = state["model"], dict(state["mask_counts"])
    counts = mask_counts(model)
    if set(counts) != set(recorded):
        raise ResumeError(f"{path}: the masks {sorted(set(counts) ^ set(recorded))} do not match the masks "
                          "recorded beside the model")
    for key, count in counts.items():
        if count != recorded[key]:
            raise ResumeError(f"{path}: mask {key} has {count:,} active weights, the engine recorded "
                              f"{recorded[key]:,} (corrupt)")
        weight = model.get(key[: -len(_MASK)])
        if weight is None:
            continue
        if weight.shape != model[key].shape:
            raise ResumeError(f"{path}: mask {key} has shape {tuple(model[key].shape)}, its weight "
                              f"{tuple(weight.shape)}")
        outside = int(torch.count_nonzero(weight.detach()[~model[key]]))
        if outside:
            raise ResumeError(f"{path}: {key[: -len(_MASK)]} has {outside:,} nonzero weights outside its mask; "
                              "a checkpoint is exactly sparse (corrupt)")


def _nnz_sized(model: torch.nn.Module, saved: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes the saved entries of each SparseLinear must have: its active count is the saved one."""
    out = {}
    for name in compact_layers(model):
        prefix = name.rsplit(".", 1)[0] + "."
        values = saved.get(prefix + "values")
        if isinstance(values, Tensor) and values.dim() == 1:
            out.update({prefix + k: tuple(values.shape) for k in ("values", "col", "col_t", "perm")})
    return out


def _shape_problem(name: str, saved: Tensor, ours: Tensor, expected: tuple[int, ...] | None = None) -> str | None:
    if expected is not None:
        if tuple(saved.shape) != expected:
            return f"{name}: shape {tuple(saved.shape)} in the checkpoint, its layer's values {expected}"
    elif tuple(saved.shape) != tuple(ours.shape):
        return f"{name}: shape {tuple(saved.shape)} in the checkpoint, {tuple(ours.shape)} in this run"
    if saved.dtype != ours.dtype:
        return f"{name}: dtype {saved.dtype} in the checkpoint, {ours.dtype} in this run"
    return None


def check_fit(state: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              path: Path) -> None:
    """The saved model and optimizer state fit this run's model and optimizer exactly."""
    ours = model.state_dict()
    saved = state["model"]
    problems = []
    missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    if missing:
        problems.append(f"it lacks {missing[:5]}")
    if extra:
        problems.append(f"it has {extra[:5]}, which the model lacks")
    sized = _nnz_sized(model, saved)   # a sparse-executed layer's values may have another length (GMP prunes)
    problems += [p for k in sorted(set(ours) & set(saved)) if (p := _shape_problem(k, saved[k], ours[k], sized.get(k)))]
    by_param = {id(m.values): sized[name.rsplit(".", 1)[0] + ".values"] for name, m in compact_layers(model).items()
                if name.rsplit(".", 1)[0] + ".values" in sized}
    opt = state["optimizer"]
    groups, state_of = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or not isinstance(state_of, Mapping) or len(groups) != len(optimizer.param_groups):
        problems.append("its optimizer state is not one of this run's optimizer")
    else:
        params: dict[Any, Tensor] = {}
        for g_saved, g in zip(groups, optimizer.param_groups):
            ids = g_saved.get("params") if isinstance(g_saved, Mapping) else None
            if not isinstance(ids, list) or len(ids) != len(g["params"]):
                problems.append("its optimizer's parameter groups differ from this run's")
                break
            params.update(zip(ids, g["params"]))
        for pid, entry in state_of.items():
            p = params.get(pid)
            if p is None or not isinstance(entry, Mapping):
                problems.append(f"its optimizer holds state for an unknown parameter {pid!r}")
                continue
            expected = by_param.get(id(p), tuple(p.shape))
            for k, v in entry.items():
                if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != expected:
                    problems.append(f"optimizer state {k} of parameter {pid}: shape {tuple(v.shape)}, the "
                                    f"parameter's {tuple(p.shape)}")
    if problems:
        raise ResumeError(f"{path} does not fit this run's model: " + "; ".join(problems[:4]))


def leftover_files(run_dir: Path) -> list[Path]:
    """Temporary files a killed writer left in ``run_dir`` (the run's own, removed on resume)."""
    return sorted(p for p in Path(run_dir).glob("*.tmp") if p.is_file()) if os.path.isdir(run_dir) else []
