"""The one network the library itself can rebuild from a description: a fully connected ReLU
network (compressed exports record its sizes, so a file of one loads without its code)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. ``MLP([64, 300, 100, 10])``; inputs are flattened."""

    def __init__(self, sizes: Sequence[int] = (64, 300, 100, 10)):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))
