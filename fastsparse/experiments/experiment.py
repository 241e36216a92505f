"""Building an experiment from a config: data (or its shape alone, for a dry run), model,
optimizer, the sparsity plan, the engine and the phases to train. Nothing is written to disk."""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

from ..core.flops import LayerCost, layer_costs
from ..core.sharded import is_sharded
from ..algorithms.base import SparsityAlgorithm
from ..core.schedules import Clock, Schedule, UpdateSchedule
from ..engine.execution import ExecutionRefused
from ..engine.recipe import EntryPointRefused, recipe_class
from ..engine.sparsifier import Sparsifier
from ..recipes.base import Phase, PhaseParts, RunContext
from .config import (
    ConfigError, ExperimentConfig, Problem, SparsityPlan, algorithm_parameters, parse_config, plan_sparsity, problem_at,
    resolve_config, sparsity_blocks,
)
from .data import Data, check_dataset, dataset_info, load_dataset
from .models import create_model

__all__ = ["Experiment", "prepare", "make_optimizer", "resolve_device", "ranks", "train_batches", "StandardPhase"]

_DRY_RUN_BATCH = 256
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class Experiment:
    """Everything a run needs, built from a config (nothing written to disk).

    ``optimizer``, ``sparsifier`` and ``schedule`` are the standard phase's (None for a method
    whose recipe runs its own phases until they start); ``phases`` are what the runner trains.
    """

    config: ExperimentConfig
    resolved: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    schedule: Schedule | None
    sparsifier: Sparsifier | None
    plan: SparsityPlan | None
    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    steps_per_epoch: int
    total_steps: int
    cost: LayerCost
    phases: list[Phase]
    data: Data | None = None
    notes: list[str] = field(default_factory=list)
    device: torch.device = torch.device("cpu")


class StandardPhase(Phase):
    """The one phase of most methods: the config's optimizer and learning-rate schedule, the engine."""

    name = "train"

    def __init__(self, exp: Experiment):
        self.exp, self.epochs = exp, exp.config.epochs

    def start(self, ctx: RunContext, state: dict[str, Any] | None = None) -> PhaseParts:
        exp = self.exp
        return PhaseParts(exp.model, exp.optimizer, exp.schedule, exp.sparsifier)


def make_optimizer(config: ExperimentConfig, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """The config's optimizer over ``params`` (at ``lr`` instead of the config's, if given)."""
    spec = config.optimizer.model_dump()
    cls = _OPTIMIZERS[spec.pop("name")]
    if lr is not None:
        spec["lr"] = lr
    try:
        return cls(params, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError([Problem("optimizer", f"{cls.__name__} refuses these settings: {e}")]) from None


def ranks() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(spec: str) -> torch.device:
    """``auto``: the GPU of this rank (``LOCAL_RANK`` under torchrun) if there is one, else the CPU."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([Problem("device", f"is {spec!r}, but this machine has no CUDA GPU; use auto or cpu")])
    return device


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, kwargs_json: str) -> Data:
    return load_dataset(name, **json.loads(kwargs_json))


def _data_kwargs(config: ExperimentConfig) -> dict[str, Any]:
    return {k: v for k, v in config.data.model_dump().items() if k not in ("name", "batch_size")}


def _n_train(name: str, kwargs: dict[str, Any]) -> int:
    """Training examples, without loading (for the step count of a dry run)."""
    if name == "digits":
        return 1797 - math.ceil(1797 * kwargs.get("test_fraction", 0.25))
    if name == "synthetic":
        return int(kwargs.get("n_train", 2000))
    if name == "pydoc_topics":   # a few milliseconds to cut the corpus
        from .text import pydoc_splits
        return len(pydoc_splits(**kwargs)[0])
    full = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000, "imagefolder": 1281167}.get(name, 50000)
    if name == "imagefolder":
        from .imagefolder import IMAGE_EXTENSIONS, imagefolder_split
        try:
            train, _, classes = imagefolder_split(kwargs.get("root", "data/imagenet"), kwargs.get("train_dir", "train"),
                                                  kwargs.get("test_dir", "val"))
            full = sum(1 for c in classes if (train / c).is_dir() for p in (train / c).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        except (FileNotFoundError, ValueError):
            pass   # a dry run without the folder: ImageNet's size
    size = kwargs.get("train_size")
    return min(full, int(size)) if size else full


def train_batches(data: Data, batch_size: int, device: torch.device):
    """The training set in order, batch by batch, as (inputs, targets) on ``device`` (images
    read from a folder centre-cropped, as the test set)."""
    return data.train_in_order(batch_size, device)


def _data(config: ExperimentConfig, load_data: bool, require_data: bool, notes: list[str]):
    """The data set (None for a dry run), its input shape, classes and training size."""
    kwargs = _data_kwargs(config)
    name = config.data.name
    path = "data.root" if name in ("mnist", "cifar10", "cifar100", "imagefolder") else "data"
    try:
        check_dataset(name, **kwargs)
        data = _load_cached(name, json.dumps(kwargs, sort_keys=True)) if load_data else None
    except FileNotFoundError as e:
        if load_data or require_data:
            raise ConfigError([Problem(path, str(e))]) from None
        # a dry run checks the rest of the config against the data set's shape alone
        shape, classes = dataset_info(name, assume=True, **kwargs)
        notes.append(f"{path}: {e}; the dry run assumes inputs {tuple(shape)} and {classes} classes, "
                     f"training needs the files")
        return None, tuple(shape), classes, _n_train(name, kwargs)
    except (ValueError, OSError) as e:
        raise ConfigError([Problem(path, str(e))]) from None
    if data is not None:
        return data, data.input_shape, data.num_classes, data.n_train
    shape, classes = dataset_info(name, **kwargs)
    return None, tuple(shape), classes, _n_train(name, kwargs)


def prepare(config: ExperimentConfig | dict, load_data: bool = True, require_data: bool = True,
            execution: dict[str, str] | None = None) -> Experiment:
    """Build model, optimizer, sparsity plan, engine and phases from a config, checking that they fit
    the data. Raises :class:`ConfigError` with every problem found. A dry run (``load_data=False``)
    with ``require_data=False`` checks a config whose data files are absent on shapes alone, with a
    note. Gradients are taken at attach only by methods that need them. ``execution``: the per-layer
    choice a run recorded (a resumed ``execution: auto`` run replays it instead of calibrating again)."""
    notes: list[str] = []
    if not isinstance(config, ExperimentConfig):
        config, notes = parse_config(config)
    resolved = resolve_config(config)
    data, input_shape, num_classes, n_train = _data(config, load_data, require_data, notes)
    # a dry run (no data) stays on the CPU: validating needs no GPU
    device = resolve_device(config.device) if load_data else torch.device("cpu")
    torch.manual_seed(config.seed)
    model_kwargs = {k: v for k, v in config.model.model_dump().items() if k != "name"}
    try:
        model = create_model(config.model.name, input_shape, num_classes, **model_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError([Problem("model", f"{e} (data {config.data.name!r}: inputs {tuple(input_shape)}, "
                                            f"{num_classes} classes)")]) from None
    except (RuntimeError, MemoryError, OverflowError, ZeroDivisionError) as e:   # torch refusing the layers
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError([Problem("model", f"cannot be built with {model_kwargs}: {first}")]) from None
    model.to(device)
    _check_fits(model, input_shape, num_classes, config.data.name)
    cost = layer_costs(model, input_shape)
    if config.parallel == "fsdp":
        _shard(model, config, notes)
    # under torchrun each rank takes batch_size examples of every global batch of batch_size · world
    steps_per_epoch = math.ceil(n_train / (config.data.batch_size * ranks()[1]))
    total_steps = steps_per_epoch * config.epochs
    plan = plan_sparsity(config, model) if config.sparsity is not None else None
    exp = Experiment(config, resolved, model, None, None, None, plan, tuple(input_shape), num_classes, n_train,
                     steps_per_epoch, total_steps, cost, [], data, notes, device)
    own = _own_phases(exp)
    if own is not None and is_sharded(next(model.parameters(), None)):
        raise ConfigError([Problem("parallel", f"is fsdp, but {exp.plan.algorithms[0].name} runs its own phases on "
                                               "whole layers; use parallel: ddp for it")])
    if own is not None:
        if config.execution != "masked":
            _masked_only(exp, notes)
        exp.phases = own
        return exp
    exp.optimizer = make_optimizer(config, model.parameters())
    if plan is not None:
        # a dry run's stand-in batch of zeros: bounded (batch_size may be 10**12; the scores see zeros anyway)
        batch = (lambda: train_batches(data, config.data.batch_size, device)) if data is not None else \
            _zero_batch(input_shape, num_classes, min(config.data.batch_size, n_train, _DRY_RUN_BATCH))
        try:
            exp.sparsifier = Sparsifier(model, exp.optimizer, plan.algorithms, total_steps=total_steps,
                                        seed=config.seed, data=batch, steps_per_epoch=steps_per_epoch,
                                        auto_finish=False, execution=execution or config.execution,
                                        execution_batch=config.data.batch_size)
        except ExecutionRefused as e:
            raise ConfigError([Problem("execution", f"{e}".replace("execution='sparse'", "execution: sparse"))]) \
                from None
        except (ValueError, TypeError) as e:
            raise ConfigError([problem_at("sparsity", e)]) from None
        _final_targets(plan, exp.sparsifier)
        _check_updates_fall_in_training(exp)
    steps = exp.sparsifier.schedule_steps() if exp.sparsifier is not None else total_steps
    if steps != total_steps:
        notes.append(f"the learning-rate schedule spans {steps} steps, one pass of the method's own cycle "
                     f"(of {total_steps}); the method replays it")
    exp.schedule = _StepsOf(config.lr_schedule.schedule(steps_per_epoch), steps)
    exp.phases = [StandardPhase(exp)]
    return exp


@dataclass(frozen=True)
class _StepsOf(Schedule):
    """``inner`` over ``steps`` steps, whatever total the clock carries."""

    inner: Schedule
    steps: int

    def __call__(self, clock) -> float:
        return self.inner(Clock(clock.step, self.steps))


def _shard(model: nn.Module, config: ExperimentConfig, notes: list[str]) -> None:
    """``parallel: fsdp``: ``fully_shard`` every module that owns parameters, then the whole model
    (each rank then holds one shard of every weight, mask and optimizer state)."""
    if ranks()[1] == 1:
        notes.append("parallel: fsdp shards the model over the ranks of torchrun; one process trains it whole")
        return
    if config.execution != "masked":
        raise ConfigError([Problem("execution", f"is {config.execution!r}, which FSDP does not shard (sparse "
                                                "execution stores Linear weights as their active values); use "
                                                "execution: masked with parallel: fsdp (sparse execution runs in one process)")])
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)


def _own_phases(exp: Experiment) -> list[Phase] | None:
    """The phases of a method whose recipe runs its own loop (the only method of its run)."""
    if exp.plan is None:
        return None
    owners = [(a, recipe_class(a)) for a in exp.plan.algorithms]
    owners = [(a, cls) for a, cls in owners if cls is not None and cls.own_loop]
    if not owners:
        return None
    alg, cls = owners[0]
    if len(exp.plan.algorithms) > 1:
        raise ConfigError([Problem("sparsity", f"{alg.name} runs its own phases on the whole model: it cannot share "
                                               "the model with other sparsity blocks")])
    context = SimpleNamespace(model=exp.model, epochs=exp.config.epochs, steps_per_epoch=exp.steps_per_epoch)
    try:
        return cls.phases(alg, context)
    except (ValueError, EntryPointRefused) as e:
        raise ConfigError([problem_at("sparsity", e)]) from None


def _masked_only(exp: Experiment, notes: list[str]) -> None:
    """A method that runs its own phases (score search, then fine-tuning) trains masked."""
    name = exp.plan.algorithms[0].name
    why = f"{name} searches scores over the frozen dense weights in its own phases, so it trains masked"
    if exp.config.execution == "sparse":
        raise ConfigError([Problem("execution", f"{why}; set execution: masked (or auto, which says so)")])
    notes.append(f"execution: auto: {why}")


def _final_targets(plan: SparsityPlan, sparsifier: Sparsifier) -> None:
    """Put in the plan what each algorithm aims at by the end of training (a gradual method, IMP,
    starts denser); the sparsity at the start stays in ``start_sparsity`` when it differs."""
    final = sparsifier.final_targets()
    for row in plan.rows:
        if row.name in final and abs(final[row.name] - row.target_sparsity) > 1e-9:
            row.start_sparsity, row.target_sparsity = row.target_sparsity, final[row.name]


def _check_updates_fall_in_training(exp: Experiment) -> None:
    """A method that changes masks on its update schedule must have an update inside training: a
    start (or every listed step) after the last step, or a window with no step in it, is a
    ConfigError at the key to change; updates only prevented by a ``freq`` longer than the run get
    a note (a short test run of a long config is legitimate)."""
    clock = Clock(0, exp.total_steps, epoch_steps=exp.steps_per_epoch)
    blocks = dict(sparsity_blocks(exp.config))
    total = exp.total_steps
    problems = []
    for alg in exp.plan.algorithms:
        update = getattr(alg, "update", None)
        if not isinstance(update, UpdateSchedule) or type(alg).update_masks is SparsityAlgorithm.update_masks:
            continue   # masks that never change on the schedule (static), or a schedule of its own (IMP)
        if update.first_update(clock) is not None:
            continue
        names = {sp.name for sp in alg.select(exp.model)}
        where = next((r.block for r in exp.plan.rows if r.algorithm and r.name in names), "sparsity")
        block = blocks.get(where.split(".param_filters")[0])
        own_start = block is not None and block.update is None and "start" in algorithm_parameters(type(alg))
        if update.steps is not None:
            problems.append(Problem(f"{where}.update.steps", f"every update step {list(update.steps)[:5]} falls "
                                    f"after the {total} training steps, so the masks would never change; allowed: "
                                    f"steps in [1, {total}]"))
            continue
        start = clock.to_steps(update.start)
        key = f"{where}.start" if own_start else f"{where}.update.start"
        if start > total:
            given = f" ({update.start!r} of training)" if isinstance(update.start, float) and update.start < 1 else ""
            problems.append(Problem(key, f"the first mask update would come at step {start:g}{given}, after "
                                    f"the last of the {total} training steps, so the masks would never change; "
                                    f"allowed: a start within training (a step ≤ {total}, or a fraction of training < 1)"))
        elif update.stop is not None and clock.to_steps(update.stop) <= start:
            problems.append(Problem(f"{where}.update", f"the update window from {update.start!r} to {update.stop!r} "
                                    f"holds no step of the {total} training steps (it is empty: stop ≤ start), so "
                                    "the masks would never change; allowed: a stop after the start"))
        else:
            exp.notes.append(f"{where}: no mask update falls in the {total} training steps (one every {update.freq} "
                             f"steps from step {start:g}): the masks stay as they start")
    if problems:
        raise ConfigError(problems)


def _zero_batch(input_shape: Sequence[int], num_classes: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in batch for a dry run, for methods that score weights on data at attach."""
    return torch.zeros(batch_size, *input_shape), torch.arange(batch_size) % num_classes


@torch.no_grad()
def _check_fits(model: nn.Module, input_shape: Sequence[int], num_classes: int, data_name: str) -> None:
    model.eval()
    try:
        p = next(model.parameters(), None)
        out = model(torch.zeros(2, *input_shape, device=p.device if p is not None else "cpu"))
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ConfigError([Problem("model", f"does not accept the inputs of data {data_name!r}, of shape "
                                            f"{tuple(input_shape)}: {first}")]) from None
    finally:
        model.train()
    if tuple(out.shape[:2]) != (2, num_classes):   # (2, classes), or (2, vocab, T) for a language model
        raise ConfigError([Problem("model", f"gives outputs of shape {tuple(out.shape[1:])} per example, but data "
                                            f"{data_name!r} has {num_classes} classes")])
