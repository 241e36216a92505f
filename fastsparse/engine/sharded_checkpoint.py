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
3. DCP's own ``.metadata`` (a pickle) is never read: the manifest holds the same metadata as
   JSON (each tensor's dtype, shape and chunks; each chunk's file, offset and length), checked
   field by field and rebuilt into DCP's classes; the tensors are read with ``weights_only``;
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
    metadata = dcp.save(state, checkpoint_id=str(path), no_dist=not _distributed())   # the same on every rank
    _barrier()
    if _rank() == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(path.iterdir())
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"format": _FORMAT, "identity": json.loads(json.dumps(dict(identity))), "layers": layers,
                    "optimizer": opt_meta, "engine": engine, "extra": extra, "dcp": _metadata_to_json(metadata),
                    "files": files}
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path / MANIFEST)
    _barrier()


# --- DCP's metadata as JSON ------------------------------------------------------------------
_DTYPES = {str(d).split(".")[1]: d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool,
                                             torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)}


def _metadata_to_json(metadata: Any) -> dict[str, Any]:
    """What DCP pickles into ``.metadata``, as plain data: per tensor its dtype, global size and
    chunks; per chunk the file, offset and length of its bytes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for key, m in metadata.state_dict_metadata.items():
        p = getattr(m, "properties", None)
        if not isinstance(m, TensorStorageMetadata) or p.layout != torch.strided or str(p.dtype).split(".")[1] not in _DTYPES:
            raise ShardedCheckpointError(f"{key} is not a dense tensor of a plain dtype; a sharded checkpoint holds "
                                         "only those")
        tensors[key] = {"dtype": str(p.dtype).split(".")[1], "size": list(m.size), "requires_grad": p.requires_grad,
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
    storage = [{"fqn": i.fqn, "offset": None if i.offset is None else list(i.offset), "index": i.index,
                "file": info.relative_path, "start": info.offset, "length": info.length,
                "transforms": list(info.transform_descriptors or [])}
               for i, info in metadata.storage_data.items()]
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    return {"version": metadata.version, "tensors": tensors, "storage": storage, "planner": planner}


def _ints(value: Any, what: str) -> torch.Size:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise ShardedCheckpointError(f"{what} is not a list of non-negative integers (corrupt manifest)")
    return torch.Size(value)


def _metadata_from_json(path: Path, manifest: Mapping[str, Any]) -> Any:
    """DCP's ``Metadata`` rebuilt from the verified manifest, every field checked: known dtypes,
    sizes of non-negative integers, chunks inside their tensor, bytes inside a file the manifest
    lists (by plain name, in this folder)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    saved = manifest.get("dcp")
    if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict) or not isinstance(
            saved.get("storage"), list) or not isinstance(saved.get("planner"), dict):
        raise ShardedCheckpointError(f"{path / MANIFEST} lacks DCP's metadata (corrupt, or written by another version)")
    tensors = {}
    for key, t in saved["tensors"].items():
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES or not isinstance(t.get("chunks"), list):
            raise ShardedCheckpointError(f"{path / MANIFEST}: tensor {key!r} has no known dtype or chunks (corrupt)")
        size = _ints(t.get("size"), f"the size of {key!r}")
        chunks = []
        for chunk in t["chunks"]:
            if not isinstance(chunk, list) or len(chunk) != 2:
                raise ShardedCheckpointError(f"{path / MANIFEST}: a chunk of {key!r} is not [offsets, sizes] (corrupt)")
            offsets, sizes = (_ints(c, f"a chunk of {key!r}") for c in chunk)
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o + n > d for o, n, d in zip(offsets, sizes, size)):
                raise ShardedCheckpointError(f"{path / MANIFEST}: a chunk of {key!r} lies outside it (corrupt)")
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        properties = TensorProperties(dtype=_DTYPES[t["dtype"]], requires_grad=bool(t.get("requires_grad")))
        tensors[key] = TensorStorageMetadata(properties=properties, size=size, chunks=chunks)
    files = manifest["files"]
    storage = {}
    for entry in saved["storage"]:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in files or Path(name).name != name or name == MANIFEST:
            raise ShardedCheckpointError(f"{path / MANIFEST} points a chunk at {name!r}, not a file of the checkpoint")
        start, length = entry.get("start"), entry.get("length")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (start, length)) or \
                start + length > files[name]["bytes"]:
            raise ShardedCheckpointError(f"{path / MANIFEST} points a chunk outside {name} (corrupt)")
        if entry.get("fqn") not in tensors or entry.get("transforms"):
            raise ShardedCheckpointError(f"{path / MANIFEST}: a chunk of an unknown tensor, or transformed (corrupt)")
        offset = None if entry.get("offset") is None else _ints(entry["offset"], "a chunk's offset")
        index = entry.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ShardedCheckpointError(f"{path / MANIFEST}: a chunk's index is not an integer (corrupt)")
        storage[MetadataIndex(fqn=entry["fqn"], offset=offset, index=index)] = _StorageInfo(name, start, length)
    planner = {}
    for key, where in saved["planner"].items():
        if not isinstance(where, list) or not all(isinstance(w, (str, int)) for w in where):
            raise ShardedCheckpointError(f"{path / MANIFEST}: the planner's path of {key!r} is not plain (corrupt)")
        planner[key] = tuple(where)
    version = saved.get("version")
    return Metadata(state_dict_metadata=tensors, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(), version=version if isinstance(version, str) else None)


def _reader(path: Path, metadata: Any):
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):   # never DCP's pickled .metadata
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
                 identity: Mapping[str, Any], verified: Mapping[str, Any] | None = None) -> None:
    """Load a checkpoint of :func:`save_sharded` into ``model`` (sharded on any number of ranks, or
    whole in one process), ``optimizer`` (None: skip) and ``sparsifier``; refused with
    :class:`ShardedCheckpointError` before anything changes when it does not verify or fit.
    ``verified``: its manifest as :func:`read_manifest` returned it for ``identity`` (the files
    are then not hashed again)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    manifest = read_manifest(path, identity) if verified is None else verified
    layers = {sp.name: list(sp.mask.shape) for sp in (sparsifier._sps if sparsifier is not None else [])}
    saved = {k: v.get("shape") for k, v in manifest.get("layers", {}).items()}
    if saved != layers:
        raise ShardedCheckpointError(f"{path} holds the sparse layers {saved}, this model {layers}")
    own = model.state_dict(keep_vars=True)
    fresh = {f"model.{k}": torch.empty_like(v.detach()) for k, v in own.items()}
    opt_fresh = _optimizer_template(model, optimizer, manifest) if optimizer is not None else {}
    fresh.update(opt_fresh)
    metadata = _metadata_from_json(path, manifest)   # refused here, on every rank alike, not inside DCP's collectives
    try:
        with warnings.catch_warnings():   # one process: DCP warns that it assumes so, which is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(fresh, storage_reader=_reader(path, metadata), no_dist=not _distributed())
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

    path = Path(path)
    manifest = read_manifest(path, None)
    metadata = _metadata_from_json(path, manifest)
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    if not state:
        raise ShardedCheckpointError(f"{path} holds no model tensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_reader(path, metadata), no_dist=True)
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
