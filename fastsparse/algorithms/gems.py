"""Tickets found by training scores with frozen weights: edge-popup (Ramanujan et al. 2020) and
Rare Gems / GEM-MINER (Sreenivasan et al. 2022).

During the search every selected weight w carries a score; the forward uses w ⊙ m(score)
with a straight-through gradient to the score (∂L/∂score := ∂L/∂m), and the weights are
frozen (signed-constant init, sign(w) · sqrt(2 / fan_in); BatchNorm non-affine: its weight
and bias fixed at 1 and 0). The layers stay ordinary modules: :class:`ScoredModel` runs the
model with the masked weights through ``torch.func.functional_call``, so any Linear, Conv or
attention weight can carry scores. After the search, :meth:`ScoredModel.finalize` attaches
the found masks as ordinary ``<param>_mask`` buffers: masks, export and counts see a plain
masked parameter.

edge-popup: m = top-k of |score| per layer (sizes from ``distribution``) or globally.
GEM-MINER (``hc``, ``hc_iter``): scores p ∈ [0, 1], m = 1[p > 0.5] ⊙ flag, p clamped to [0, 1]
after every step, loss + λ · Σ p² (``L2``) or λ · Σ |p| (``L1``). ``hc_iter`` freezes, every T
epochs, the globally lowest flagged scores (flag = 0) so that after round i of
R = ⌊(E − 1) / T⌋ rounds round((1 − s)^(i/R) · N) weights stay flagged: a per-round rate of
1 − d^(1/R) that lands exactly on the target density d. The final mask is flag ⊙ 1[p > 0.5],
or the flags alone with ``unflag_before_finetune``; ``hc`` keeps the top-k scores at the end.
Fine-tuning then trains the weights under the fixed mask (:func:`finetune`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..core.masks import SparseParam, attach_mask, global_topk_masks, n_keep, sparse_params, topk_mask
from .base import SparsityAlgorithm, generator_for, register

__all__ = [
    "EdgePopup", "GemMiner", "ScoredModel", "search", "finetune", "signed_constant_", "freeze_bn_affine_",
    "hc_iter_keep_counts", "SCORE_INITS", "FINE_TUNE_POLICIES", "WEIGHT_INITS", "sanity_variants", "GEM_ALGOS", "REGULARIZATIONS",
]

SCORE_INITS = ("unif", "half", "bern", "kaiming")
FINE_TUNE_POLICIES = ("cosine", "constant", "multistep")
WEIGHT_INITS = ("signed_constant", "keep")
GEM_ALGOS = ("hc", "hc_iter")
REGULARIZATIONS = ("L2", "L1", "none")


class _STE(torch.autograd.Function):
    """Forward: the hard gate; backward: the gradient passes to the score unchanged."""

    @staticmethod
    def forward(ctx, score: Tensor, hard: Tensor) -> Tensor:  # type: ignore[override]
        return hard.to(score.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


@torch.no_grad()
def signed_constant_(params: Sequence[SparseParam], densities: Sequence[float] | None = None) -> None:
    """w ← sign(w) · sqrt(2 / fan_in), fan_in = numel / shape[0]; with ``densities`` (Rare Gems'
    ``scale_fan``) the fan-in counts only the weights a layer keeps: fan_in · density."""
    for i, sp in enumerate(params):
        w = sp.param
        fan_in = w[0].numel() if w.dim() > 1 else w.numel()
        if densities is not None:
            fan_in = max(1e-12, fan_in * float(densities[i]))
        w.copy_(torch.sign(w) * math.sqrt(2.0 / fan_in))


@torch.no_grad()
def freeze_bn_affine_(model: nn.Module) -> list[nn.Parameter]:
    """Non-affine BatchNorm: weight = 1, bias = 0, frozen. Returns the parameters frozen."""
    frozen = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.fill_(1.0)
            m.bias.zero_()
            for p in (m.weight, m.bias):
                p.requires_grad_(False)
                frozen.append(p)
    return frozen


def hc_iter_keep_counts(numel: int, sparsity: float, epochs: int, period: int) -> list[int]:
    """Flagged weights left after each of the R = ⌊(E − 1)/T⌋ freezing rounds:
    round((1 − s)^(i/R) · N), i = 1..R (per-round rate 1 − d^(1/R); the last is the target)."""
    rounds = (int(epochs) - 1) // int(period) if period >= 1 else 0
    if rounds < 1 and sparsity > 0:
        raise ValueError(f"GEM-MINER cannot reach sparsity {sparsity}: {epochs} epochs with a freezing round every "
                         f"{period} epochs give ⌊(E − 1)/T⌋ = {max(rounds, 0)} rounds; use more epochs or a "
                         "shorter iter_period")
    d = 1.0 - sparsity
    return [n_keep(numel, 1.0 - d ** (i / rounds)) for i in range(1, rounds + 1)]


class _ScoreSearch(SparsityAlgorithm):
    """Shared by edge-popup and GEM-MINER. As a registered algorithm in the engine it is a static
    mask: the masks found by the last :meth:`search` (``found``), or, before any search, the top-k
    of the initial scores (a random mask with exact per-layer counts)."""

    keeps_count = True
    score_init_default = "unif"

    def __init__(self, sparsity: float = 0.9, distribution: str | Callable = "uniform", scope: str = "local",
                 score_init: str | None = None, fine_tune_epochs: int | None = None, fine_tune_lr: float = 0.01,
                 fine_tune_lr_policy: str = "cosine", lr_adjust: int = 50, lr_gamma: float = 0.1,
                 weight_init: str = "signed_constant", scale_fan: bool = False, sanity_checks: bool = False,
                 **kwargs):
        super().__init__(sparsity, distribution, **kwargs)
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {weight_init!r}; valid: {list(WEIGHT_INITS)} (keep: the "
                             "model's own initial weights)")
        if scope not in ("local", "global"):
            raise ValueError(f"unknown scope {scope!r}; valid: ['local', 'global']")
        score_init = score_init or self.score_init_default
        if score_init not in SCORE_INITS:
            raise ValueError(f"unknown score_init {score_init!r}; valid: {list(SCORE_INITS)}")
        if fine_tune_epochs is not None and (isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int)
                                             or fine_tune_epochs < 1):
            raise ValueError(f"fine_tune_epochs must be a whole number ≥ 1 (None: as many as the search), "
                             f"got {fine_tune_epochs!r}")
        if not float(fine_tune_lr) > 0:
            raise ValueError(f"fine_tune_lr must be > 0, got {fine_tune_lr}")
        policy = str(fine_tune_lr_policy).lower().removesuffix("_lr")
        if policy not in FINE_TUNE_POLICIES:
            raise ValueError(f"unknown fine_tune_lr_policy {fine_tune_lr_policy!r}; valid: "
                             f"{list(FINE_TUNE_POLICIES)} (a trailing _lr is accepted: cosine_lr)")
        if isinstance(lr_adjust, bool) or not isinstance(lr_adjust, int) or lr_adjust < 1:
            raise ValueError(f"lr_adjust must be a whole number of epochs ≥ 1, got {lr_adjust!r}")
        if not 0 < float(lr_gamma) <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {lr_gamma}")
        self.scope, self.score_init = scope, score_init
        self.fine_tune_epochs, self.fine_tune_lr, self.fine_tune_lr_policy = fine_tune_epochs, float(fine_tune_lr), policy
        self.lr_adjust, self.lr_gamma = lr_adjust, float(lr_gamma)
        self.weight_init, self.scale_fan, self.sanity_checks = weight_init, bool(scale_fan), bool(sanity_checks)
        self.found: dict[str, Tensor] = {}

    def fine_tune_factor(self, epoch: float, epochs: int) -> float:
        """The fine-tuning learning rate at ``epoch`` (fractional) of ``epochs``, as a factor of
        ``fine_tune_lr``: cosine ½(1 + cos(π · epoch / epochs)); constant 1; multistep
        lr_gamma^⌊epoch / lr_adjust⌋."""
        if self.fine_tune_lr_policy == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / max(1, epochs))))
        if self.fine_tune_lr_policy == "multistep":
            return self.lr_gamma ** int(epoch // self.lr_adjust)
        return 1.0

    def init_scores(self, params: Sequence[SparseParam], seed: int) -> list[Tensor]:
        out = []
        for sp in params:
            g = generator_for(seed, 0, "score:" + sp.name)
            shape = sp.param.shape
            if self.score_init == "unif":
                s = torch.rand(shape, generator=g)
            elif self.score_init == "half":
                s = 0.5 + 1e-3 * (torch.rand(shape, generator=g) - 0.5)
            elif self.score_init == "bern":
                s = (torch.rand(shape, generator=g) < 0.5).float()
            else:  # kaiming uniform, edge-popup's default
                fan_in = sp.param[0].numel() if sp.param.dim() > 1 else sp.param.numel()
                bound = math.sqrt(6.0 / fan_in)
                s = (torch.rand(shape, generator=g) * 2 - 1) * bound
            out.append(s.to(sp.param.device, torch.float32))
        return out

    @torch.no_grad()
    def initial_masks(self, params, sparsities, seed: int) -> list[Tensor]:
        if self.found and all(sp.name in self.found for sp in params):
            return [self.found[sp.name].to(sp.param.device) for sp in params]
        scores = self.init_scores(params, seed)
        return [topk_mask(s.abs(), n_keep(s.numel(), sp_s)) for s, sp_s in zip(scores, sparsities)]

    def state_dict(self) -> dict[str, Any]:
        return {"found": {k: v.clone() for k, v in self.found.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.found = {k: v.clone() for k, v in state.get("found", {}).items()}


@register
class EdgePopup(_ScoreSearch):
    """edge-popup: keep the top-k |scores| per layer (``scope="local"``, sizes from
    ``distribution``) or over all layers (``scope="global"``); weights frozen."""

    name = "edge_popup"
    score_init_default = "kaiming"

    def gate(self, model: "ScoredModel") -> list[Tensor]:
        with torch.no_grad():
            mags = [s.detach().abs() for s in model.scores]
            if self.scope == "global":
                hard = global_topk_masks(mags, sum(model.counts))
            else:
                hard = [topk_mask(m, k) for m, k in zip(mags, model.counts)]
        return [_STE.apply(s.abs(), h) for s, h in zip(model.scores, hard)]   # ∂/∂s = sign(s) · ∂L/∂m

    def final_masks(self, model: "ScoredModel") -> list[Tensor]:
        return [g.detach().bool() for g in self.gate(model)]


@register
class GemMiner(_ScoreSearch):
    """GEM-MINER (``algo="hc_iter"``, default, or ``"hc"``): scores in [0, 1], forward gate
    1[p > 0.5] ⊙ flag (``quantized``; else p ⊙ flag), clamp after each step, ``regularization``
    ``"L2"`` (λ Σ p²) or ``"L1"`` with ``lmbda``; ``iter_period`` T epochs between freezing
    rounds; ``unflag_before_finetune``: the final mask is the flags alone."""

    name = "gem"

    def __init__(self, sparsity: float = 0.9, distribution: str | Callable = "uniform", algo: str = "hc_iter",
                 iter_period: int = 5, score_init: str | None = None, regularization: str = "L2",
                 lmbda: float = 1e-4, quantized: bool = True, unflag_before_finetune: bool = True,
                 quantize_threshold: float = 0.5, checkpoint_at_prune: bool = False, **kwargs):
        super().__init__(sparsity, distribution, score_init=score_init, **kwargs)
        if algo not in GEM_ALGOS:
            raise ValueError(f"unknown GEM-MINER algo {algo!r}; valid: {list(GEM_ALGOS)}")
        if score_init == "kaiming":
            raise ValueError("GEM-MINER scores live in [0, 1]: score_init must be 'unif', 'half' or 'bern'")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"unknown regularization {regularization!r}; valid: {list(REGULARIZATIONS)}")
        if isinstance(iter_period, bool) or not isinstance(iter_period, int) or iter_period < 1:
            raise ValueError(f"iter_period must be a whole number of epochs ≥ 1, got {iter_period!r}")
        if float(lmbda) < 0:
            raise ValueError(f"lmbda must be ≥ 0, got {lmbda}")
        self.algo, self.iter_period, self.regularization = algo, iter_period, regularization
        if not 0.0 < float(quantize_threshold) < 1.0:
            raise ValueError(f"quantize_threshold must be in (0, 1) (scores live in [0, 1]), got {quantize_threshold}")
        self.lmbda, self.quantized = float(lmbda), bool(quantized)
        self.threshold = float(quantize_threshold)
        self.checkpoint_at_prune = bool(checkpoint_at_prune)
        self.unflag_before_finetune = bool(unflag_before_finetune)

    def check_budget(self, numel: int, epochs: int) -> list[int]:
        """The flagged count after each freezing round (raises if the target is out of reach)."""
        return hc_iter_keep_counts(numel, self.sparsity, epochs, self.iter_period) if self.algo == "hc_iter" else []

    def gate(self, model: "ScoredModel") -> list[Tensor]:
        out = []
        for s, f in zip(model.scores, model.flags):
            g = _STE.apply(s, s.detach() > self.threshold) if self.quantized else s
            out.append(g * f)
        return out

    def penalty(self, model: "ScoredModel") -> Tensor:
        if self.regularization == "none" or self.lmbda == 0:
            return model.scores[0].new_zeros(())
        if self.regularization == "L2":
            return self.lmbda * sum((s ** 2).sum() for s in model.scores)
        return self.lmbda * sum(s.abs().sum() for s in model.scores)

    @torch.no_grad()
    def after_step(self, model: "ScoredModel") -> None:
        for s, f in zip(model.scores, model.flags):
            s.clamp_(0.0, 1.0)
            s.mul_(f)   # frozen scores stay at 0

    @torch.no_grad()
    def freeze_round(self, model: "ScoredModel", keep: int) -> None:
        """Unflag the globally lowest flagged scores so that ``keep`` stay flagged."""
        scores = [torch.where(f.bool(), s.detach(), torch.full_like(s, -1.0)) for s, f in zip(model.scores, model.flags)]
        kept = global_topk_masks(scores, keep)
        for f, k, s in zip(model.flags, kept, model.scores):
            f.mul_(k.to(f.dtype))
            s.mul_(f)

    def final_masks(self, model: "ScoredModel") -> list[Tensor]:
        if self.algo == "hc":
            mags = [s.detach() for s in model.scores]
            return global_topk_masks(mags, sum(model.counts)) if self.scope == "global" else \
                [topk_mask(m, k) for m, k in zip(mags, model.counts)]
        flags = [f.bool() for f in model.flags]
        if self.unflag_before_finetune:
            return flags
        return [f & (s.detach() > self.threshold) for f, s in zip(flags, model.scores)]


class ScoredModel(nn.Module):
    """The model run with w ⊙ gate(score) for every selected weight; the scores are its only
    trainable parameters. Build it with :meth:`from_model`, train it, then :meth:`finalize`."""

    def __init__(self, model: nn.Module, algorithm: _ScoreSearch, params: Sequence[SparseParam],
                 sparsities: Sequence[float], seed: int = 0, init: str = "signed_constant"):
        super().__init__()
        if init not in ("signed_constant", "keep"):
            raise ValueError(f"unknown weight init {init!r}; valid: ['signed_constant', 'keep']")
        self.model, self.algorithm = model, algorithm
        self.params = list(params)
        self.names = [sp.name for sp in self.params]
        self.counts = [n_keep(sp.param.numel(), s) for sp, s in zip(self.params, sparsities)]
        self.scores = nn.ParameterList([nn.Parameter(s) for s in algorithm.init_scores(self.params, seed)])
        for i, s in enumerate(self.scores):
            self.register_buffer(f"flag_{i}", torch.ones_like(s))
        self._grad_flags = {id(p): p.requires_grad for p in model.parameters()}
        if init == "signed_constant":
            signed_constant_(self.params, [1.0 - s for s in sparsities] if algorithm.scale_fan else None)
        for p in model.parameters():
            p.requires_grad_(False)
        freeze_bn_affine_(model)

    @property
    def flags(self) -> list[Tensor]:
        return [getattr(self, f"flag_{i}") for i in range(len(self.scores))]

    def forward(self, *args, **kwargs):
        gates = self.algorithm.gate(self)
        weights = {n: sp.param * g for n, sp, g in zip(self.names, self.params, gates)}
        return torch.func.functional_call(self.model, weights, args, kwargs)

    @torch.no_grad()
    def finalize(self) -> list[Tensor]:
        """Attach the found masks to the model as ordinary mask buffers; weights trainable again
        (BatchNorm stays non-affine). Returns the masks."""
        masks = [m.to(torch.bool) for m in self.algorithm.final_masks(self)]
        for sp, m in zip(self.params, masks):
            attach_mask(sp, m)
        bn = {id(p) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
              for p in (m.weight, m.bias)}
        for p in self.model.parameters():
            p.requires_grad_(self._grad_flags.get(id(p), True) and id(p) not in bn)
        self.algorithm.found = {n: m.clone() for n, m in zip(self.names, masks)}
        return masks


class _Fixed(nn.Module):
    """``model`` run with the given weights (``{name: tensor}``) in place of its own."""

    def __init__(self, model: nn.Module, weights: dict[str, Tensor]):
        super().__init__()
        self.model, self.weights = model, weights

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.weights, args, kwargs)


@torch.no_grad()
def sanity_variants(scored: ScoredModel, seed: int = 0) -> dict[str, nn.Module]:
    """The found ticket before fine-tuning and its two sanity checks (Frankle et al. 2021), as
    models to evaluate: ``ticket`` (frozen weights ⊙ found mask), ``shuffled`` (each layer's mask
    permuted at random, same count) and ``reinit`` (the weights' signs drawn afresh, same
    magnitudes). A ticket that beats neither variant only found per-layer densities."""
    from .pai import shuffle_masks

    masks = [m.to(sp.param.dtype) for m, sp in zip(scored.algorithm.final_masks(scored), scored.params)]
    weights = [sp.param.detach() for sp in scored.params]
    signs = [torch.where(torch.rand(w.shape, generator=generator_for(seed, 0, "reinit:" + n)) < 0.5, -1.0, 1.0)
             .to(w.device, w.dtype) for w, n in zip(weights, scored.names)]
    variants = {
        "ticket": [w * m for w, m in zip(weights, masks)],
        "shuffled": [w * m for w, m in zip(weights, shuffle_masks(masks, seed))],
        "reinit": [w.abs() * s * m for w, s, m in zip(weights, signs, masks)],
    }
    return {k: _Fixed(scored.model, dict(zip(scored.names, ws))) for k, ws in variants.items()}


def _default_lr_schedule(opt, total):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total))


def search(
    model: nn.Module,
    algorithm: _ScoreSearch,
    train_data: Iterable,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    epochs: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    init: str | None = None,
    on_epoch_end: Callable[[int, ScoredModel], None] | None = None,
    lr_factor: Callable[[int], float] | None = None,
) -> ScoredModel:
    """Train the scores of ``model`` for ``epochs`` epochs (SGD; the learning rate ``lr`` times
    ``lr_factor(step)``, default a cosine over the search), then attach the found masks
    (:meth:`ScoredModel.finalize`). ``loss_fn(model, batch) -> loss`` is the train step's loss,
    called with the scored model; ``init`` (default the algorithm's ``weight_init``): the frozen
    weights, ``signed_constant`` or ``keep``. Raises before changing anything if the model has no
    sparsifiable layer or GEM-MINER cannot reach the target in time."""
    init = init or algorithm.weight_init
    params = algorithm.select(model)   # raises on a model without sparsifiable layers
    sparsities = algorithm.initial_sparsities(params)
    steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    rounds: list[int] = []
    if isinstance(algorithm, GemMiner):
        rounds = algorithm.check_budget(sum(sp.param.numel() for sp in params), epochs)
    scored = ScoredModel(model, algorithm, params, sparsities, seed, init)
    opt = torch.optim.SGD(scored.scores.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = _default_lr_schedule(opt, epochs * steps_per_epoch) if lr_factor is None else \
        torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    scored.train()
    for epoch in range(epochs):
        for batch in train_data:
            opt.zero_grad()
            loss = loss_fn(scored, batch)
            if isinstance(algorithm, GemMiner):
                loss = loss + algorithm.penalty(scored)
            loss.backward()
            opt.step()
            sched.step()
            if isinstance(algorithm, GemMiner):
                algorithm.after_step(scored)
        done = epoch + 1
        if rounds and done % algorithm.iter_period == 0 and done // algorithm.iter_period <= len(rounds):
            algorithm.freeze_round(scored, rounds[done // algorithm.iter_period - 1])
        if on_epoch_end is not None:
            on_epoch_end(epoch, scored)
    scored.finalize()
    return scored


def finetune(
    model: nn.Module,
    train_data: Iterable,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    epochs: int,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    seed: int = 0,
):
    """Train the weights of a model that carries masks (a found ticket) with the masks fixed:
    SGD at ``lr`` (GEM-MINER's ``fine_tune_lr``) with a cosine schedule unless ``optimizer`` /
    ``scheduler`` are given. Returns the engine (a static :class:`fastsparse.Sparsifier`)."""
    from ..engine.sparsifier import Sparsifier

    if not sparse_params(model):
        raise ValueError("finetune trains a found ticket: the model carries no masks (run search first)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    engine = Sparsifier(model, opt, "static", seed=seed)
    sched = scheduler if scheduler is not None or optimizer is not None else \
        _default_lr_schedule(opt, epochs * len(train_data))  # type: ignore[arg-type]
    model.train()
    for _ in range(epochs):
        for batch in train_data:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return engine
