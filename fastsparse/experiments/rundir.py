"""The run folder: ``<out>/<algorithm>-<hash of the resolved config>/``, written atomically.

    config.yaml      the resolved config (every default filled in); its hash names the folder
    run.json         where the config came from, and when
    execution.json   how each sparse layer runs (sparse or masked) and why; a resumed run replays it
    checkpoint.pt    model, optimizer, LR schedule, sparsifier, phase, data-order RNG, epoch, metrics
    checkpoint.dcp/  instead, under parallel: fsdp: the same, sharded (:mod:`.sharded_runs`; no model.pt)
    metrics.jsonl    one line per epoch (also metrics.csv); updates.jsonl, one line per mask update
    model.pt         final weights and masks (masked form, also for sparse-executed layers)
    summary.json     written last: its presence marks the run complete
    run.lock         while a process trains the run (:mod:`.lock`)

Every file is written to ``<name>.tmp`` and renamed; a process killed while writing leaves a
``.tmp`` file, which the next run of the folder removes (it holds the lock).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import config_hash
from .experiment import ranks

__all__ = ["label", "run_dir_for", "atomic_write", "atomic_save", "to_yaml", "config_diff",
           "saved_config", "find_changed_run", "RunFolderError", "RunFolderBlocked", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


class RunFolderError(RuntimeError):
    """The run folder cannot be created or written (no space, no permission, a file in the way, locked)."""


class RunFolderBlocked(RunFolderError):
    """The run folder cannot be used as given: a file is in its way, or another run holds it."""


def label(resolved: dict[str, Any]) -> str:
    blocks = resolved.get("sparsity")
    if blocks is None:
        return "dense"
    blocks = blocks if isinstance(blocks, list) else [blocks]
    return "+".join(b.get("algorithm", "static") for b in blocks)


def method_label(resolved: dict[str, Any]) -> str:
    """The method as reports name it: the algorithms, and the execution when it is not masked."""
    execution = resolved.get("execution", "masked")
    return label(resolved) + ("" if execution == "masked" else f" ({execution} execution)")


def run_dir_for(resolved: dict[str, Any], out: str | os.PathLike) -> Path:
    """``<out>/<algorithm>-<hash>``, or ``out`` itself when it already is a run folder."""
    out = Path(out)
    if (out / "config.yaml").is_file():
        return out
    return out / f"{label(resolved)}-{config_hash(resolved)}"


def atomic_write(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Write to a temporary file, then rename: a killed process leaves the old file or the new one.
    ``durable``: flush to the disk before the rename (checkpoints). Under torchrun only rank 0 writes
    (the ranks hold the same model). A failure (no space, no permission) removes the temporary file,
    keeps the old file and raises :class:`RunFolderError`."""
    if ranks()[0] != 0:
        return
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        reason = e.strerror or str(e)
        raise RunFolderError(f"cannot write {path}: {reason} (the previous {path.name}, if any, is intact)") from e


def atomic_save(obj: Any, path: Path) -> None:
    if ranks()[0] != 0:
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue(), durable=True)


def to_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``path: old -> new`` for every setting that differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError):
        return None


def find_changed_run(out: Path, source: str | None, resolved: dict[str, Any]) -> tuple[Path, list[str]] | None:
    """An unfinished run in ``out`` started from the same file with another config."""
    if source is None or not out.is_dir():
        return None
    for d in sorted(out.iterdir()):
        info = d / "run.json"
        if d.is_dir() and info.is_file() and not (d / "summary.json").exists():
            try:
                same = json.loads(info.read_text()).get("source") == source
            except (OSError, ValueError):
                continue
            old = saved_config(d) if same else None
            if old is not None and old != resolved:
                return d, config_diff(old, resolved)
    return None
