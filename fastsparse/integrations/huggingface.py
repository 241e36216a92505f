"""Hugging Face ``Trainer`` callback over the engine (extra ``huggingface``)::

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[SparseTrainerCallback({"algorithm": "rigl", "sparsity": 0.9})])

Life cycle:

* ``on_train_begin``: the Trainer has built its optimizer (and, when resuming, loaded the model's
  weights). The callback looks through accelerate's ``AcceleratedOptimizer`` (and any wrapper with an
  ``.optimizer``) to the torch optimizer underneath and builds the engine on it, so the engine's step
  hook runs after every *real* optimizer step: a step skipped by gradient accumulation or by a
  GradScaler neither counts nor updates masks. Fractions of training refer to ``state.max_steps``.
* Which weights: without a filter of its own, a method sparsifies the weights of ``nn.Linear`` and of
  transformers' ``Conv1D`` (GPT-2), never embeddings, norms, ``lm_head`` or a weight tied to the input
  or output embedding (as Cerebras does). For a config or a registered name whose method balances
  groups (the DST family: SET, RigL, SNFS, ...), every attention projection gets one group per head:
  each head keeps the same number of active weights (``balance_heads``, see :func:`head_groups`).
* ``on_save``: beside the Trainer's files, ``checkpoint-<step>/fastsparse_state.pt`` holds the masks,
  the engine's state (clock, history, algorithm state) and the identity of the plan, sealed with
  checksums (:mod:`fastsparse.core.integrity`). ``trainer.train(resume_from_checkpoint=...)`` reads it
  with ``weights_only=True``, verifies checksums, identity, step, mask shapes and the zeros of the
  loaded weights, and only then attaches the masks and restores the engine.
* ``on_train_end``: the step hook goes; the masks stay on the model (buffers ``<param>_mask``).

Refused before anything changes (:class:`fastsparse.EntryPointRefused`): methods that run their own
loop (score search), methods that set the learning rate of their steps (IMP's levels, Sup-tickets'
cycles: the Trainer's scheduler owns it), methods that score weights on a batch at attach (SNIP,
GraSP), and ``execution="sparse"`` (the Trainer saves and reloads the model as dense modules).
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.pytorch_utils import Conv1D

from ..algorithms.base import SparsityAlgorithm, get_algorithm, list_algorithms
from ..core.integrity import IntegrityError, seal, verify
from ..core.masks import DENSE_NAME_PARTS, SparseParam, attach_mask, select_params, sparse_params
from ..engine.recipe import EntryPointRefused, recipe_class
from ..engine.sparsifier import Sparsifier

__all__ = ["SparseTrainerCallback", "STATE_FILE", "hf_param_filter", "head_groups", "torch_optimizer"]

STATE_FILE = "fastsparse_state.pt"
_FORMAT = "fastsparse-trainer/1"
_KEYS = frozenset({"format", "identity", "plan", "global_step", "masks", "sparsifier", "integrity"})
_SPARSIFIABLE = (nn.Linear, Conv1D)
log = logging.getLogger("fastsparse")


# --- pure helpers ------------------------------------------------------------------------------
def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"the Trainer's optimizer is a {type(optimizer).__name__}, not a torch optimizer (nor a "
                        "wrapper of one): the engine needs torch's step hooks")
    return optimizer


def _tied(model: nn.Module) -> set[int]:
    """ids of the input and output embedding weights (``lm_head`` is often tied to the input embedding)."""
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    return ids


def hf_param_filter(model: nn.Module) -> Callable[[str, torch.Tensor, nn.Module], bool]:
    """The default filter in a Trainer: weights of ``nn.Linear`` and ``Conv1D``; never 1-D parameters,
    names with ``embed``, ``norm`` or ``lm_head``, nor a weight tied to an embedding."""
    tied = _tied(model)

    def keep(name: str, param: torch.Tensor, module: nn.Module) -> bool:
        return (param.dim() == 2 and isinstance(module, _SPARSIFIABLE) and name.rpartition(".")[2] == "weight"
                and not any(part in name.lower() for part in DENSE_NAME_PARTS) and id(param) not in tied)

    keep.__name__ = "hf_param_filter"
    return keep


def _heads(model: nn.Module) -> tuple[int | None, int | None]:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv


def head_groups(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{weight name: (dim, heads)} for the attention projections among ``names``.

    ``nn.Linear`` (out, in): ``q_proj``/``query`` rows in ``num_attention_heads`` groups,
    ``k_proj``/``v_proj``/``key``/``value`` rows in ``num_key_value_heads`` groups, ``o_proj``/
    ``out_proj`` columns in ``num_attention_heads`` groups. GPT-2's ``Conv1D`` stores (in, out):
    ``attn.c_attn`` columns (q, k, v stacked) in 3 · ``n_head`` groups, ``attn.c_proj`` rows in ``n_head``.
    """
    heads, kv = _heads(model)
    if not heads:
        return {}
    rules = {("Linear", "q_proj"): (0, heads), ("Linear", "query"): (0, heads), ("Linear", "k_proj"): (0, kv),
             ("Linear", "v_proj"): (0, kv), ("Linear", "key"): (0, kv), ("Linear", "value"): (0, kv),
             ("Linear", "o_proj"): (1, heads), ("Linear", "out_proj"): (1, heads),
             ("Conv1D", "c_attn"): (1, 3 * heads), ("Conv1D", "c_proj"): (0, heads)}
    out = {}
    for name in names:
        path = name.rpartition(".")[0]
        leaf = path.rpartition(".")[2]
        module = model.get_submodule(path)
        kind = "Conv1D" if isinstance(module, Conv1D) else "Linear" if isinstance(module, nn.Linear) else None
        rule = rules.get((kind, leaf))
        if rule is not None and (kind == "Linear" or ".attn." in f".{path}."):   # GPT-2's mlp.c_proj is no head
            out[name] = rule
    return out


def check_hostable(algorithm: SparsityAlgorithm | type[SparsityAlgorithm]) -> None:
    """Raise :class:`EntryPointRefused` for a method a Trainer fit cannot run whole."""
    name = algorithm.name
    cls = recipe_class(algorithm)
    instead = "run it with `fastsparse train`, the Lightning callback or a plain loop over fastsparse.Sparsifier"
    if cls is not None and cls.own_loop:
        raise EntryPointRefused(cls.own_loop.format(name=name))
    if cls is not None and cls.owns_lr:
        raise EntryPointRefused(f"{name} sets the learning rate of its own steps (IMP replays level 0's schedule in "
                                f"every level, Sup-tickets cycles it), and a Trainer's lr_scheduler owns the learning "
                                f"rate: {instead}")
    needs = getattr(algorithm, "needs", frozenset())
    if isinstance(needs, (set, frozenset)) and needs & {"batch", "gradients", "shape"}:
        raise EntryPointRefused(f"{name} scores weights on a batch before training, and SparseTrainerCallback does not "
                                f"feed it the Trainer's batches (dicts of a model's own inputs): {instead} with data=")


def _identity(rows: list[list[Any]], algorithms: Sequence[SparsityAlgorithm], seed: int) -> str:
    record = {"rows": rows, "algorithms": [f"{type(a).__name__}:{a!r}" for a in algorithms], "seed": seed}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _load_state_file(path: Path) -> dict[str, Any]:
    """The file at ``path``, loaded without running anything and checked against its checksums."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EntryPointRefused(f"{path} is missing: this checkpoint was not written by SparseTrainerCallback (give "
                                "the callback resume_from=<the checkpoint folder>, or start over)") from None
    except Exception as e:   # torch and pickle raise many types for a damaged file
        raise ValueError(f"{path} is truncated or not a fastsparse state ({type(e).__name__}; nothing in it "
                         "ran)") from None
    try:
        verify(state)
    except IntegrityError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if set(state) != _KEYS or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} state: it holds {sorted(state)}")
    return state


# --- the callback -----------------------------------------------------------------------------
class SparseTrainerCallback(TrainerCallback):
    """Sparse training in a Hugging Face ``Trainer`` (see the module for the life cycle).

    Args:
      sparsity: a :class:`fastsparse.SparsityAlgorithm` (or a list of them on disjoint parameters), a
        registered algorithm name, a sparsity config (a block dict ``{"algorithm": "rigl", "sparsity": 0.9,
        ...}``, a list of blocks, an experiment dict with a ``sparsity`` key) or the path of a YAML file
        holding one, as :func:`fastsparse.from_config` reads them.
      seed: seeds the initial masks and random growth; for a config, None keeps the config's own seed.
      balance_heads: None (default): attention heads keep equal counts where the method can balance
        groups and the filter is the default one (a config or a name; an algorithm object runs exactly
        as built); True: required (refused where impossible); False: never.
      resume_from: the checkpoint folder to read the sparsity state from when the Trainer resumes
        (default: ``<output_dir>/checkpoint-<global_step>``, where ``resume_from_checkpoint=True`` and
        the Trainer's own checkpoints are).
      execution: ``"masked"`` only (``"sparse"`` is refused: the Trainer saves and reloads dense modules).

    After ``on_train_begin``, ``self.sparsifier`` is the engine.
    """

    def __init__(self, sparsity: Any, seed: int | None = None, balance_heads: bool | None = None,
                 resume_from: str | Path | None = None, execution: str = "masked"):
        if execution != "masked":
            raise EntryPointRefused(f"SparseTrainerCallback(execution={execution!r}): only 'masked' is offered; the "
                                    "Trainer saves and reloads its model as dense modules (nn.Linear, GPT-2's Conv1D), "
                                    "so sparse execution runs with the Lightning callback or a plain loop")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        if balance_heads not in (None, True, False):
            raise TypeError(f"balance_heads must be None, True or False, got {balance_heads!r}")
        self.algorithms: list[SparsityAlgorithm] | None = None
        self.config: Any = None
        if isinstance(sparsity, SparsityAlgorithm) or (isinstance(sparsity, (list, tuple)) and sparsity and all(
                isinstance(a, SparsityAlgorithm) for a in sparsity)):
            self.algorithms = [sparsity] if isinstance(sparsity, SparsityAlgorithm) else list(sparsity)
            for a in self.algorithms:
                check_hostable(a)
            if balance_heads:
                raise ValueError("balance_heads=True needs a config or a registered name: an algorithm object runs "
                                 "exactly as built (give it balance_out_groups/balance_in_groups and a param_filter)")
        else:
            self.config = self._read_config(sparsity)
        self.seed, self.balance_heads = seed, balance_heads
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.sparsifier: Sparsifier | None = None
        self._identity: str | None = None
        self._rows: list[list[Any]] = []

    @staticmethod
    def _read_config(sparsity: Any) -> Any:
        from ..experiments.config import load_yaml, parse_config

        if isinstance(sparsity, str) and sparsity.lower() in list_algorithms():
            sparsity = {"algorithm": sparsity.lower()}
        elif isinstance(sparsity, (str, Path)):
            sparsity = load_yaml(sparsity)   # a missing or malformed file fails now
        if not isinstance(sparsity, (dict, list)):
            raise TypeError(f"SparseTrainerCallback({sparsity!r}): expected an algorithm, a registered name "
                            f"({list_algorithms()}), a config dict or list, or a YAML path")
        from ..experiments.config.plan import _looks_like_block

        raw = {"sparsity": sparsity} if isinstance(sparsity, list) or _looks_like_block(sparsity) else sparsity
        experiment, _ = parse_config(raw)
        if experiment.sparsity is None:
            raise ValueError("the config has no sparsity block: nothing to sparsify")
        blocks = experiment.sparsity if isinstance(experiment.sparsity, list) else [experiment.sparsity]
        for block in blocks:
            check_hostable(get_algorithm(block.algorithm))
        if experiment.execution != "masked" and "execution" in experiment.model_fields_set:
            raise EntryPointRefused(f"execution: {experiment.execution} in the config: SparseTrainerCallback runs "
                                    "masked only (the Trainer saves and reloads dense modules)")
        return experiment

    # --- the plan: algorithms bound to parameters ------------------------------------------------
    def _plan(self, model: nn.Module) -> tuple[list[SparsityAlgorithm], int]:
        if self.algorithms is not None:
            algorithms = [a if a.selects_explicitly else _with_filter(a, hf_param_filter(model))
                          for a in self.algorithms]
            rows = []
            for a in algorithms:
                params = a.select(model)
                rows += [[sp.name, list(sp.param.shape), a.name, float(s)]
                         for sp, s in zip(params, a.initial_sparsities(params))]
            seed = 0 if self.seed is None else self.seed
        else:
            from ..experiments.config import plan_sparsity

            experiment = _with_hf_defaults(self.config, model, self.balance_heads)
            plan = plan_sparsity(experiment, model)
            algorithms = plan.algorithms
            rows = [[r.name, list(r.shape), r.algorithm, float(r.target_sparsity)] for r in plan.rows if r.algorithm]
            seed = experiment.seed if self.seed is None else self.seed
        for a in algorithms:
            check_hostable(a)   # an instance may need more than its class says (PaI's method)
        self._rows, self._identity = rows, _identity(rows, algorithms, seed)
        return algorithms, seed

    # --- hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("SparseTrainerCallback: the Trainer passed no model or optimizer to on_train_begin")
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        opt = torch_optimizer(optimizer)
        algorithms, seed = self._plan(model)
        saved = self._read_saved(args, state, model) if state.global_step > 0 else None
        if saved is not None:   # every check passed: the saved masks go on before the engine adopts them
            _put_masks(model, saved["masks"])
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.sparsifier = Sparsifier(model, opt, algorithms, total_steps=total, seed=seed)
        if saved is not None:
            self.sparsifier.load_state_dict(saved["sparsifier"])
        log.info("SparseTrainerCallback: %r", self.sparsifier)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sparsifier is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise RuntimeError(f"SparseTrainerCallback: the Trainer's checkpoint folder {folder} is missing")
        masks = {sp.name: sp.mask.detach().cpu().clone() for g in self.sparsifier.groups for sp in g.params}
        record = seal({"format": _FORMAT, "identity": self._identity, "plan": self._rows,
                       "global_step": int(state.global_step), "masks": masks,
                       "sparsifier": self.sparsifier.state_dict()})
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(record, tmp)
        os.replace(tmp, folder / STATE_FILE)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.sparsifier is not None:
            self.sparsifier.remove()   # the step hook goes; the masks stay on the model

    # --- resuming --------------------------------------------------------------------------------
    def _read_saved(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> dict[str, Any]:
        """The saved state for this resumed fit, checked (identity, step, masks, zeros) before anything changes."""
        folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / STATE_FILE
        saved = _load_state_file(path)
        if saved["identity"] != self._identity:
            ours = {r[0]: r for r in self._rows}
            theirs = {r[0]: r for r in saved["plan"]} if isinstance(saved["plan"], list) else {}
            diff = sorted(set(ours) ^ set(theirs)) or [n for n in ours if ours[n] != theirs.get(n)]
            raise ValueError(f"{path} belongs to another sparsity config or model (differs at "
                             f"{diff[:4] or 'the algorithms or seed'}): resume with the config it was saved with")
        if saved["global_step"] != state.global_step:
            raise ValueError(f"{path} was saved at step {saved['global_step']}, the Trainer resumes at step "
                             f"{state.global_step}: it belongs to another checkpoint")
        masks = saved["masks"]
        if not isinstance(masks, dict) or sorted(masks) != sorted(r[0] for r in self._rows):
            raise ValueError(f"{path}: its masks do not name the parameters of the plan")
        for name, mask in masks.items():
            param = _sparse_param(model, name).param
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != param.shape:
                raise ValueError(f"{path}: the mask of {name} is not a bool tensor of shape {tuple(param.shape)}")
            outside = int(torch.count_nonzero(param.detach()[~mask.to(param.device)]))
            if outside:
                raise ValueError(f"{path}: the loaded {name} has {outside:,} nonzero weights outside its saved mask; "
                                 "the model's weights are not the ones saved with these masks")
        return saved


def _put_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach (or overwrite) the mask of every named weight; the weights are already zero outside them."""
    held = {sp.name: sp for sp in sparse_params(model)}
    for name, mask in masks.items():
        sp = held.get(name) or _sparse_param(model, name)
        if name in held:
            sp.mask.copy_(mask)
        else:
            attach_mask(sp, mask.to(sp.param.device))


def _sparse_param(model: nn.Module, name: str) -> SparseParam:
    path, _, attr = name.rpartition(".")
    return SparseParam(name, model.get_submodule(path) if path else model, attr)


def _with_filter(algorithm: SparsityAlgorithm, keep: Callable) -> SparsityAlgorithm:
    """A copy of ``algorithm`` selecting with ``keep`` (the caller's object is left as it was)."""
    out = copy.deepcopy(algorithm)
    out.param_filter = keep
    return out


def _with_hf_defaults(experiment: Any, model: nn.Module, balance: bool | None) -> Any:
    """The config with the Trainer's defaults: blocks without ``param_filter`` select what
    :func:`hf_param_filter` selects; head-balanced overlays where the method can balance."""
    from ..experiments.config import OverlaySpec, algorithm_parameters

    blocks = experiment.sparsity if isinstance(experiment.sparsity, list) else [experiment.sparsity]
    explicit = {sp.name for b in blocks if b.param_filter for sp in select_params(model, b.param_filter, b.exclude)}
    default = [sp.name for sp in select_params(model, param_filter=hf_param_filter(model)) if sp.name not in explicit]
    out = []
    for block in blocks:
        if block.param_filter is not None:
            if balance:
                raise ValueError("balance_heads=True: a block with its own param_filter balances with its own "
                                 "param_filters overlays")
            out.append(block)
            continue
        names = [n for n in default if not any(fnmatch.fnmatchcase(n, pat) for pat in block.exclude or [])]
        if not names:
            raise ValueError("no weight of an nn.Linear or Conv1D is left to sparsify outside embeddings, norms and "
                             "lm_head: give the block a param_filter")
        update: dict[str, Any] = {"param_filter": names}
        can = "balance_out_groups" in algorithm_parameters(get_algorithm(block.algorithm))
        if balance and (not can or block.param_filters):
            raise ValueError(f"balance_heads=True: {block.algorithm} cannot balance groups (the DST family can)"
                             if not can else "balance_heads=True: the block has param_filters of its own")
        if can and balance is not False and not block.param_filters:
            groups = head_groups(model, names)
            if groups:
                key = {0: "balance_out_groups", 1: "balance_in_groups"}
                update["param_filters"] = {n: OverlaySpec.model_validate({key[d]: g}) for n, (d, g) in groups.items()}
        out.append(block.model_copy(update=update))
    return experiment.model_copy(update={"sparsity": out if isinstance(experiment.sparsity, list) else out[0]})
