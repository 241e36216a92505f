"""Small models and doubles shared by every test module."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes=(8, 16, 12, 4), bias=True) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """conv(1->4, 3x3) + BN + linear(4*4*4 -> 10): a conv and a linear layer with a norm between."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class AttnNet(nn.Module):
    """An embedding, a MultiheadAttention block, a LayerNorm and a head."""

    def __init__(self, vocab=20, dim=16, heads=4, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embedding(tokens)
        x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(x.mean(1))


def batch(model_in=8, n=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_steps(model, opt, steps, x, y, after_step=None):
    loss_f = nn.CrossEntropyLoss()
    for i in range(steps):
        opt.zero_grad()
        loss_f(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step(i)


def one_layer(shape) -> nn.Module:
    """A Linear (2-D shape) or Conv2d (4-D shape) layer whose weight has ``shape``."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0])
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]))


def layer_input(shape, g: torch.Generator):
    """A small input batch for :func:`one_layer` of ``shape``."""
    if len(shape) == 2:
        return torch.randn(3, shape[1], generator=g)
    return torch.randn(2, shape[1], shape[2] + 1, shape[3] + 1, generator=g)
