"""Pruning at initialisation: score the weights once, keep the best, train with the mask fixed.

| method | keep score |
|---|---|
| ``random`` | uniform random |
| ``magnitude`` | \\|θ\\| |
| ``snip`` (Lee et al. 2019) | \\|g ⊙ θ\\| / Σ\\|g ⊙ θ\\|, g = ∂L/∂θ on a batch |
| ``grasp`` (Wang et al. 2020) | θ ⊙ Hg (GraSP removes the highest −θ ⊙ Hg), logits / T, T = 200 |
| ``synflow`` (Tanaka et al. 2020) | \\|∂R/∂θ ⊙ θ\\|, R = Σ f_{\\|θ\\|}(1), iterated |

SynFlow needs no data: every parameter and float buffer is replaced by its absolute value,
the network runs in eval mode on an all-ones input, and n = 100 rounds each keep density
d^(k/n) (k = 1..n) of the weights by their current score. Scores are computed through
``torch.func.functional_call`` on copies of the parameters and buffers (float64 by default),
so the model's weights, signs, BN statistics and training mode are never touched.

Selection is global by default (the papers' choice), with each layer's best weight always
kept, or local with a distribution. The sanity checks of Frankle et al. (2021) are
reusable transforms: :func:`shuffle_masks` (per layer), :func:`reinit_weights`,
:func:`invert_scores` (keep the lowest scores).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..core.distributions import check_sparsity, resolve_sparsities
from ..core.masks import SparseParam, attach_mask, select_params, sparse_params, zero_outside_
from ..core.structured import check_scope, select_masks
from .base import Setup, SparsityAlgorithm, generator_for, register

__all__ = [
    "PAI_METHODS", "snip_scores", "grasp_scores", "hessian_gradient_product", "synflow_scores",
    "pai_masks", "prune_at_init", "shuffle_masks", "invert_scores", "reinit_weights",
    "PaI", "SNIP", "GraSP", "SynFlow",
]

PAI_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
_NEEDS_DATA = ("snip", "grasp")

Batch = Sequence[Tensor]


def _check_batch(method: str, batch: Batch | None) -> tuple[Tensor, Tensor]:
    if batch is None:
        raise ValueError(f"{method} scores weights on a batch of data: pass batch=(inputs, targets)")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def _leaves(params: Sequence[SparseParam], fn: Callable[[Tensor], Tensor] = lambda t: t) -> list[Tensor]:
    return [fn(sp.param.detach()).clone().requires_grad_(True) for sp in params]


def _call(model: nn.Module, params: Sequence[SparseParam], leaves: Sequence[Tensor], x: Tensor,
          cast: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """model(x) with the sparse weights replaced by ``leaves`` and every buffer by a copy (no side effects)."""
    subst: dict[str, Tensor] = {name: b.clone() if cast is None or not b.is_floating_point() else cast(b)
                                for name, b in model.named_buffers()}
    if cast is not None:
        subst.update({name: cast(p.detach()) for name, p in model.named_parameters()})
    subst.update({sp.name: leaf for sp, leaf in zip(params, leaves)})
    return functional_call(model, subst, (x,))


def snip_scores(model: nn.Module, params: Sequence[SparseParam], batch: Batch,
                loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> list[Tensor]:
    """|∂L/∂θ ⊙ θ| on one batch, normalised by its sum over all weights (SNIP's connection sensitivity)."""
    x, y = _check_batch("snip", batch)
    loss_fn = loss_fn or F.cross_entropy
    ws = _leaves(params)
    grads = torch.autograd.grad(loss_fn(_call(model, params, ws, x), y), ws, allow_unused=True)
    scores = [(g if g is not None else torch.zeros_like(w)).mul(w).abs().detach() for g, w in zip(grads, ws)]
    total = sum(float(s.sum()) for s in scores)
    return [s / total for s in scores] if total > 0 else scores


def hessian_gradient_product(model: nn.Module, params: Sequence[SparseParam], batch: Batch,
                             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                             temperature: float = 200.0) -> tuple[list[Tensor], list[Tensor]]:
    """(g, Hg) of L(f(x)/T, y) with respect to the sparse weights, by double backprop."""
    x, y = _check_batch("grasp", batch)
    loss_fn = loss_fn or F.cross_entropy
    ws = _leaves(params)
    loss = loss_fn(_call(model, params, ws, x) / temperature, y)
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    g = [t.detach() for t in grads]
    z = sum((a * b).sum() for a, b in zip(grads, g))
    hg = torch.autograd.grad(z, ws, allow_unused=True)
    return g, [(h if h is not None else torch.zeros_like(w)).detach() for h, w in zip(hg, ws)]


def grasp_scores(model: nn.Module, params: Sequence[SparseParam], batch: Batch,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, temperature: float = 200.0) -> list[Tensor]:
    """Keep scores θ ⊙ Hg: keeping the largest is GraSP's removal of the highest −θ ⊙ Hg."""
    _, hg = hessian_gradient_product(model, params, batch, loss_fn, temperature)
    return [sp.param.detach() * h for sp, h in zip(params, hg)]


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None, batch: Batch | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if batch is not None:
        return tuple(batch[0].shape[1:])
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is not None and not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return (first.in_features,)
    raise ValueError("synflow needs the shape of one input (input_shape=(C, H, W)) to build its all-ones input")


class _EvalMode:
    """Eval mode for the duration, every module's training flag restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def synflow_scores(model: nn.Module, params: Sequence[SparseParam], input_shape: Sequence[int],
                   masks: Sequence[Tensor] | None = None, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """One SynFlow round: |∂R/∂θ ⊙ θ| with R = Σ f(1), every parameter and float buffer |·|, eval mode."""
    cast = lambda t: t.detach().abs().to(dtype)  # noqa: E731
    ws = [(cast(sp.param) * (m if m is not None else 1)).requires_grad_(True)
          for sp, m in zip(params, masks if masks is not None else [None] * len(params))]
    device = params[0].param.device
    with _EvalMode(model):
        out = _call(model, params, ws, torch.ones((1, *input_shape), dtype=dtype, device=device), cast)
    grads = torch.autograd.grad(out.sum(), ws, allow_unused=True)
    return [(g if g is not None else torch.zeros_like(w)).mul(w).abs().detach() for g, w in zip(grads, ws)]


def _select(scores: list[Tensor], sparsities: Sequence[float], scope: str, masks=None) -> list[Tensor]:
    if scope == "global":
        return select_masks(scores, None, sparsities[0], "global", masks)
    return select_masks(scores, None, list(sparsities), "local", masks)


def pai_masks(
    model: nn.Module,
    params: Sequence[SparseParam],
    method: str,
    sparsities: Sequence[float],
    scope: str = "global",
    batch: Batch | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    iterations: int = 100,
    temperature: float = 200.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    score_transform: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> list[Tensor]:
    """Masks from a pruning-at-initialisation method (nothing on the model changes).

    sparsities: one per parameter (local), or the model sparsity first (global).
    score_transform: applied to the scores before each selection (e.g. :func:`invert_scores`).
    """
    method = _check_method(method)
    scope = check_scope(scope)
    tf = score_transform or (lambda s: s)
    if method in _NEEDS_DATA:
        _check_batch(method, batch)
    if method == "synflow":
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer ≥ 1, got {iterations!r}")
        shape = _input_shape(model, input_shape, batch)
        masks = None
        for k in range(1, iterations + 1):
            dens = [(1.0 - s) ** (k / iterations) for s in sparsities]
            scores = tf(synflow_scores(model, params, shape, masks, dtype))
            masks = _select(scores, [1.0 - d for d in dens], scope, masks)
        return masks
    if method == "random":
        scores = [torch.rand(sp.param.shape, generator=generator_for(seed, 0, sp.name)).to(sp.param.device)
                  for sp in params]
    elif method == "magnitude":
        scores = [sp.param.detach().abs() for sp in params]
    elif method == "snip":
        scores = snip_scores(model, params, batch, loss_fn)
    else:
        scores = grasp_scores(model, params, batch, loss_fn, temperature)
    return _select(tf(scores), sparsities, scope)


def _check_method(method: str) -> str:
    if method not in PAI_METHODS:
        raise ValueError(f"unknown pruning-at-initialisation method {method!r}; valid: {list(PAI_METHODS)}")
    return method


def prune_at_init(
    model: nn.Module,
    method: str,
    sparsity: float,
    batch: Batch | None = None,
    scope: str = "global",
    *,
    distribution: str | Callable = "uniform",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    iterations: int = 100,
    temperature: float = 200.0,
    dtype: torch.dtype = torch.float64,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    seed: int = 0,
    score_transform: Callable[[list[Tensor]], list[Tensor]] | None = None,
    mask_transform: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Score, select and attach masks (``<param>_mask`` buffers); returns {parameter name: mask}.

    Train afterwards with the masks fixed, e.g. ``Sparsifier(model, optimizer)``. ``scope``:
    ``global`` (one threshold, no layer emptied) or ``local`` (``distribution`` per layer).
    ``mask_transform`` runs on the masks before they are attached (e.g. :func:`shuffle_masks`).
    """
    _check_method(method)
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    if method in _NEEDS_DATA:
        _check_batch(method, batch)
    params = select_params(model, include, exclude)
    if scope == "global":
        sparsities = [sparsity] * len(params)
    else:
        sparsities = resolve_sparsities(distribution, [tuple(sp.param.shape) for sp in params], sparsity)
    masks = pai_masks(model, params, method, sparsities, scope, batch, loss_fn, input_shape, iterations,
                      temperature, dtype, seed, score_transform)
    if mask_transform is not None:
        masks = list(mask_transform(masks))
        for sp, m in zip(params, masks):
            if tuple(m.shape) != tuple(sp.param.shape):
                raise ValueError(f"mask_transform returned shape {tuple(m.shape)} for {sp.name} {tuple(sp.param.shape)}")
    for sp, m in zip(params, masks):
        attach_mask(sp, m)
    return {sp.name: sp.mask for sp in params}


# --- sanity checks (Frankle et al. 2021) ---------------------------------------------------------
def invert_scores(scores: Sequence[Tensor]) -> list[Tensor]:
    """Negated scores: selection then keeps the lowest-scored weights."""
    return [-s for s in scores]


def shuffle_masks(masks: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """Each mask's entries permuted at random within its layer (same per-layer count)."""
    out = []
    for i, m in enumerate(masks):
        perm = torch.randperm(m.numel(), generator=generator_for(seed, 0, f"shuffle:{i}")).to(m.device)
        out.append(m.reshape(-1)[perm].view(m.shape).clone())
    return out


@torch.no_grad()
def reinit_weights(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every masked layer (``reset_parameters``, seeded), then re-apply the masks."""
    sps = sparse_params(model)
    if not sps:
        raise ValueError("the model carries no masks: prune it first")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seen = set()
        for sp in sps:
            if id(sp.module) not in seen and hasattr(sp.module, "reset_parameters"):
                seen.add(id(sp.module))
                sp.module.reset_parameters()
    for sp in sps:
        zero_outside_(sp.param, sp.mask)


# --- as registered algorithms ----------------------------------------------------------------------
@register
class PaI(SparsityAlgorithm):
    """A pruning-at-initialisation method as a static algorithm: masks scored once at attach,
    through the model the engine hands over (:class:`~fastsparse.algorithms.base.Setup`).

    method: one of :data:`PAI_METHODS`; batch: (inputs, targets) for SNIP and GraSP (default:
    the engine's data, ``Sparsifier(..., data=loader)``); input_shape: SynFlow's input (read
    from the batch, or the first Linear layer otherwise).
    """

    name = "pai"
    method = "magnitude"

    def __init__(self, sparsity: float = 0.9, method: str | None = None, batch: Batch | None = None,
                 scope: str = "global", distribution: str | Callable = "uniform",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 input_shape: Sequence[int] | None = None, iterations: int = 100, temperature: float = 200.0,
                 dtype: torch.dtype = torch.float64, **kwargs):
        super().__init__(sparsity, distribution, **kwargs)
        self.method = _check_method(method or type(self).method)
        self.needs = frozenset({"batch"}) if self.method in _NEEDS_DATA else \
            frozenset({"shape"}) if self.method == "synflow" else frozenset()
        self.scope = check_scope(scope)
        if batch is not None:
            _check_batch(self.method, batch)
        self.batch, self.loss_fn, self.input_shape = batch, loss_fn, input_shape
        self.iterations, self.temperature, self.dtype = iterations, temperature, dtype

    @property
    def needs_data(self) -> bool:
        return self.method in _NEEDS_DATA

    def initial_sparsities(self, params: Sequence[SparseParam]) -> list[float]:
        if self.scope == "global":
            return [self.sparsity] * len(params)
        return super().initial_sparsities(params)

    def initial_masks(self, params, sparsities, setup: Setup) -> list[Tensor]:
        if setup.model is None:
            raise ValueError(f"{self.name} scores weights through the model: attach it with Sparsifier(model, ...)")
        batch = self.batch if self.batch is not None else setup.batch
        if self.needs_data and batch is None:
            raise ValueError(f"{self.method} scores weights on a batch of data: pass data= (a batch or a DataLoader) "
                             f"to the engine, or batch=(inputs, targets) to {type(self).__name__}")
        return pai_masks(setup.model, params, self.method, sparsities, self.scope, batch, self.loss_fn,
                         self.input_shape, self.iterations, self.temperature, self.dtype, setup.seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sparsity={self.sparsity}, method={self.method!r}, scope={self.scope!r})"


@register
class SNIP(PaI):
    name = "snip"
    method = "snip"
    needs = frozenset({"batch"})


@register
class GraSP(PaI):
    name = "grasp"
    method = "grasp"
    needs = frozenset({"batch"})


@register
class SynFlow(PaI):
    name = "synflow"
    method = "synflow"
    needs = frozenset({"shape"})   # one batch's input shape, when the engine has data

