"""Compact, torch-only encodings of engine state (bool tensors as bytes)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .fsdp import local_rows, whole_union

__all__ = ["pack_bits", "unpack_bits", "engine_state", "load_engine_state"]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> bytes:
    """A bool tensor as bytes, 8 positions a byte, first position in the high bit
    (comparable with ==, 8x smaller than bools; torch only)."""
    flat = mask.detach().cpu().reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return bytes((flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8).tolist())


def unpack_bits(packed: bytes, like: Tensor) -> Tensor:
    if not packed:
        return torch.zeros_like(like, dtype=torch.bool)
    raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    bits = (raw.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)[: like.numel()]
    return bits.view(like.shape).to(like.device)


def _shape(sp: Any) -> tuple[int, ...]:
    return tuple(sp.shape) if getattr(sp, "compact", False) else tuple(sp.mask.shape)


def engine_state(engine: Any) -> dict[str, Any]:
    """What resumes an engine (the masks themselves travel with the model's state_dict)."""
    return {
        "step_count": engine.step_count, "seed": engine.seed, "total_steps": engine.total_steps,
        "history": list(engine.history),
        "masks": {sp.name: _shape(sp) for sp in engine._sps},
        "algorithms": [g.algorithm.state_dict() for g in engine.groups],
        "recipes": [g.recipe.state_dict() if g.recipe is not None else None for g in engine.groups],
        "finished": engine._finished,
        "explored": {name: pack_bits(_whole(engine, name, u)) if u.dtype == torch.bool else u.clone()
                     for name, u in engine._union.items()},
        "execution": {c.name: c.execution for c in engine.choices},
    }


def _masks(engine: Any) -> dict[str, Tensor]:
    return {sp.name: sp.mask for sp in engine._sps if not getattr(sp, "compact", False)}


def _whole(engine: Any, name: str, union: Tensor) -> Tensor:
    """The explored positions of a whole layer (gathered from the shards under FSDP)."""
    return whole_union(union, _masks(engine)[name]) if getattr(engine, "sharded", False) else union


def load_engine_state(engine: Any, state: dict[str, Any]) -> None:
    for sp in engine._sps:   # a loaded model may hold new values Parameters: the optimizer follows
        if getattr(sp, "compact", False):
            sp.resync(engine.optimizer)
    shapes = state.get("masks", {})
    ours = {sp.name: _shape(sp) for sp in engine._sps}
    if shapes and {k: tuple(v) for k, v in shapes.items()} != ours:
        wrong = sorted(set(shapes) ^ set(ours)) or [k for k in ours if tuple(shapes[k]) != ours[k]]
        raise ValueError(f"this sparsifier state does not fit the model: masks differ at {wrong}")
    if len(state.get("algorithms", [])) != len(engine.groups):
        raise ValueError(f"the state holds {len(state.get('algorithms', []))} algorithm groups, "
                         f"this sparsifier has {len(engine.groups)}")
    ours_exec = {c.name: c.execution for c in engine.choices}
    if state.get("execution", {}) and state["execution"] != ours_exec:
        raise ValueError(f"this sparsifier state was saved with sparse execution {state['execution']}, this engine "
                         f"runs {ours_exec}: build it with execution=<the saved dict> to resume")
    engine.step_count = int(state["step_count"])
    engine.seed = int(state["seed"])
    engine.total_steps = state.get("total_steps", engine.total_steps)
    engine.history = list(state.get("history", []))
    engine._finished = bool(state.get("finished", False))
    for g, s in zip(engine.groups, state["algorithms"]):
        g.algorithm.load_state_dict(s)
    for g, s in zip(engine.groups, state.get("recipes", [None] * len(engine.groups))):
        if g.recipe is not None and s is not None:
            g.recipe.load_state_dict(s)
    for name, saved in state.get("explored", {}).items():   # states saved before ITOP tracking have none
        if name not in engine._union:
            continue
        if isinstance(saved, Tensor):
            engine._union[name] = saved.clone()
        else:
            if getattr(engine, "sharded", False):
                mask = _masks(engine)[name]
                engine._union[name].copy_(local_rows(unpack_bits(saved, torch.empty(mask.shape)), mask))
            else:
                engine._union[name].copy_(unpack_bits(saved, engine._union[name]))
