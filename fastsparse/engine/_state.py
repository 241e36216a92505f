"""Compact, torch-only encodings of engine state (bool tensors as bytes)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "unpack_bits"]

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
