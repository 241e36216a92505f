"""Keeping masks in agreement across ranks of ``torch.distributed`` (checks only; no engine of our own)."""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.errors import MaskDisagreement
from ..core.sharded import TRAFFIC

__all__ = ["is_distributed", "mask_checksums", "check_agreement", "MaskDisagreement"]

_BIT_WEIGHTS = (1 << torch.arange(8)).to(torch.uint8)
_WORDS = 4   # int64 words of each mask's SHA-256 compared across ranks (256 bits)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _packed(mask: Tensor) -> bytes:
    """The mask's bits, 8 to a byte, packed on its own device (1/8 of the bytes cross to the CPU)."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    packed = (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)
    return packed.cpu().numpy().tobytes()


def mask_checksums(masks: Sequence[Tensor], names: Sequence[str] | None = None) -> Tensor:
    """Per mask, int64 words: the SHA-256 of its name, shape and packed bits (4 words), then its
    active count. Two different masks agree in all 256 bits only by a SHA-256 collision."""
    rows = []
    for i, m in enumerate(masks):
        h = hashlib.sha256()
        h.update(f"{names[i] if names is not None else ''}|{tuple(m.shape)}|".encode())
        h.update(_packed(m))
        words = struct.unpack("<4q", h.digest())
        rows.append(list(words) + [int(m.sum())])
    return torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros(0, _WORDS + 1, dtype=torch.int64)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _min_max(t: Tensor) -> tuple[Tensor, Tensor]:
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    TRAFFIC.add(hi)
    TRAFFIC.add(lo)
    return lo.cpu(), hi.cpu()


def check_same_count(n_masks: int, step: int) -> None:
    """Raise :class:`MaskDisagreement` on every rank unless every rank holds ``n_masks`` sparse
    parameters (checked first, so that mismatched ranks refuse instead of failing inside a
    collective of mismatched sizes)."""
    lo, hi = _min_max(torch.tensor([n_masks], dtype=torch.int64, device=_collective_device()))
    if int(lo) != int(hi):
        raise MaskDisagreement(
            f"at step {step} the ranks hold different numbers of sparse parameters (between {int(lo)} and "
            f"{int(hi)}; this rank, {dist.get_rank()}, holds {n_masks}): every rank must build the same model "
            "and select the same parameters")


def check_agreement(names: Sequence[str], masks: Sequence[Tensor], step: int) -> None:
    """Raise :class:`MaskDisagreement` on every rank if any rank's masks differ from another's.

    First the number of masks is compared (so that ranks holding different numbers of sparse
    parameters all refuse, instead of failing inside a collective of mismatched sizes), then each
    mask's SHA-256 (name, shape, bits) and active count."""
    if not is_distributed():
        return
    device = _collective_device()
    check_same_count(len(masks), step)
    lo, hi = _min_max(mask_checksums(masks, names).to(device))
    differ = (hi != lo).any(dim=1)
    if differ.any():
        bad = [n for n, d in zip(names, differ.tolist()) if d]
        raise MaskDisagreement(
            f"at step {step} the ranks hold different masks for {bad}. Random choices must come from "
            "generators seeded identically on every rank (the engine's own do); a custom score "
            "function that draws from the global RNG, or a model built differently per rank, breaks this.")
