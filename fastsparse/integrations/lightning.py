"""Lightning callback over the engine (extra ``lightning``)::

    trainer = pl.Trainer(callbacks=[SparseLightningCallback(RigL(sparsity=0.9, distribution="erk"))])

Life cycle:

* ``setup`` attaches the masks to the LightningModule (every stage, so that a checkpoint
  holding ``<param>_mask`` buffers loads into the module strictly).
* ``on_fit_start`` (after the optimizers exist, before their state is restored) builds the
  engine on the optimizer that holds the sparse weights: its step hook re-applies the masks
  after every real optimizer step and updates them when due, so gradient accumulation and
  steps a GradScaler skips are counted right. Fractions of training refer to
  ``trainer.estimated_stepping_batches``.
* Checkpoints: the masks are module buffers (in ``state_dict``); the engine's state (clock,
  update history, algorithm state) is this callback's state, restored when a Trainer
  resumes from ``ckpt_path``.
* ``execution="sparse"`` / ``"auto"``: at ``setup`` (before ``configure_optimizers``) the chosen
  Linear layers become ``SparseLinear``, so the optimizer is built over their compact values; a
  fit resumed from ``ckpt_path`` runs each layer as the checkpoint did.
* After each mask update and at each epoch end, rank zero sends ``sparsity/target`` and
  ``sparsity/actual`` to every logger of the Trainer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..algorithms.base import SparsityAlgorithm, create, list_algorithms
from ..core.masks import sparse_params
from ..core.sparse_linear import compact_layers
from ..engine.execution import check_execution, match_layout
from ..engine.sparsifier import Sparsifier

__all__ = ["SparseLightningCallback"]

Config = dict | list
log = logging.getLogger("fastsparse")


def _is_config_path(source: str | Path) -> bool:
    return isinstance(source, Path) or str(source).lower().endswith((".yaml", ".yml")) or Path(source).is_file()


def _batch_size(trainer: pl.Trainer) -> int | None:
    """The training batch size, where the Trainer's data says it (for ``execution="auto"``'s timing)."""
    try:
        loader = trainer.fit_loop._data_source.dataloader()
    except Exception:   # a datamodule not set up yet, or another Lightning version: the engine's default
        return None
    return getattr(loader, "batch_size", None)


class SparseLightningCallback(Callback):
    """Sparse training in a Lightning ``Trainer``.

    Args:
      sparsity: a :class:`fastsparse.SparsityAlgorithm` (or a list of them on disjoint
        parameters), a registered algorithm name, a sparsity config (a block dict such as
        ``{"algorithm": "rigl", "sparsity": 0.9}``, a list of blocks, or an experiment dict
        with a ``sparsity`` key) or the path of a YAML file holding one, as
        :func:`fastsparse.from_config` reads them.
      seed: seeds the initial masks and random growth (identical on every rank); for a
        config, None keeps the config's own seed.
      check_ranks: under DDP, verify after every update that all ranks hold the same masks.
      data: a batch or a DataLoader for methods that score weights at attach (SNIP, GraSP; needed
        at ``setup``); by default the Trainer's training data is what Sup-tickets re-estimates
        BatchNorm statistics on.

    The whole method runs through the engine (its hooks on the optimizer: a recipe's learning
    rate before each step, masks and updates after, the end of the method at the last step); a
    method that runs its own loop (a score search) is refused at ``setup``.
    """

    def __init__(self, sparsity: SparsityAlgorithm | Sequence[SparsityAlgorithm] | Config | str | Path,
                 seed: int | None = None, check_ranks: bool = True, data: Any = None,
                 execution: str | dict[str, str] = "masked"):
        self.algorithm: SparsityAlgorithm | list[SparsityAlgorithm] | None = None
        self.config: Config | None = None
        if isinstance(sparsity, SparsityAlgorithm):
            self.algorithm = sparsity
        elif isinstance(sparsity, (list, tuple)) and sparsity and all(isinstance(a, SparsityAlgorithm)
                                                                      for a in sparsity):
            self.algorithm = list(sparsity)
        elif isinstance(sparsity, (dict, list)):
            self.config = sparsity
        elif isinstance(sparsity, (str, Path)) and _is_config_path(sparsity):
            from ..experiments.config import load_yaml

            self.config = load_yaml(sparsity)  # read once here: a missing or malformed file fails now
        elif isinstance(sparsity, str) and sparsity.lower() in list_algorithms():
            self.algorithm = create(sparsity)
        else:
            raise TypeError(f"SparseLightningCallback({sparsity!r}): expected an algorithm, a registered name "
                            f"({list_algorithms()}), a config dict or list, or a YAML path")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.seed, self.check_ranks, self.data = seed, check_ranks, data
        self.execution = check_execution(execution)
        self.sparsifier: Sparsifier | None = None
        self._pending: dict | None = None
        self._choices: list = []
        self._layout_hook: Any = None
        self._logged = 0

    def _engine(self, trainer: pl.Trainer, module: nn.Module, optimizer: Any, total_steps: int | None,
                **kwargs: Any) -> Sparsifier:
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        kwargs.update(data=self.data if self.data is not None else (lambda: trainer.train_dataloader),
                      steps_per_epoch=total_steps // epochs if total_steps and epochs else None,
                      check_ranks=self.check_ranks)
        if self.config is not None:
            from ..experiments.config import from_config

            return from_config(module, optimizer, self.config, total_steps=total_steps, seed=self.seed, **kwargs)
        return Sparsifier(module, optimizer, self.algorithm, total_steps=total_steps,
                          seed=0 if self.seed is None else self.seed, **kwargs)

    # --- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # attaches masks (so that a checkpoint's mask buffers load); the model already carrying them keeps them
        engine = self._engine(trainer, pl_module, None, None, attach_only=True)
        if stage == "fit" and self.execution != "masked":
            # before configure_optimizers: the optimizer is built over the compact values
            self._choices = engine.compact(self.execution, _batch_size(trainer))
        if self._layout_hook is None:
            # a checkpoint loads into the layers it was saved from (sparse or masked), whatever setup chose
            self._layout_hook = pl_module.register_load_state_dict_pre_hook(self._match_layout)

    def _match_layout(self, module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        changed = match_layout(module, state, prefix)
        if changed:
            self._choices = []   # the engine of on_fit_start reads the layers as the checkpoint left them
            log.info("the checkpoint runs %s as it was saved (sparse or masked)", changed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        self.sparsifier = self._engine(trainer, pl_module, self._optimizer(trainer, pl_module), total)
        if self._choices:   # what setup chose, and why
            self.sparsifier.choices = self._choices
        if self._pending is not None:
            self.sparsifier.load_state_dict(self._pending)
            self._pending = None
        self._logged = len(self.sparsifier.history)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.sparsifier is not None and len(self.sparsifier.history) > self._logged:
            self._logged = len(self.sparsifier.history)
            self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._layout_hook is not None:
            self._layout_hook.remove()
            self._layout_hook = None
        if self.sparsifier is not None:
            self.sparsifier.remove()  # the step hook goes; the masks stay on the module

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is not None:
            return {"sparsifier": self.sparsifier.state_dict()}
        return {"sparsifier": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("sparsifier")

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The optimizer that holds the sparse weights."""
        sparse = {id(sp.param) for sp in sparse_params(pl_module)} | \
            {id(m.values) for m in compact_layers(pl_module).values()}
        for opt in trainer.optimizers:
            if any(id(p) in sparse for group in opt.param_groups for p in group["params"]):
                return opt
        raise ValueError("no optimizer of the Trainer holds the sparse weights; configure_optimizers must "
                         "return one that optimizes them")

    def metrics(self) -> dict[str, float]:
        """Target and actual sparsity over the parameters the engine masks (weighted by size)."""
        rows = self.sparsifier.report()
        numel = sum(r["numel"] for r in rows)
        target = sum(r["target_sparsity"] * r["numel"] for r in rows) / max(1, numel)
        return {"sparsity/target": float(target), "sparsity/actual": float(self.sparsifier.sparsity())}

    def _log(self, trainer: pl.Trainer) -> None:
        if self.sparsifier is None or not trainer.is_global_zero or not trainer.loggers:
            return
        stats = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
