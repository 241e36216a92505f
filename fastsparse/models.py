"""Models the command line trains (written here: torchvision is not a dependency)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. ``MLP([64, 300, 100, 10])``."""

    def __init__(self, sizes: Sequence[int] = (64, 300, 100, 10)):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
