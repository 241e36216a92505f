"""Checkpoints of ``fastsparse train`` under ``parallel: fsdp``: sharded, never gathered.

    checkpoint.dcp/       the last checkpoint (:mod:`fastsparse.engine.sharded_checkpoint`): DCP's
                          shard files (each rank writes its own shards), .metadata, manifest.json
    checkpoint.dcp.tmp/   a checkpoint being written
    checkpoint.dcp.old/   the previous checkpoint, between the two renames below

Writing: every rank saves into ``checkpoint.dcp.tmp`` (rank 0 writes the manifest last); then
rank 0 renames ``checkpoint.dcp`` to ``.old``, ``.tmp`` to ``checkpoint.dcp``, and removes
``.old``. A process killed at any point leaves a complete checkpoint: the old one (killed while
writing: the next run removes ``.tmp``; killed between the renames: the next run renames ``.old``
back) or the new one (the next run removes ``.old``).

The manifest's identity is ``{"run": <config hash>}``; the runner's counters (epoch, phase, the
learning-rate schedule, the data-order and torch RNG states, metrics, updates, accumulators and
the config) travel in it as JSON. ``--resume`` verifies the manifest (identity, every file's size
and SHA-256) before the run folder changes, and :func:`load_run_checkpoint` reads every tensor
into fresh ones and checks the masks before the model, optimizer or engine change.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..engine.sharded_checkpoint import (
    MANIFEST, ShardedCheckpointError, load_sharded, manifest_extra, read_manifest, save_sharded,
)
from .checkpoint import ResumeError
from .config import config_hash
from .experiment import ranks
from .rundir import RunFolderError, config_diff

__all__ = ["CHECKPOINT_DIR", "has_checkpoint", "recover", "leftover_folders", "save_run_checkpoint",
           "read_run_checkpoint", "load_run_checkpoint", "counters_of"]

CHECKPOINT_DIR = "checkpoint.dcp"
_TMP, _OLD = CHECKPOINT_DIR + ".tmp", CHECKPOINT_DIR + ".old"
_COUNTERS = {"epoch": int, "phase": int, "scheduler": dict, "phase_state": object, "data_rng": bytes,
             "torch_rng": bytes, "metrics": list, "updates": list, "accumulators": dict, "config": dict}
log = logging.getLogger("fastsparse.train")


def _barrier() -> None:
    if ranks()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _identity(resolved: Mapping[str, Any]) -> dict[str, str]:
    return {"run": config_hash(dict(resolved))}


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / MANIFEST).is_file()


def recover(run_dir: Path) -> None:
    """A run killed between the two renames left only ``.old``: put it back (rank 0, under the
    run folder's lock; every rank waits)."""
    run_dir = Path(run_dir)
    if ranks()[0] == 0 and not (run_dir / CHECKPOINT_DIR).exists() and (run_dir / _OLD / MANIFEST).is_file():
        log.warning("restoring %s, left by a process killed while replacing its checkpoint", run_dir / _OLD)
        os.replace(run_dir / _OLD, run_dir / CHECKPOINT_DIR)
    _barrier()


def leftover_folders(run_dir: Path) -> list[Path]:
    """Folders a killed writer left in ``run_dir`` (removed by the next run, which holds the lock)."""
    return [p for p in (Path(run_dir) / _TMP, Path(run_dir) / _OLD) if p.is_dir()]


def save_run_checkpoint(run_dir: Path, model: Any, optimizer: Any, sparsifier: Any, resolved: Mapping[str, Any],
                        counters: Mapping[str, Any]) -> None:
    """Write the run's checkpoint sharded (every rank), then swap it in (rank 0)."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / _TMP, run_dir / CHECKPOINT_DIR, run_dir / _OLD
    try:
        if ranks()[0] == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        save_sharded(tmp, model, optimizer, sparsifier, _identity(resolved), extra=counters)
        if ranks()[0] == 0:
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise RunFolderError(f"cannot write {final}: {e.strerror or e} (the previous checkpoint, if any, is "
                             "intact)") from e
    except CheckpointException as e:   # DCP's own (a BaseException): a rank could not write its shards
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise RunFolderError(f"cannot write {final}: {first} (the previous checkpoint, if any, is intact)") from None
    _barrier()


def read_run_checkpoint(run_dir: Path, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The counters of the run folder's checkpoint, after its identity and every file's checksum
    were verified (:class:`ResumeError` otherwise; nothing changed). ``"sharded"`` holds its path,
    ``"manifest"`` the verified manifest."""
    path = Path(run_dir) / CHECKPOINT_DIR
    ours = _identity(resolved)
    try:
        manifest = read_manifest(path, None)
    except ShardedCheckpointError as e:
        raise ResumeError(f"{e}; delete {path} to start this run over") from None
    if manifest.get("identity") != ours:
        saved = manifest.get("extra", {}).get("config") if isinstance(manifest.get("extra"), dict) else None
        diff = config_diff(saved, dict(resolved)) if isinstance(saved, dict) else []
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        theirs = manifest.get("identity")
        theirs = theirs.get("run") if isinstance(theirs, dict) else theirs
        raise ResumeError(f"{path} belongs to a run of another config (hash {theirs}, this run {ours['run']}): "
                          f"{shown or 'its manifest names no config'}. Put it back in its own run folder, or delete "
                          "it to start this run over")
    counters = manifest_extra(manifest)
    if not isinstance(counters, dict) or set(counters) != set(_COUNTERS) or any(
            not isinstance(counters[k], kind) or isinstance(counters[k], bool) for k, kind in _COUNTERS.items()):
        raise ResumeError(f"{path}: its manifest does not hold the counters of a run of fastsparse train (corrupt)")
    rng = {k: torch.frombuffer(bytearray(counters[k]), dtype=torch.uint8) for k in ("data_rng", "torch_rng")}
    return {**counters, **rng, "sharded": path, "manifest": manifest}


def load_run_checkpoint(state: Mapping[str, Any], model: Any, optimizer: Any, sparsifier: Any,
                        resolved: Mapping[str, Any]) -> None:
    """Load the verified checkpoint into the sharded model, its optimizer and engine (every rank)."""
    try:
        load_sharded(state["sharded"], model, optimizer, sparsifier, _identity(resolved), verified=state["manifest"])
    except ShardedCheckpointError as e:
        raise ResumeError(str(e)) from None


def counters_of(epoch: int, phase: int, scheduler: Any, phase_state: Any, order: torch.Generator,
                metrics: list, updates: list, acc: dict, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What the runner keeps beside the sharded state (plain data)."""
    return {"epoch": epoch, "phase": phase, "scheduler": scheduler.state_dict(), "phase_state": phase_state,
            "data_rng": bytes(order.get_state().numpy()), "torch_rng": bytes(torch.get_rng_state().numpy()),
            "metrics": metrics, "updates": updates, "accumulators": acc, "config": dict(resolved)}
