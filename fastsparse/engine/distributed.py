"""Keeping masks in agreement across ranks of ``torch.distributed`` (checks only; no engine of our own)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "mask_checksums", "check_agreement", "MaskDisagreement"]

_PRIME = 2654435761
_MOD = 2 ** 31 - 1


class MaskDisagreement(RuntimeError):
    """Ranks hold different masks: the replicas are no longer training the same network."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mask_checksums(masks: Sequence[Tensor]) -> Tensor:
    """Per mask: an int64 sum of a fixed pseudo-random weight per active position, plus the count."""
    sums = []
    for m in masks:
        flat = m.reshape(-1)
        weights = (torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * _PRIME + 1) % _MOD
        sums.append(torch.stack([weights[flat].sum(), flat.sum().to(torch.int64)]))
    return torch.stack(sums).cpu() if sums else torch.zeros(0, 2, dtype=torch.int64)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_agreement(names: Sequence[str], masks: Sequence[Tensor], step: int) -> None:
    """Raise :class:`MaskDisagreement` on every rank if any rank's masks differ from another's."""
    if not is_distributed():
        return
    local = mask_checksums(masks).to(_collective_device())
    hi, lo = local.clone(), local.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    differ = (hi != lo).any(dim=1).cpu()
    if differ.any():
        bad = [n for n, d in zip(names, differ.tolist()) if d]
        raise MaskDisagreement(
            f"at step {step} the ranks hold different masks for {bad}. Random choices must come from "
            "generators seeded identically on every rank (the engine's own do); a custom score "
            "function that draws from the global RNG, or a model built differently per rank, breaks this.")
