"""The score search of edge-popup and GEM-MINER, around their decisions: the scored model, the
search and fine-tuning drivers, and the two phases ``fastsparse train`` runs.

During the search every selected weight w carries a score; the forward uses w ⊙ gate(score)
with a straight-through gradient to the score, and the weights are frozen (signed-constant
init, sign(w) · sqrt(2 / fan_in); BatchNorm non-affine). :class:`ScoredModel` runs the model
with the gated weights through ``torch.func.functional_call``, so any Linear, Conv or
attention weight can carry scores; :meth:`ScoredModel.finalize` attaches the found masks as
ordinary ``<param>_mask`` buffers. Fine-tuning then trains the weights under the fixed masks.

A search trains other parameters (the scores) through another forward, so it cannot run inside
someone else's loop: the engine refuses it (:class:`ScoreSearchRecipe` sets ``own_loop``), and
the way to run it is :func:`search` then :func:`finetune`, or ``fastsparse train``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.base import generator_for
from ..algorithms.gems import GemMiner, ScoreSearch
from ..algorithms.pai import shuffle_masks
from ..core.masks import SparseParam, attach_mask, n_keep, sparse_params
from ..core.schedules import Clock, Cosine, Schedule
from ..engine.recipe import Recipe
from ..engine.sparsifier import Sparsifier
from .base import Phase, PhaseParts, RunContext

__all__ = ["ScoreSearchRecipe", "ScoredModel", "search", "finetune", "signed_constant_", "freeze_bn_affine_",
           "sanity_variants", "SearchPhase", "FineTunePhase"]

log = logging.getLogger("fastsparse")

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



class ScoredModel(nn.Module):
    """The model run with w ⊙ gate(score) for every selected weight; the scores are its only
    trainable parameters. Build it with :meth:`from_model`, train it, then :meth:`finalize`."""

    def __init__(self, model: nn.Module, algorithm: ScoreSearch, params: Sequence[SparseParam],
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


def _lambda_lr(optimizer, schedule: Schedule, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(Clock(step, max(1, total))))


class _SearchSteps:
    """What every search step does beyond forward/backward/step: GEM-MINER's penalty on the scores
    and their clamp; after each epoch, GEM-MINER's freezing rounds."""

    def __init__(self, scored: ScoredModel, algorithm: ScoreSearch, epochs: int):
        self.scored, self.algorithm = scored, algorithm
        self.gem = isinstance(algorithm, GemMiner)
        numel = sum(sp.param.numel() for sp in scored.params)
        self.rounds = algorithm.check_budget(numel, epochs) if self.gem else []

    def extra_loss(self) -> Tensor:
        return self.algorithm.penalty(self.scored)

    def after_step(self) -> None:
        self.algorithm.after_step(self.scored)

    def after_epoch(self, done: int) -> None:
        period = getattr(self.algorithm, "iter_period", 0)
        if self.rounds and done % period == 0 and done // period <= len(self.rounds):
            self.algorithm.freeze_round(self.scored, self.rounds[done // period - 1])

    def is_round_end(self, done: int) -> bool:
        period = getattr(self.algorithm, "iter_period", 0)
        return bool(self.rounds) and done % period == 0 and done // period <= len(self.rounds)


def _scored_model(model: nn.Module, algorithm: ScoreSearch, seed: int, init: str | None = None) -> ScoredModel:
    params = algorithm.select(model)   # raises on a model without sparsifiable layers
    return ScoredModel(model, algorithm, params, algorithm.initial_sparsities(params), seed,
                       init or algorithm.weight_init)


def search(
    model: nn.Module,
    algorithm: ScoreSearch,
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
    lr_schedule: Schedule | None = None,
) -> ScoredModel:
    """Train the scores of ``model`` for ``epochs`` epochs (SGD; the learning rate ``lr`` times
    ``lr_schedule`` over the search's steps, default a cosine), then attach the found masks
    (:meth:`ScoredModel.finalize`). ``loss_fn(model, batch) -> loss`` is the train step's loss,
    called with the scored model; ``init`` (default the algorithm's ``weight_init``): the frozen
    weights, ``signed_constant`` or ``keep``. Raises before changing anything if the model has no
    sparsifiable layer or GEM-MINER cannot reach the target in time."""
    params = algorithm.select(model)
    if isinstance(algorithm, GemMiner):
        algorithm.check_budget(sum(sp.param.numel() for sp in params), epochs)
    scored = _scored_model(model, algorithm, seed, init)
    steps = _SearchSteps(scored, algorithm, epochs)
    opt = torch.optim.SGD(scored.scores.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(train_data)  # type: ignore[arg-type]
    sched = _lambda_lr(opt, lr_schedule or Cosine(1.0), total)
    scored.train()
    for epoch in range(epochs):
        for batch in train_data:
            opt.zero_grad()
            loss = loss_fn(scored, batch)
            if steps.gem:
                loss = loss + steps.extra_loss()
            loss.backward()
            opt.step()
            sched.step()
            if steps.gem:
                steps.after_step()
        steps.after_epoch(epoch + 1)
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
    if not sparse_params(model):
        raise ValueError("finetune trains a found ticket: the model carries no masks (run search first)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    engine = Sparsifier(model, opt, seed=seed)
    total = epochs * len(train_data)  # type: ignore[arg-type]
    sched = scheduler if scheduler is not None or optimizer is not None else _lambda_lr(opt, Cosine(1.0), total)
    model.train()
    for _ in range(epochs):
        for batch in train_data:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return engine


# --- the phases of ``fastsparse train`` ----------------------------------------------------------
class SearchPhase(Phase):
    """``epochs`` epochs training the scores with the config's optimizer and learning-rate
    schedule; GEM-MINER's penalty, clamp and freezing rounds; ``checkpoint_at_prune`` files and
    the ``sanity_checks`` of the found ticket; at its end, the found masks attached."""

    name = "search"

    def __init__(self, algorithm: ScoreSearch, epochs: int, model: nn.Module):
        self.algorithm, self.epochs = algorithm, int(epochs)
        if isinstance(algorithm, GemMiner):   # an unreachable target fails when the run is planned
            algorithm.check_budget(sum(sp.param.numel() for sp in algorithm.select(model)), self.epochs)

    def start(self, ctx: RunContext, state: dict[str, Any] | None = None) -> PhaseParts:
        alg = self.algorithm
        scored = _scored_model(ctx.model, alg, ctx.seed)
        if state is not None:
            with torch.no_grad():
                for s, v in zip(scored.scores, state["scores"]):
                    s.copy_(v)
                for f, v in zip(scored.flags, state["flags"]):
                    f.copy_(v)
        steps = _SearchSteps(scored, alg, self.epochs)
        optimizer = ctx.make_optimizer(scored.scores.parameters())

        def after_epoch(done: int) -> dict[str, Any]:
            steps.after_epoch(done)
            if getattr(alg, "checkpoint_at_prune", False) and steps.is_round_end(done) and done < self.epochs:
                period = alg.iter_period
                ctx.save(f"prune_round{done // period}.pt", {"epoch": done, **_scores_state(scored)})
            if alg.sanity_checks and done == self.epochs:
                sanity = {k: ctx.evaluate(v)[1] for k, v in sanity_variants(scored, ctx.seed).items()}
                ctx.write_json("sanity.json", sanity)
                log.info("sanity checks of the found ticket (test accuracy before fine-tuning): %s",
                         ", ".join(f"{k} {v:.4f}" for k, v in sanity.items()))
            return {"flagged": sum(int(f.sum()) for f in scored.flags)}

        def end() -> None:
            masks = scored.finalize()
            log.info("%s: search done, %d of %d weights kept", alg.name, sum(int(m.sum()) for m in masks),
                     sum(m.numel() for m in masks))

        return PhaseParts(scored, optimizer, ctx.lr_schedule(self.epochs * ctx.steps_per_epoch),
                          extra_loss=steps.extra_loss if steps.gem else None,
                          after_step=steps.after_step if steps.gem else None,
                          after_epoch=after_epoch, end=end, state=lambda: _scores_state(scored))


def _scores_state(scored: ScoredModel) -> dict[str, Any]:
    return {"scores": [s.detach().clone() for s in scored.scores], "flags": [f.clone() for f in scored.flags]}


class FineTunePhase(Phase):
    """``fine_tune_epochs`` (default: as many as the search) training the weights under the found
    masks (a static engine; BatchNorm stays non-affine) with the config's optimizer at
    ``fine_tune_lr`` and ``fine_tune_lr_policy``."""

    name = "fine_tune"

    def __init__(self, algorithm: ScoreSearch, epochs: int):
        self.algorithm, self.epochs = algorithm, int(epochs)

    def start(self, ctx: RunContext, state: dict[str, Any] | None = None) -> PhaseParts:
        alg, model = self.algorithm, ctx.model
        if state is not None:   # resuming: the model as the search left it (masks attached, BN frozen)
            freeze_bn_affine_(model)
            for sp in alg.select(model):
                attach_mask(sp, state["masks"][sp.name])
        masked = {sp.name: sp.mask for sp in sparse_params(model)}
        optimizer = ctx.make_optimizer([p for p in model.parameters() if p.requires_grad], lr=alg.fine_tune_lr)
        total = self.epochs * ctx.steps_per_epoch
        engine = Sparsifier(model, optimizer, total_steps=total, seed=ctx.seed)
        return PhaseParts(model, optimizer, alg.fine_tune_schedule(ctx.steps_per_epoch, self.epochs), engine,
                          state=lambda: {"masks": {k: v.clone() for k, v in masked.items()}})


class ScoreSearchRecipe(Recipe):
    """edge-popup and GEM-MINER: a search phase, then a fine-tuning phase (``fastsparse train``)."""

    own_loop = ("{name} trains scores with frozen weights through its own forward, then fine-tunes the weights: "
                "it cannot run inside another training loop. Use fastsparse.recipes.score_search.search(...) then "
                "finetune(...), or `fastsparse train` with algorithm: {name}")

    @classmethod
    def phases(cls, algorithm: ScoreSearch, context: Any) -> list[Phase]:
        ft = algorithm.fine_tune_epochs if algorithm.fine_tune_epochs is not None else context.epochs
        return [SearchPhase(algorithm, context.epochs, context.model), FineTunePhase(algorithm, ft)]
