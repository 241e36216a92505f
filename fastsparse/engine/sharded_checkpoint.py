"""Sharded checkpoints: model (weights and masks), optimizer and engine through
``torch.distributed.checkpoint`` (DCP), verified before anything loads.

A checkpoint is a folder: DCP's shard files (``__<rank>_0.distcp``, one per saving rank, each
writing only its own shards: no gather) and its ``.metadata``, plus ``manifest.json`` written by
rank 0 last: the identity the caller gives (e.g. a config hash), the sparse layers (names, global
shapes, active counts), the optimizer's hyperparameters and which state each parameter holds, the
engine state (JSON) and the SHA-256 and size of every file. Loading, on any number of ranks or in
one process (DCP reshards):

1. ``manifest.json`` is read as JSON; its identity must equal the caller's, its layers the engine's;
2. every file it lists must be there with its size and SHA-256 (a missing shard, a truncated or
   corrupted file is refused, naming it);
3. DCP's ``.metadata`` is unpickled by an unpickler that knows only DCP's metadata classes
   (anything else is refused; nothing executes), its tensors are read with ``weights_only``;
4. everything is read into fresh tensors first; only then are the model, optimizer and engine
   changed, and the masks' counts are checked against the manifest.

Non-tensor state never goes through DCP (it would be pickled): it travels in the manifest, with
the caller's ``extra`` (a runner's counters). :func:`read_sharded_model` reads the model state
whole in one process with no model built (an export), verified the same way.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..core.sharded import global_count, local, total_like

__all__ = ["save_sharded", "load_sharded", "read_manifest", "read_sharded_model", "manifest_extra",
           "ShardedCheckpointError", "MANIFEST"]

MANIFEST = "manifest.json"
_FORMAT = 1


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint that cannot be loaded here (the message says why); nothing was changed."""


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode(value: Any) -> Any:
    """Engine state as JSON: bytes as {"bytes": base64}, tuples as lists."""
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ShardedCheckpointError(f"the engine state holds a {type(value).__name__}, which a sharded checkpoint "
                                 "does not store")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"bytes"}:
            return base64.b64decode(value["bytes"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def manifest_extra(manifest: Mapping[str, Any]) -> Any:
    """The caller's ``extra`` of :func:`save_sharded`, decoded (bytes back from base64)."""
    return _decode(manifest.get("extra"))


def _params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _optimizer_layout(model: nn.Module, optimizer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors by "optim.<param>.<key>", what the manifest keeps: groups by parameter name, kinds)."""
    names = {id(p): n for n, p in _params_by_name(model).items()}
    tensors, kinds = {}, {}
    for p, entry in optimizer.state.items():
        name = names[id(p)]
        for k, v in entry.items():
            if not isinstance(v, Tensor):
                raise ShardedCheckpointError(f"optimizer state {k!r} of {name} is not a tensor")
            tensors[f"optim.{name}.{k}"] = v
            kinds.setdefault(name, {})[k] = "param" if v.dim() > 0 else "scalar"
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "state": kinds}


def _layers(sparsifier: Any) -> dict[str, dict[str, Any]]:
    sps = sparsifier._sps if sparsifier is not None else []
    return {sp.name: {"shape": list(sp.mask.shape), "active": global_count(sp.mask)} for sp in sps}


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: Any, sparsifier: Any,
                 identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write a sharded checkpoint into the folder ``path`` (call on every rank; a new folder).
    ``sparsifier`` may be None (a dense model); ``extra``: plain data the caller keeps beside the
    state (a runner's counters), stored as JSON in the manifest (bytes as base64)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if (path / MANIFEST).exists():
        raise ShardedCheckpointError(f"{path} already holds a checkpoint; save into a new folder")
    opt_tensors, opt_meta = _optimizer_layout(model, optimizer)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update(opt_tensors)
    engine = _encode(sparsifier.state_dict()) if sparsifier is not None else None
    extra = _encode(dict(extra or {}))
    layers = _layers(sparsifier)
    dcp.save(state, checkpoint_id=str(path), no_dist=not _distributed())
    _barrier()
    if _rank() == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(path.iterdir())
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"format": _FORMAT, "identity": json.loads(json.dumps(dict(identity))), "layers": layers,
                    "optimizer": opt_meta, "engine": engine, "extra": extra, "files": files}
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path / MANIFEST)
    _barrier()


# --- loading ------------------------------------------------------------------------------
def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata
    from torch.serialization import _get_layout

    allowed = {("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "WindowsPath"): pathlib.PurePosixPath,
               ("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): _get_layout,
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8):
        allowed[("torch", str(dtype).split(".")[1])] = dtype
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: only its own data classes may be named."""

    allowed = None

    def find_class(self, module: str, name: str) -> Any:
        allowed = type(self).allowed or _allowed_globals()
        type(self).allowed = allowed
        if (module, name) not in allowed:
            raise ShardedCheckpointError(f"the checkpoint's .metadata names {module}.{name}, which DCP metadata "
                                         "never holds; refusing to load it")
        return allowed[(module, name)]


def _read_metadata(path: Path) -> Any:
    """DCP's ``.metadata``, through the restricted unpickler; a clear error for anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path / ".metadata", "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except ShardedCheckpointError:
            raise
        except Exception as e:   # noqa: BLE001 - any corruption of the file
            raise ShardedCheckpointError(f"{path / '.metadata'} cannot be read: {type(e).__name__}") from None
    if not isinstance(metadata, Metadata):
        raise ShardedCheckpointError(f"{path / '.metadata'} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def read_manifest(path: str | os.PathLike, identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """The verified manifest: identity (None: any), then every file's presence, size and SHA-256."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ShardedCheckpointError(f"{path} holds no {MANIFEST}: not a finished sharded checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError):
        raise ShardedCheckpointError(f"{path / MANIFEST} is not valid JSON (corrupt)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT or not isinstance(manifest.get("files"), dict):
        raise ShardedCheckpointError(f"{path / MANIFEST} is not a manifest of format {_FORMAT}")
    ours = json.loads(json.dumps(dict(identity or {})))
    if identity is not None and manifest.get("identity") != ours:
        raise ShardedCheckpointError(f"{path} is a checkpoint of another run: it was saved for {manifest.get('identity')}, "
                                     f"this run is {ours}")
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ShardedCheckpointError(f"{path} lacks {name}, a file of the checkpoint (a missing shard)")
        if f.stat().st_size != entry.get("bytes") or _sha256(f) != entry.get("sha256"):
            raise ShardedCheckpointError(f"{f} does not match its checksum in {MANIFEST} (corrupt or changed)")
    return manifest


@torch.no_grad()
def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: Any, sparsifier: Any,
                 identity: Mapping[str, Any]) -> None:
    """Load a checkpoint of :func:`save_sharded` into ``model`` (sharded on any number of ranks, or
    whole in one process), ``optimizer`` (None: skip) and ``sparsifier``; refused with
    :class:`ShardedCheckpointError` before anything changes when it does not verify or fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    manifest = read_manifest(path, identity)
    layers = {sp.name: list(sp.mask.shape) for sp in (sparsifier._sps if sparsifier is not None else [])}
    saved = {k: v.get("shape") for k, v in manifest.get("layers", {}).items()}
    if saved != layers:
        raise ShardedCheckpointError(f"{path} holds the sparse layers {saved}, this model {layers}")
    own = model.state_dict(keep_vars=True)
    fresh = {f"model.{k}": torch.empty_like(v.detach()) for k, v in own.items()}
    opt_fresh = _optimizer_template(model, optimizer, manifest) if optimizer is not None else {}
    fresh.update(opt_fresh)
    _read_metadata(path)   # refused here, on every rank alike, rather than inside DCP's collectives
    try:
        with warnings.catch_warnings():   # one process: DCP warns that it assumes so, which is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(fresh, storage_reader=_reader(path), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:   # noqa: BLE001 - DCP's own errors (keys or shapes that do not fit)
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ShardedCheckpointError(f"{path} does not fit this model and optimizer: {first}") from None
    _check_masks(path, manifest, {k[len("model."):]: v for k, v in fresh.items() if k.startswith("model.")})
    # everything read and checked: now change state
    for k, v in own.items():
        local(v).copy_(local(fresh[f"model.{k}"]))
    if optimizer is not None:
        _load_optimizer(model, optimizer, manifest, opt_fresh)
    if sparsifier is not None:
        sparsifier.load_state_dict(_decode(manifest["engine"]))
        sparsifier._refresh()
        sparsifier.apply_masks()


def _check_masks(path: Path, manifest: Mapping[str, Any], model_state: Mapping[str, Tensor]) -> None:
    """Every mask holds the count in the manifest and every weight outside its mask is exactly 0
    (counted over every shard: a collective on sharded tensors)."""
    for name, entry in manifest["layers"].items():
        mask, weight = model_state.get(f"{name}_mask"), model_state.get(name)
        if mask is None or weight is None:
            raise ShardedCheckpointError(f"{path} lacks the weight or the mask of {name}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
            raise ShardedCheckpointError(f"{path}: the mask of {name} is not a bool tensor of its weight's shape")
        if global_count(mask) != entry["active"]:
            raise ShardedCheckpointError(f"{path}: mask {name} holds {global_count(mask)} active weights, the "
                                         f"manifest {entry['active']} (corrupt)")
        outside = total_like(int(local(weight)[~local(mask)].count_nonzero()), weight)
        if outside:
            raise ShardedCheckpointError(f"{path}: {name} has {outside:,} nonzero weights outside its mask; a "
                                         "checkpoint is exactly sparse (corrupt)")


@torch.no_grad()
def read_sharded_model(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state of a sharded checkpoint, whole, in one process and with no model built (an
    export): the files verified against the manifest (any identity), the tensors read at the
    global shapes DCP's metadata records, the masks checked as :func:`load_sharded` does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    manifest = read_manifest(path, None)
    metadata = _read_metadata(path)
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ShardedCheckpointError(f"{path} holds no model tensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_reader(path), no_dist=True)
    model = {k[len("model."):]: v for k, v in state.items()}
    _check_masks(path, manifest, model)
    return model


def _optimizer_template(model: nn.Module, optimizer: Any, manifest: Mapping[str, Any]) -> dict[str, Tensor]:
    params = _params_by_name(model)
    kinds = manifest["optimizer"]["state"]
    unknown = sorted(set(kinds) - set(params))
    if unknown:
        raise ShardedCheckpointError(f"the checkpoint holds optimizer state for {unknown[:5]}, which this model lacks")
    out = {}
    for name, entry in kinds.items():
        for k, kind in entry.items():
            p = params[name]
            out[f"optim.{name}.{k}"] = torch.empty_like(p.detach()) if kind == "param" else torch.zeros(())
    groups = manifest["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(og["params"]) for g, og in zip(groups, optimizer.param_groups)):
        raise ShardedCheckpointError("the checkpoint's optimizer has other parameter groups than this one")
    return out


def _load_optimizer(model: nn.Module, optimizer: Any, manifest: Mapping[str, Any], tensors: dict[str, Tensor]) -> None:
    params = _params_by_name(model)
    optimizer.state.clear()
    for name, entry in manifest["optimizer"]["state"].items():
        optimizer.state[params[name]] = {k: tensors[f"optim.{name}.{k}"] for k in entry}
    for g, saved in zip(optimizer.param_groups, manifest["optimizer"]["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
