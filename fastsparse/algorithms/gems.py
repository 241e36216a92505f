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
Fine-tuning then trains the weights under the fixed mask.

These classes decide (gates, penalty, freezing rounds, final masks) on a scored model's scores
and flags; the search itself (:class:`fastsparse.recipes.score_search.ScoredModel`, ``search``,
``finetune`` and the two phases of ``fastsparse train``) is their recipe. A score search trains
other parameters through another forward, so it cannot run inside someone else's training loop:
every entry point but the runner and the recipe's drivers refuses it with the way to run it.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from ..core.masks import SparseParam, global_topk_masks, n_keep, topk_mask
from ..core.errors import ParameterError
from ..core.schedules import Constant, Cosine, Schedule, StepDecay
from .base import Setup, SparsityAlgorithm, generator_for, register

__all__ = [
    "EdgePopup", "GemMiner", "ScoreSearch", "hc_iter_keep_counts", "SCORE_INITS", "FINE_TUNE_POLICIES",
    "WEIGHT_INITS", "GEM_ALGOS", "REGULARIZATIONS",
]

SCORE_INITS = ("unif", "half", "bern", "kaiming")
FINE_TUNE_POLICIES = ("cosine", "constant", "multistep")
WEIGHT_INITS = ("signed_constant", "keep")
GEM_ALGOS = ("hc", "hc_iter")
REGULARIZATIONS = ("L2", "L1", "none")


class Scored(Protocol):
    """What the decisions read of a scored model (:class:`fastsparse.recipes.score_search.ScoredModel`)."""

    scores: Sequence[Tensor]
    flags: Sequence[Tensor]
    counts: Sequence[int]


class _STE(torch.autograd.Function):
    """Forward: the hard gate; backward: the gradient passes to the score unchanged."""

    @staticmethod
    def forward(ctx, score: Tensor, hard: Tensor) -> Tensor:  # type: ignore[override]
        return hard.to(score.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def hc_iter_keep_counts(numel: int, sparsity: float, epochs: int, period: int) -> list[int]:
    """Flagged weights left after each of the R = ⌊(E − 1)/T⌋ freezing rounds:
    round((1 − s)^(i/R) · N), i = 1..R (per-round rate 1 − d^(1/R); the last is the target)."""
    rounds = (int(epochs) - 1) // int(period) if period >= 1 else 0
    if rounds < 1 and sparsity > 0:
        raise ParameterError("iter_period", f"GEM-MINER cannot reach sparsity {sparsity}: {epochs} epochs with a freezing round every "
                         f"{period} epochs give ⌊(E − 1)/T⌋ = {max(rounds, 0)} rounds; use more epochs or a "
                         "shorter iter_period")
    d = 1.0 - sparsity
    return [n_keep(numel, 1.0 - d ** (i / rounds)) for i in range(1, rounds + 1)]


class ScoreSearch(SparsityAlgorithm):
    """Shared by edge-popup and GEM-MINER: the score initialisation, the fine-tuning settings and
    the search's decisions (subclasses: ``gate``, ``final_masks``)."""

    keeps_count = True
    score_init_default = "unif"
    recipe = "fastsparse.recipes.score_search:ScoreSearchRecipe"

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

    def fine_tune_schedule(self, steps_per_epoch: int, epochs: int) -> Schedule:
        """The fine-tuning learning rate as a factor of ``fine_tune_lr``, over ``epochs`` epochs of
        ``steps_per_epoch`` steps: cosine ½(1 + cos(π · t)), t the fraction done; constant 1;
        multistep lr_gamma^⌊epoch / lr_adjust⌋."""
        if self.fine_tune_lr_policy == "cosine":
            return Cosine(1.0, half_period=max(1, epochs) * steps_per_epoch)
        if self.fine_tune_lr_policy == "multistep":
            return StepDecay(1.0, self.lr_gamma, every=self.lr_adjust * steps_per_epoch)
        return Constant(1.0)

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
    def initial_masks(self, params, sparsities, setup: Setup) -> list[Tensor]:
        """The top-k of the initial scores: the mask the search starts from."""
        scores = self.init_scores(params, setup.seed)
        return [topk_mask(s.abs(), n_keep(s.numel(), sp_s)) for s, sp_s in zip(scores, sparsities)]


@register
class EdgePopup(ScoreSearch):
    """edge-popup: keep the top-k |scores| per layer (``scope="local"``, sizes from
    ``distribution``) or over all layers (``scope="global"``); weights frozen."""

    name = "edge_popup"
    score_init_default = "kaiming"

    def gate(self, model: Scored) -> list[Tensor]:
        with torch.no_grad():
            mags = [s.detach().abs() for s in model.scores]
            if self.scope == "global":
                hard = global_topk_masks(mags, sum(model.counts))
            else:
                hard = [topk_mask(m, k) for m, k in zip(mags, model.counts)]
        return [_STE.apply(s.abs(), h) for s, h in zip(model.scores, hard)]   # ∂/∂s = sign(s) · ∂L/∂m

    def final_masks(self, model: Scored) -> list[Tensor]:
        return [g.detach().bool() for g in self.gate(model)]


@register
class GemMiner(ScoreSearch):
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

    def gate(self, model: Scored) -> list[Tensor]:
        out = []
        for s, f in zip(model.scores, model.flags):
            g = _STE.apply(s, s.detach() > self.threshold) if self.quantized else s
            out.append(g * f)
        return out

    def penalty(self, model: Scored) -> Tensor:
        if self.regularization == "none" or self.lmbda == 0:
            return model.scores[0].new_zeros(())
        if self.regularization == "L2":
            return self.lmbda * sum((s ** 2).sum() for s in model.scores)
        return self.lmbda * sum(s.abs().sum() for s in model.scores)

    @torch.no_grad()
    def after_step(self, model: Scored) -> None:
        for s, f in zip(model.scores, model.flags):
            s.clamp_(0.0, 1.0)
            s.mul_(f)   # frozen scores stay at 0

    @torch.no_grad()
    def freeze_round(self, model: Scored, keep: int) -> None:
        """Unflag the globally lowest flagged scores so that ``keep`` stay flagged."""
        scores = [torch.where(f.bool(), s.detach(), torch.full_like(s, -1.0)) for s, f in zip(model.scores, model.flags)]
        kept = global_topk_masks(scores, keep)
        for f, k, s in zip(model.flags, kept, model.scores):
            f.mul_(k.to(f.dtype))
            s.mul_(f)

    def final_masks(self, model: Scored) -> list[Tensor]:
        if self.algo == "hc":
            mags = [s.detach() for s in model.scores]
            return global_topk_masks(mags, sum(model.counts)) if self.scope == "global" else \
                [topk_mask(m, k) for m, k in zip(mags, model.counts)]
        flags = [f.bool() for f in model.flags]
        if self.unflag_before_finetune:
            return flags
        return [f & (s.detach() > self.threshold) for f, s in zip(flags, model.scores)]


