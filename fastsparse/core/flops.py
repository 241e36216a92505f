"""FLOPs of a forward pass and of training, counted as the RigL paper (Evci et al. 2020) counts them.

A forward pass costs f = Σ_layers 2 · positions · weights: each weight of a Linear or Conv
layer is one multiply and one add at every output position (pixels of a convolution,
tokens of a sequence); a sparse layer counts only its active weights. Attention's two
matrix products (Q·Kᵀ and A·V, 2 · 2 · T² · D) are dense and counted too; biases, norms
and activations are left out, as in the paper. f_D is the dense count, f_S the sparse one.

Training FLOPs per example, as in the paper's appendix:

| method | per example | why |
|---|---|---|
| dense | 3 · f_D | forward, gradient w.r.t. activations, gradient w.r.t. weights |
| static, SET, other methods | 3 · f̄_S | everything sparse; f̄_S averaged over training, so gradual pruning counts its denser start |
| SNFS (momentum growth) | 2 · f̄_S + f_D | the weight gradient is dense at every step |
| RigL (gradient growth) | 3 · f̄_S + (f_D − f_S) at each update step | the dense gradient only when masks change |

The RigL row equals the paper's (3 · f_S · ΔT + 2 · f_S + f_D) / (ΔT + 1) when masks
change every ΔT steps through all of training; here the updates actually made are counted
(RigL stops at 75% of training by default).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .sharded import global_count
from .sparse_linear import compact_layers

__all__ = ["LayerCost", "layer_costs", "forward_flops", "training_rule", "training_flops"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerCost:
    """Output positions of each weight and the dense FLOPs of attention products, per example."""

    def __init__(self, positions: dict[str, int], extra: int):
        self.positions, self.extra = positions, extra


@torch.no_grad()
def layer_costs(model: nn.Module, input_shape: Sequence[int]) -> LayerCost:
    """Run one example through ``model`` and record where each weight is used."""
    positions: dict[str, int] = {}
    extra = [0]
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def on_layer(module, inputs, output):
        out_features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        name = names[module]
        positions[f"{name}.weight" if name else "weight"] = output.numel() // out_features

    def on_attention(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.MultiheadAttention):
            tokens, dim = (x.shape[1], x.shape[2]) if module.batch_first else (x.shape[0], x.shape[2])
            name = names[module]
            prefix = f"{name}." if name else ""
            positions[prefix + "in_proj_weight"] = tokens
            positions[prefix + "out_proj.weight"] = tokens
            extra[0] += 4 * tokens * tokens * dim
        else:
            extra[0] += module.matmul_flops(x.shape[-2], x.shape[-1])

    for module in model.modules():
        if isinstance(module, _LAYERS):
            hooks.append(module.register_forward_hook(on_layer))
        elif isinstance(module, nn.MultiheadAttention) or hasattr(module, "matmul_flops"):
            hooks.append(module.register_forward_hook(on_attention))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        model(torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu"))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return LayerCost(positions, extra[0])


def forward_flops(model: nn.Module, cost: LayerCost, sparse: bool = True) -> int:
    """FLOPs of one example's forward pass: 2 · positions · (active or all) weights, plus attention."""
    total = cost.extra
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    compact = compact_layers(model)
    for name, pos in cost.positions.items():
        if name in compact:   # a sparse-executed layer: its values are the active weights
            m = compact[name]
            total += 2 * pos * (m.nnz if sparse else m.in_features * m.out_features)
            continue
        p = params.get(name)
        if p is None:
            continue
        mask = buffers.get(name + "_mask") if sparse else None
        total += 2 * pos * (global_count(mask) if mask is not None else p.numel())
    return total


def training_rule(algorithms: Sequence) -> str:
    """How a set of algorithms is counted: ``dense``, ``sparse``, ``dense_gradient_every_step``
    (momentum growth) or ``dense_gradient_at_updates`` (gradient growth), from their grow scores."""
    from .scores import gradient_magnitude, gradient_momentum

    if not algorithms:
        return "dense"
    grows = [getattr(a, "grow_score", None) for a in algorithms]
    if any(g is gradient_momentum for g in grows):
        return "dense_gradient_every_step"
    if any(g is gradient_magnitude for g in grows):
        return "dense_gradient_at_updates"
    return "sparse"


def training_flops(rule: str, f_dense: float, f_sparse_mean: float, examples: int,
                   update_examples: int = 0, f_sparse_at_updates: float | None = None) -> float:
    """Training FLOPs over ``examples`` examples seen; ``update_examples``: examples in the batches
    at which masks changed (for gradient growth)."""
    if rule == "dense":
        return 3.0 * f_dense * examples
    if rule == "dense_gradient_every_step":
        return (2.0 * f_sparse_mean + f_dense) * examples
    total = 3.0 * f_sparse_mean * examples
    if rule == "dense_gradient_at_updates":
        fs = f_sparse_mean if f_sparse_at_updates is None else f_sparse_at_updates
        total += (f_dense - fs) * update_examples
    return total
