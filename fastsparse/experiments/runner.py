"""A plain, readable training loop for experiments described by a config, and the run folder.

One epoch::

    for each batch (order from a seeded generator saved in every checkpoint):
        loss = cross_entropy(model(x), y); loss.backward()
        optimizer.step()      # the Sparsifier's post-step hook re-applies masks and updates them
        lr_scheduler.step()   # learning rate per step
    evaluate on the test set; write metrics; checkpoint

A run lives in ``<out>/<algorithm>-<hash of the resolved config>/``::

    config.yaml      the resolved config (every default filled in); its hash names the folder
    run.json         where the config came from, and when
    checkpoint.pt    model, optimizer, LR scheduler, sparsifier, data-order RNG, epoch, metrics
                     (written to a temporary file, then renamed: never half-written)
    metrics.jsonl    one line per epoch (also metrics.csv)
    updates.jsonl    one line per mask update (step, weights changed, fraction changed)
    model.pt         final weights and masks
    summary.json     written last: its presence marks the run complete

``--resume`` continues from ``checkpoint.pt`` bit for bit: same batches, same masks, same
weights as a run that was never interrupted.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import (
    DIGITS_BASE, SUITE_BLOCK, ConfigError, ExperimentConfig, Problem, SparsityPlan, algorithm_parameters,
    config_hash, parse_config, plan_sparsity, resolve_config,
)
from .data import Dataset, check_dataset, dataset_info, load_dataset
from ..core.flops import LayerCost, forward_flops, layer_costs, training_flops, training_rule
from .models import create_model
from ..engine.sparsifier import Sparsifier

__all__ = [
    "Experiment", "prepare", "run", "RunInterrupted", "ResumeError", "run_dir_for", "lr_factor",
    "DIGITS_BASE", "SUITE_BLOCK", "suite_methods", "method_config", "run_suite",
]

log = logging.getLogger("fastsparse.experiments.runner")


class ResumeError(ValueError):
    """A run folder that cannot be continued as asked (config changed, nothing to resume, ...)."""


class RunInterrupted(RuntimeError):
    """Raised from an ``on_epoch_end`` callback to stop a run after its checkpoint (tests, time limits)."""


# --- building an experiment -------------------------------------------------------------------------
@dataclass
class Experiment:
    """Everything a run needs, built from a config (nothing written to disk)."""

    config: ExperimentConfig
    resolved: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sparsifier: Sparsifier | None
    plan: SparsityPlan | None
    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    steps_per_epoch: int
    total_steps: int
    cost: LayerCost
    data: Dataset | None = None
    notes: list[str] = field(default_factory=list)
    search: Any = None   # a score-search algorithm (gem, edge_popup): the engine is built after its search
    device: torch.device = torch.device("cpu")


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, spec) -> float:
    """The learning rate at ``step`` as a factor of ``lr``: linear warm-up over ``warmup_epochs``,
    then constant; cosine, minimum + (1 − minimum)/2 · (1 + cos(π · t)) with t the fraction of
    the post-warm-up steps done; or step decay, gamma^(milestones passed)."""
    warm = spec.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    if spec.name == "cosine":
        t = (step - warm) / max(1.0, total_steps - warm)
        return spec.minimum + (1 - spec.minimum) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if spec.name == "step":
        return spec.gamma ** sum(step >= m * steps_per_epoch for m in spec.milestones)
    return 1.0


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, kwargs_json: str) -> Dataset:
    return load_dataset(name, **json.loads(kwargs_json))


def _data_kwargs(config: ExperimentConfig) -> dict[str, Any]:
    return {k: v for k, v in config.data.model_dump().items() if k not in ("name", "batch_size")}


def _n_train(name: str, kwargs: dict[str, Any]) -> int:
    """Training examples, without loading (for the step count of a dry run)."""
    if name == "digits":
        return 1797 - math.ceil(1797 * kwargs.get("test_fraction", 0.25))
    if name == "synthetic":
        return int(kwargs.get("n_train", 2000))
    if name == "imagefolder":
        from .data import IMAGE_EXTENSIONS, _imagefolder_split
        train, _, classes = _imagefolder_split(kwargs.get("root", "data/imagenet"), kwargs.get("train_dir", "train"),
                                               kwargs.get("test_dir", "val"))
        full = sum(1 for c in classes if (train / c).is_dir() for p in (train / c).iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        full = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000}.get(name, 50000)
    size = kwargs.get("train_size")
    return min(full, int(size)) if size else full


def _optimizer(config: ExperimentConfig, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """The config's optimizer over ``params`` (at ``lr`` instead of the config's, if given)."""
    spec = config.optimizer.model_dump()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec.pop("name")]
    if lr is not None:
        spec["lr"] = lr
    return cls(params, **spec)


def _ranks() -> tuple[int, int]:
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


_KNOWN_SHAPES = ("mnist", "cifar10", "cifar100")   # data sets whose shape is known without their files


def prepare(config: ExperimentConfig | dict, load_data: bool = True, require_data: bool = True) -> Experiment:
    """Build model, optimizer, LR schedule and sparsifier from a config, checking that they fit
    the data. Raises :class:`ConfigError` with every problem found. A dry run (``load_data=False``)
    with ``require_data=False`` checks a config whose data files are absent against the data
    set's known shape (MNIST, CIFAR), with a note."""
    notes: list[str] = []
    if not isinstance(config, ExperimentConfig):
        config, notes = parse_config(config)
    resolved = resolve_config(config)
    kwargs = _data_kwargs(config)
    name = config.data.name
    try:
        check_dataset(name, **kwargs)
        data = _load_cached(name, json.dumps(kwargs, sort_keys=True)) if load_data else None
    except FileNotFoundError as e:
        if load_data or require_data or name not in _KNOWN_SHAPES:
            raise ConfigError([Problem("data.root" if name in _KNOWN_SHAPES else "data", str(e))]) from None
        # a dry run checks the rest of the config against the data set's known shape
        notes.append(f"data.root: {e}; the dry run assumes {name}'s shape, training needs the files")
        data = None
    except (ValueError, OSError) as e:
        raise ConfigError([Problem("data.root" if name in _KNOWN_SHAPES else "data", str(e))]) from None
    if data is not None:
        input_shape, num_classes, n_train = data.input_shape, data.num_classes, len(data.x_train)
    else:
        input_shape, num_classes = dataset_info(name, **kwargs)
        n_train = _n_train(name, kwargs)

    # a dry run (no data) stays on the CPU: validating needs no GPU
    device = resolve_device(config.device) if load_data else torch.device("cpu")
    torch.manual_seed(config.seed)
    model_kwargs = {k: v for k, v in config.model.model_dump().items() if k != "name"}
    try:
        model = create_model(config.model.name, input_shape, num_classes, **model_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError([Problem("model", f"{e} (data {name!r}: inputs {tuple(input_shape)}, "
                                            f"{num_classes} classes)")]) from None
    model.to(device)
    _check_fits(model, input_shape, num_classes, name)
    cost = layer_costs(model, input_shape)
    optimizer = _optimizer(config, model.parameters())
    # under torchrun each rank takes batch_size examples of every global batch of batch_size · world
    steps_per_epoch = math.ceil(n_train / (config.data.batch_size * _ranks()[1]))
    total_steps = steps_per_epoch * config.epochs
    spec = config.lr_schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, spec))
    plan, sparsifier = None, None
    if config.sparsity is not None:
        batch = tuple(t.to(device) for t in _first_batch(data, input_shape, num_classes, config.data.batch_size))
        _gradients_on(model, batch)
        plan = plan_sparsity(config, model, batch)
        search = _check_own_loops(plan.algorithms, model, steps_per_epoch, config.epochs)
        if search is None:
            try:
                sparsifier = Sparsifier(model, optimizer, plan.algorithms, total_steps=total_steps, seed=config.seed)
            except (ValueError, TypeError) as e:
                raise ConfigError([Problem("sparsity", str(e))]) from None
            _final_targets(plan, sparsifier, total_steps)
    else:
        search = None
    return Experiment(config, resolved, model, optimizer, scheduler, sparsifier, plan, tuple(input_shape),
                      num_classes, n_train, steps_per_epoch, total_steps, cost, data, notes, search, device)


def _check_own_loops(algorithms: Sequence[Any], model: nn.Module, steps_per_epoch: int, epochs: int) -> Any:
    """Check the methods that add to the loop against the training budget: Sup-tickets (its cycles
    must fit; it learns the epoch length here) and score search (gem, edge_popup: alone, and
    GEM-MINER's rounds must reach the target). Returns the score-search algorithm, if any."""
    from ..algorithms.gems import GemMiner, _ScoreSearch
    from ..algorithms.suptickets import SupTickets, cyclic_plan

    problems: list[Problem] = []
    sup = [a for a in algorithms if isinstance(a, SupTickets)]
    searchers = [a for a in algorithms if isinstance(a, _ScoreSearch)]
    if len(sup) > 1:
        problems.append(Problem("sparsity", "one suptickets block at most: its cycles set the learning rate "
                                            "of the whole model"))
    for a in sup:
        if a.steps_per_epoch not in (None, steps_per_epoch):
            problems.append(Problem("sparsity.steps_per_epoch", f"is {a.steps_per_epoch}, but the data gives "
                                                                f"{steps_per_epoch} steps per epoch; leave it out"))
        try:
            cyclic_plan(epochs, a.cycle, a.cycle_rate)
        except ValueError as e:
            problems.append(Problem("sparsity.cycle", f"{e} (epochs: {epochs})"))
    if searchers and len(algorithms) > 1:
        problems.append(Problem("sparsity", f"{searchers[0].name} searches the masks of the whole model with frozen "
                                            "weights: it cannot share the model with other sparsity blocks"))
    for a in searchers:
        if isinstance(a, GemMiner):
            try:
                a.check_budget(sum(sp.param.numel() for sp in a.select(model)), epochs)
            except ValueError as e:
                problems.append(Problem("sparsity.iter_period", f"{e} (epochs of search: {epochs})"))
    if problems:
        raise ConfigError(problems)
    for a in sup:
        a.steps_per_epoch = steps_per_epoch
    return searchers[0] if searchers else None


def _final_targets(plan: SparsityPlan, sparsifier: Sparsifier, total_steps: int) -> None:
    """Put in the plan what each algorithm aims at by the end of training (a gradual method starts
    denser); the sparsity at the start stays in ``start_sparsity`` when it differs."""
    from ..core.schedules import Clock

    end = Clock(total_steps, total_steps)
    final: dict[str, float] = {}
    for g in sparsifier.groups:
        targets = g.algorithm.target_sparsities(g.params, end)
        if targets:
            final.update({sp.name: float(t) for sp, t in zip(g.params, targets)})
    for row in plan.rows:
        if row.name in final and abs(final[row.name] - row.target_sparsity) > 1e-9:
            row.start_sparsity, row.target_sparsity = row.target_sparsity, final[row.name]


def _first_batch(data: Dataset | None, input_shape: Sequence[int], num_classes: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` training examples (zeros when the data is not loaded: a dry run)."""
    if data is None:
        return torch.zeros(batch_size, *input_shape), torch.arange(batch_size) % num_classes
    return data.inputs(data.x_train[:batch_size]), data.y_train[:batch_size]


def _gradients_on(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Leave the gradients of one batch in ``.grad`` (eval mode: no batch-norm statistics change),
    for methods that choose their first masks by gradient. The first training step clears them."""
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    finally:
        model.train()


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
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError([Problem("model", f"gives outputs of shape {tuple(out.shape[1:])} per example, but data "
                                            f"{data_name!r} has {num_classes} classes")])


# --- the run folder ---------------------------------------------------------------------------------
def _label(resolved: dict[str, Any]) -> str:
    blocks = resolved.get("sparsity")
    if blocks is None:
        return "dense"
    blocks = blocks if isinstance(blocks, list) else [blocks]
    return "+".join(b.get("algorithm", "static") for b in blocks)


def run_dir_for(resolved: dict[str, Any], out: str | os.PathLike) -> Path:
    """``<out>/<algorithm>-<hash>``, or ``out`` itself when it already is a run folder."""
    out = Path(out)
    if (out / "config.yaml").is_file():
        return out
    return out / f"{_label(resolved)}-{config_hash(resolved)}"


def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file, then rename: a killed process leaves the old file or the new one.
    Under torchrun only rank 0 writes (the ranks hold the same model)."""
    if _ranks()[0] != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    if _ranks()[0] != 0:
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an algorithm keeps state that is not plain data; this file is our own
        return torch.load(path, map_location="cpu", weights_only=False)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``path: old -> new`` for every setting that differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError):
        return None


def _find_changed_run(out: Path, source: str | None, resolved: dict[str, Any]) -> tuple[Path, list[str]] | None:
    """An unfinished run in ``out`` started from the same file with another config."""
    if source is None or not out.is_dir():
        return None
    for d in sorted(out.iterdir()):
        info = d / "run.json"
        if d.is_dir() and info.is_file() and not (d / "summary.json").exists():
            try:
                same = json.loads(info.read_text()).get("source") == source
            except (OSError, ValueError):
                continue
            old = _saved_config(d) if same else None
            if old is not None and old != resolved:
                return d, config_diff(old, resolved)
    return None


# --- the loop ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the test set."""
    model.eval()
    loss, correct = 0.0, 0
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    for i in range(0, len(data.x_test), batch_size):
        x, y = data.inputs(data.x_test[i:i + batch_size]).to(device), data.y_test[i:i + batch_size].to(device)
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train()
    n = len(data.x_test)
    return loss / n, correct / n


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name[: -len("_mask")]: buf for name, buf in model.named_buffers() if name.endswith("_mask")}


def _density_per_layer(model: nn.Module, exp: Experiment) -> dict[str, float]:
    masks = _masks(model)
    if exp.plan is not None:
        names = [r.name for r in exp.plan.rows if r.algorithm is not None]
    else:
        from ..core.masks import select_params
        names = [sp.name for sp in select_params(model)]
    return {n: (float(masks[n].float().mean()) if n in masks else 1.0) for n in names}


class _Progress:
    """A rich progress bar on a terminal; a log line every tenth of training otherwise."""

    def __init__(self, enabled: bool, total_steps: int, epochs: int, start_epoch: int, label: str):
        self.enabled, self.epochs, self.label, self.bar = enabled, epochs, label, None
        if not enabled:
            return
        from rich.console import Console
        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(f"{label} epoch {start_epoch}/{epochs}", total=total_steps,
                                          completed=start_epoch * (total_steps // max(1, epochs)), stats="")
            self.bar.start()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def epoch(self, m: dict[str, Any]) -> None:
        if self.bar is not None:
            stats = (f"loss {m['train_loss']:.3f}  train {m['train_accuracy']:.1%}  test {m['test_accuracy']:.1%}  "
                     f"sparsity {m['sparsity']:.2%}")
            self.bar.update(self.task, description=f"{self.label} epoch {m['epoch']}/{self.epochs}", stats=stats)
        elif self.enabled and (m["epoch"] % max(1, self.epochs // 10) == 0 or m["epoch"] == self.epochs):
            log.info("%s epoch %d/%d  loss %.3f  train %.1f%%  test %.1f%%  sparsity %.2f%%", self.label,
                     m["epoch"], self.epochs, m["train_loss"], 100 * m["train_accuracy"],
                     100 * m["test_accuracy"], 100 * m["sparsity"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# the columns of metrics.csv: the union of the records' keys (a search epoch has no train loss)
METRIC_COLUMNS = ("epoch", "phase", "step", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                  "sparsity", "updates", "changed_fraction", "itop_rate", "forward_flops", "flagged", "seconds")


def _csv_writer(f) -> csv.DictWriter:
    return csv.DictWriter(f, fieldnames=METRIC_COLUMNS, restval="", extrasaction="ignore")


def _write_metrics(run_dir: Path, metrics: list[dict[str, Any]], updates: list[dict[str, Any]]) -> None:
    """Rewrite the three logs from the checkpoint's records (at the start and on resume)."""
    _atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    buf = io.StringIO()
    if metrics:
        writer = _csv_writer(buf)
        writer.writeheader()
        writer.writerows(metrics)
    _atomic_write(run_dir / "metrics.csv", buf.getvalue())
    _atomic_write(run_dir / "updates.jsonl", "".join(json.dumps(u) + "\n" for u in updates))


def _append_metrics(run_dir: Path, m: dict[str, Any], new_updates: list[dict[str, Any]]) -> None:
    """Append one epoch to the logs (the checkpoint, written first, holds the same records)."""
    if _ranks()[0] != 0:
        return
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(m) + "\n")
    with open(run_dir / "metrics.csv", "a", newline="") as f:
        writer = _csv_writer(f)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(m)
    if new_updates:
        with open(run_dir / "updates.jsonl", "a") as f:
            f.write("".join(json.dumps(u) + "\n" for u in new_updates))


def run(config: ExperimentConfig | dict, out: str | os.PathLike = "runs", *, resume: bool | str = False,
        progress: bool = True, source: str | None = None, checkpoint_every: int = 1,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the experiment ``config`` into its run folder under ``out``; return ``summary.json``'s content.

    A finished run (its ``summary.json`` exists) is not trained again. ``resume``: continue an
    interrupted run from its last checkpoint; the config must be the one it started with.
    ``resume="auto"``: continue if there is a checkpoint, start otherwise.
    ``checkpoint_every``: epochs between checkpoints (the last epoch always has one; results do
    not depend on it). ``on_epoch_end(epoch, metrics)`` is called after each epoch's logs.
    """
    exp = prepare(config)
    for note in exp.notes:
        log.warning("%s", note)
    out = Path(out)
    run_dir = run_dir_for(exp.resolved, out)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = _saved_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    if saved is not None and saved != exp.resolved:
        diff = "; ".join(config_diff(saved, exp.resolved))
        raise ResumeError(f"{run_dir} holds a run of another config ({diff}); "
                          f"start the new config in its own folder (--out {run_dir.parent})")
    if (run_dir / "summary.json").is_file():
        log.info("%s is complete; not training it again", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    if resume == "auto":
        resume = ckpt_path.is_file()
    if resume and not ckpt_path.is_file():
        if run_dir.is_dir():
            log.warning("%s has no checkpoint yet; starting it from the beginning", run_dir)
        else:
            changed = _find_changed_run(out, source, exp.resolved)
            if changed is not None:
                raise ResumeError(f"the config changed since {changed[0]} was started, so it cannot be resumed: "
                                  + "; ".join(changed[1]) + ". Restore those settings to resume, or train "
                                  "without --resume to start a new run")
            raise ResumeError(f"nothing to resume: no run of this config in {out} (expected {run_dir.name}); "
                              f"train without --resume to start it")
    if not resume and ckpt_path.is_file():
        raise ResumeError(f"{run_dir} holds an interrupted run of this config: pass --resume to continue it, "
                          f"or delete the folder to start over")
    if _ranks()[1] > 1:
        import torch.distributed as dist
        dist.barrier()   # every rank has made the checks above before rank 0 writes anything
    if _ranks()[0] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", _yaml(exp.resolved))
    if not (run_dir / "run.json").is_file():
        _atomic_write(run_dir / "run.json", json.dumps({"source": source, "hash": config_hash(exp.resolved),
                                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return _train(exp, run_dir, ckpt_path if ckpt_path.is_file() else None, progress, max(1, checkpoint_every),
                  on_epoch_end)


def _train(exp: Experiment, run_dir: Path, checkpoint: Path | None, progress: bool, every: int,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    state = _load_checkpoint(checkpoint) if checkpoint is not None else None
    if exp.search is not None:
        return _train_scored(exp, run_dir, state, progress, every, on_epoch_end)
    return _loop(exp, run_dir, state, progress, every, on_epoch_end)


def _loop(exp: Experiment, run_dir: Path, state: dict[str, Any] | None, progress: bool, every: int,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None, *, first_epoch: int = 0,
          metrics: list[dict[str, Any]] | None = None, phase: str = "train",
          extra_state: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Epochs ``first_epoch`` to ``first_epoch + config.epochs`` of the standard loop (continuing
    from ``state``, a checkpoint, if given), then the summary."""
    from ..algorithms.suptickets import SupTickets, TicketCollector

    config, model, opt, sched, sparsifier, data = (exp.config, exp.model, exp.optimizer, exp.scheduler,
                                                   exp.sparsifier, exp.data)
    assert data is not None
    bs, n = config.data.batch_size, len(data.x_train)
    order = torch.Generator().manual_seed(config.seed)
    metrics = list(metrics or [])
    acc = {"train_seconds": 0.0, "sparse_forward": 0.0, "update_examples": 0}
    start_epoch = first_epoch
    tickets = None
    if sparsifier is not None and any(isinstance(g.algorithm, SupTickets) for g in sparsifier.groups):
        tickets = TicketCollector(model, sparsifier)   # the cyclic phase: learning rate, tickets, superposition
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if sparsifier is not None:
            sparsifier.load_state_dict(state["sparsifier"])
        if tickets is not None:
            tickets.load_state_dict(state["suptickets"])
        order.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        metrics, acc = state["metrics"], state["accumulators"]
        start_epoch = state["epoch"]
        log.info("resuming %s at epoch %d", run_dir, start_epoch)

    def extra() -> dict[str, Any]:
        out = extra_state() if extra_state is not None else {}
        if tickets is not None:
            out["suptickets"] = tickets.state_dict()
        return out

    _write_metrics(run_dir, metrics, sparsifier.history if sparsifier is not None else [])
    f_dense = forward_flops(model, exp.cost, sparse=False)
    loss_f = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    last_epoch = first_epoch + config.epochs
    rank, world = _ranks()
    device = exp.device
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # masks are buffers kept equal by the engine (and checked at every update): not broadcast
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    bar = _Progress(progress, exp.total_steps, config.epochs, start_epoch - first_epoch, _label(exp.resolved))
    try:
        for epoch in range(start_epoch, last_epoch):
            t0 = time.perf_counter()
            f_start = forward_flops(model, exp.cost)
            n_history = len(sparsifier.history) if sparsifier is not None else 0
            model.train()
            loss_sum, correct, changed, cyclic_lr = 0.0, 0, [], None
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, bs * world):
                idx = perm[i:i + bs * world].tensor_split(world)[rank]
                x, y = data.inputs(data.x_train[idx]).to(device), data.y_train[idx].to(device)
                n_updates = len(sparsifier.history) if sparsifier is not None else 0
                if tickets is not None:
                    cyclic_lr = tickets.set_lr(opt, sparsifier.step_count)
                opt.zero_grad(set_to_none=True)
                out = net(x)
                loss = loss_f(out, y)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((out.argmax(1) == y).sum())
                if sparsifier is not None and len(sparsifier.history) > n_updates:
                    changed.append(sparsifier.history[-1]["changed_fraction"])
                    acc["update_examples"] += len(idx)
                bar.step()
            if world > 1:
                loss_sum, correct = _sum_over_ranks(loss_sum, correct)
            test_loss, test_acc = evaluate(model, data)
            f_end = forward_flops(model, exp.cost)
            acc["sparse_forward"] += 0.5 * (f_start + f_end) * n
            acc["train_seconds"] += time.perf_counter() - t0
            m = {
                "epoch": epoch + 1, "phase": phase,
                "step": (epoch + 1 - first_epoch) * exp.steps_per_epoch,
                "lr": cyclic_lr if cyclic_lr is not None else opt.param_groups[0]["lr"],
                "train_loss": loss_sum / n, "train_accuracy": correct / n,
                "test_loss": test_loss, "test_accuracy": test_acc,
                "sparsity": sparsifier.sparsity() if sparsifier is not None else 0.0,
                "updates": len(changed), "changed_fraction": sum(changed) / len(changed) if changed else 0.0,
                "itop_rate": sparsifier.exploration_rate() if sparsifier is not None else 1.0,
                "forward_flops": f_end,
                "seconds": acc["train_seconds"],
            }
            metrics.append(m)
            if (epoch + 1) % every == 0 or epoch + 1 == last_epoch:
                _checkpoint(run_dir, exp, epoch + 1, order, metrics, acc, extra())
            _append_metrics(run_dir, m, sparsifier.history[n_history:] if sparsifier is not None else [])
            bar.epoch(m)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, m)
    finally:
        bar.close()
    if tickets is not None:
        _superpose(exp, tickets, metrics, run_dir)
    return _finish(exp, run_dir, metrics, acc, f_dense)


def _sum_over_ranks(*values: float) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _train_batches(data: Dataset, batch_size: int, device: torch.device) -> Any:
    """The training inputs in order, batch by batch (for re-estimating BatchNorm statistics)."""
    for i in range(0, len(data.x_train), batch_size):
        yield data.inputs(data.x_train[i:i + batch_size]).to(device)


def _superpose(exp: Experiment, tickets: Any, metrics: list[dict[str, Any]], run_dir: Path) -> None:
    """Sup-tickets after the last cycle: superpose the tickets, prune back, re-estimate BN, and
    record the superposed model's accuracy as the last line of the metrics."""
    data = exp.data
    assert data is not None and exp.sparsifier is not None
    tickets.finish(_train_batches(data, exp.config.data.batch_size, exp.device))
    test_loss, test_acc = evaluate(exp.model, data)
    m = dict(metrics[-1], phase="superposed", test_loss=test_loss, test_accuracy=test_acc,
             sparsity=exp.sparsifier.sparsity(), forward_flops=forward_flops(exp.model, exp.cost))
    metrics.append(m)
    _append_metrics(run_dir, m, [])
    log.info("superposed %d tickets: test accuracy %.4f (last ticket %.4f)", len(tickets.tickets), test_acc,
             metrics[-2]["test_accuracy"])


class _Batches:
    """The training set in batches, reshuffled each epoch by a seeded generator (for drivers that
    iterate data themselves: the score search)."""

    def __init__(self, data: Dataset, batch_size: int, order: torch.Generator, device: torch.device):
        self.data, self.batch_size, self.order, self.device = data, batch_size, order, device

    def __len__(self) -> int:
        return math.ceil(len(self.data.x_train) / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.data.x_train), generator=self.order)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.data.inputs(self.data.x_train[idx]).to(self.device), self.data.y_train[idx].to(self.device)


def _train_scored(exp: Experiment, run_dir: Path, state: dict[str, Any] | None, progress: bool, every: int,
                  on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    """edge-popup and GEM-MINER: ``epochs`` epochs of score search with frozen weights (SGD with
    the config's optimizer settings and ``lr_schedule``), then ``fine_tune_epochs`` (default:
    as many) training the weights under the found mask at ``fine_tune_lr`` with
    ``fine_tune_lr_policy``. A checkpoint is written when the search ends and during fine-tuning;
    an interrupted search starts over (it is deterministic, so it finds the same masks)."""
    from ..algorithms.gems import freeze_bn_affine_, search
    from ..core.masks import attach_mask

    config, model, data, alg = exp.config, exp.model, exp.data, exp.search
    assert data is not None
    search_epochs = config.epochs
    ft_epochs = alg.fine_tune_epochs if alg.fine_tune_epochs is not None else search_epochs
    metrics: list[dict[str, Any]] = []
    if state is None:
        loss_f = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        # every rank searches the whole data the same way (the search is deterministic), then
        # fine-tuning shares the batches out as in the standard loop
        loader = _Batches(data, config.data.batch_size, torch.Generator().manual_seed(config.seed), exp.device)
        t0 = time.perf_counter()

        def after_epoch(epoch: int, scored: nn.Module) -> None:
            test_loss, test_acc = evaluate(scored, data)
            m = {"epoch": epoch + 1, "phase": "search", "step": (epoch + 1) * exp.steps_per_epoch,
                 "test_loss": test_loss, "test_accuracy": test_acc,
                 "flagged": sum(int(f.sum()) for f in scored.flags), "seconds": time.perf_counter() - t0}
            metrics.append(m)
            period = getattr(alg, "iter_period", 0)
            if getattr(alg, "checkpoint_at_prune", False) and period and (epoch + 1) % period == 0 and \
                    (epoch + 1) // period <= (search_epochs - 1) // period:
                _atomic_save({"epoch": epoch + 1, "scores": [s.detach().clone() for s in scored.scores],
                              "flags": [f.clone() for f in scored.flags]},
                             run_dir / f"prune_round{(epoch + 1) // period}.pt")
            if alg.sanity_checks and epoch + 1 == search_epochs:
                from ..algorithms.gems import sanity_variants
                sanity = {k: evaluate(v, data)[1] for k, v in sanity_variants(scored, config.seed).items()}
                _atomic_write(run_dir / "sanity.json", json.dumps(sanity, indent=1))
                log.info("sanity checks of the found ticket (test accuracy before fine-tuning): %s",
                         ", ".join(f"{k} {v:.4f}" for k, v in sanity.items()))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, m)

        opt = config.optimizer
        total = search_epochs * exp.steps_per_epoch
        search(model, alg, loader, lambda mdl, b: loss_f(mdl(b[0]), b[1]), search_epochs, lr=opt.lr,
               momentum=float(getattr(opt, "momentum", 0.9) or 0.0), weight_decay=opt.weight_decay,
               seed=config.seed, on_epoch_end=after_epoch,
               lr_factor=lambda step: lr_factor(step, total, exp.steps_per_epoch, config.lr_schedule))
        log.info("%s: search done, %d of %d weights kept", alg.name,
                 sum(int(m.sum()) for m in alg.found.values()), sum(m.numel() for m in alg.found.values()))
    else:
        alg.load_state_dict(state["search"])
        freeze_bn_affine_(model)   # as the search left it: BatchNorm non-affine
        for sp in alg.select(model):
            attach_mask(sp, alg.found[sp.name])   # as the search left it: the found masks attached
        metrics = [m for m in state["metrics"] if m.get("phase") == "search"]
    ft = _fine_tune_experiment(exp, ft_epochs)
    if state is None:
        state = _checkpoint(run_dir, ft, search_epochs, torch.Generator().manual_seed(config.seed), metrics,
                            {"train_seconds": metrics[-1]["seconds"] if metrics else 0.0, "sparse_forward": 0.0,
                             "update_examples": 0}, {"search": alg.state_dict()})
    return _loop(ft, run_dir, state, progress, every, on_epoch_end, first_epoch=search_epochs, metrics=metrics,
                 phase="fine_tune", extra_state=lambda: {"search": alg.state_dict()})


def _fine_tune_experiment(exp: Experiment, epochs: int) -> Experiment:
    """The experiment of the fine-tuning phase: the found masks fixed (a static engine), the
    weights that can train (BatchNorm stays non-affine), the config's optimizer at ``fine_tune_lr``."""
    alg, config = exp.search, exp.config
    # the search (or, on resume, freeze_bn_affine_) left BatchNorm's affine parameters frozen
    optimizer = _optimizer(config, [p for p in exp.model.parameters() if p.requires_grad], alg.fine_tune_lr)
    spe = exp.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: alg.fine_tune_factor(step / spe, epochs))
    sparsifier = Sparsifier(exp.model, optimizer, alg, total_steps=epochs * spe, seed=config.seed)
    return dataclasses.replace(exp, config=config.model_copy(update={"epochs": epochs}), optimizer=optimizer,
                               scheduler=scheduler, sparsifier=sparsifier, total_steps=epochs * spe, search=None)


def _checkpoint(run_dir: Path, exp: Experiment, epoch: int, order: torch.Generator,
                metrics: list[dict[str, Any]], acc: dict[str, Any], extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Everything a resumed run needs to continue bit for bit, written atomically (and returned)."""
    sparsifier = exp.sparsifier
    state = {
        "epoch": epoch, "model": exp.model.state_dict(), "optimizer": exp.optimizer.state_dict(),
        "scheduler": exp.scheduler.state_dict(),
        "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
        "data_rng": order.get_state(), "torch_rng": torch.get_rng_state(), "metrics": metrics,
        "accumulators": acc, "config_hash": config_hash(exp.resolved), **(extra or {}),
    }
    _atomic_save(state, run_dir / "checkpoint.pt")
    return state


def _finish(exp: Experiment, run_dir: Path, metrics: list[dict[str, Any]], acc: dict[str, Any],
            f_dense: float) -> dict[str, Any]:
    """Final weights, then ``summary.json``: the mark of a complete run."""
    summary = _summary(exp, metrics, acc, f_dense, run_dir)
    _atomic_save(exp.model.state_dict(), run_dir / "model.pt")
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    log.info("%s: test accuracy %.4f, sparsity %.4f, %.1f s -> %s", summary["method"], summary["test_accuracy"],
             summary["sparsity"], summary["train_seconds"], run_dir)
    return summary


def _target_sparsity(sparsifier: Sparsifier) -> float:
    """What the algorithms aim at by the end of training, over all their parameters."""
    rows = sparsifier.report()
    total = sum(r["numel"] for r in rows)
    return sum(r["target_sparsity"] * r["numel"] for r in rows) / total if total else 0.0


def _summary(exp: Experiment, metrics: list[dict[str, Any]], acc: dict[str, Any], f_dense: float,
             run_dir: Path) -> dict[str, Any]:
    last = metrics[-1]
    examples = exp.n_train * exp.config.epochs
    rule = training_rule(exp.plan.algorithms if exp.plan is not None else [])
    f_sparse_mean = acc["sparse_forward"] / examples if exp.sparsifier is not None else f_dense
    dense_flops = training_flops("dense", f_dense, f_dense, examples)
    sparse_flops = training_flops(rule, f_dense, f_sparse_mean, examples, acc["update_examples"])
    density = _density_per_layer(exp.model, exp)
    sp = exp.sparsifier
    total = sum(m.numel() for m in _masks(exp.model).values())
    return {
        "method": _label(exp.resolved),
        "target_sparsity": _target_sparsity(sp) if sp is not None else 0.0,
        "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "sparsity": sp.sparsity() if sp is not None else 0.0,
        "density_per_layer": density,
        "train_seconds": acc["train_seconds"],
        "dense_equivalent_flops": dense_flops, "sparse_flops": sparse_flops,
        "flops_fraction": sparse_flops / dense_flops if dense_flops else 1.0,
        "flops_rule": rule, "forward_flops_dense": f_dense, "forward_flops_sparse": forward_flops(exp.model, exp.cost),
        "mask_updates": len(sp.history) if sp is not None else 0,
        "itop_rate": last["itop_rate"],
        "sparse_params": total, "active_params": sum(int(m.sum()) for m in _masks(exp.model).values()),
        "epochs": exp.config.epochs, "steps": exp.total_steps, "seed": exp.config.seed,
        "run_dir": str(run_dir), "hash": config_hash(exp.resolved), "config": exp.resolved,
    }


# --- the compare suite ------------------------------------------------------------------------------
# configurable bases whose defaults duplicate a named method (dst with its defaults is rigl)
_GENERIC = {"dst"}
# Methods whose training is not the standard loop (unless their class says otherwise with a
# ``standard_loop`` attribute): in it they would run as something else under their name.
_OWN_LOOP = {
    "prune_and_grow_global": "a pruning-stability test: it keeps the density it starts from (dense here)",
    "prune_and_grow_uniform": "a pruning-stability test: it keeps the density it starts from (dense here)",
}


def method_config(base: dict[str, Any], method: str, sparsity: float, seed: int,
                  block: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment of one suite cell: ``base`` with ``method`` at ``sparsity`` (``dense``: no block);
    settings of ``block`` the method does not take are left out."""
    from ..algorithms.base import get_algorithm

    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    cfg.pop("sparsity", None)
    if method == "dense":
        return cfg
    accepted = algorithm_parameters(get_algorithm(method))
    settings = {k: v for k, v in (SUITE_BLOCK if block is None else block).items() if k in accepted}
    cfg["sparsity"] = {"algorithm": method, "sparsity": sparsity, **settings}
    return cfg


def _probe(method: str, base: dict[str, Any], block: dict[str, Any] | None) -> str | None:
    """None if ``method`` builds at 90% sparsity and trains three steps of the standard loop; else why not."""
    from ..algorithms.base import get_algorithm

    cls = get_algorithm(method)
    if not getattr(cls, "standard_loop", method not in _OWN_LOOP):
        return _OWN_LOOP.get(method, "needs its own training loop")
    cfg = method_config(base, method, 0.9, 0, block)   # the base's epochs: Sup-tickets' cycles must fit them
    try:
        exp = prepare(cfg)
        data = exp.data
        assert data is not None
        for i in range(3):
            x, y = data.inputs(data.x_train[i * 8:(i + 1) * 8]), data.y_train[i * 8:(i + 1) * 8]
            exp.optimizer.zero_grad()
            nn.functional.cross_entropy(exp.model(x), y).backward()
            exp.optimizer.step()
            exp.scheduler.step()
    except ConfigError as e:
        return "; ".join(str(p) for p in e.problems)
    except Exception as e:  # any failure means "does not fit this suite"; the reason goes in the report
        return f"{type(e).__name__}: {e}"
    return None


def suite_methods(base: dict[str, Any] = DIGITS_BASE, block: dict[str, Any] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """Every registered algorithm that runs in the standard loop on ``base``'s data, and the skipped ones."""
    from ..algorithms.base import list_algorithms

    order = ["static", "set", "snfs", "rigl"]
    names = [m for m in order if m in list_algorithms()] + [m for m in list_algorithms() if m not in order]
    ok, skipped = ["dense"], {}
    for m in names:
        if m in _GENERIC:
            skipped[m] = "generic base class (its defaults are rigl's)"
            continue
        reason = _probe(m, base, block)
        if reason is None:
            ok.append(m)
        else:
            skipped[m] = reason
    return ok, skipped


def _suite_worker(cfg: dict[str, Any], out: str) -> dict[str, Any]:
    # runs of a suite are short: a checkpoint every tenth of training is plenty to continue one
    return run(cfg, out, progress=False, resume="auto", checkpoint_every=max(1, int(cfg.get("epochs", 100)) // 10))


def run_suite(out: str | os.PathLike, *, methods: Sequence[str] | None = None,
              sparsities: Sequence[float] = (0.9, 0.98), seeds: int = 3, base: dict[str, Any] | None = None,
              block: dict[str, Any] | None = None, workers: int | None = None,
              progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Train every method × sparsity × seed (dense once per seed) in ``workers`` processes.

    Finished runs are reused; an interrupted one continues from its checkpoint. Returns the
    summaries and {run: error} for runs that failed (and {method: reason} of skipped methods
    under the key ``"skipped:<method>"``).
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    base = copy.deepcopy(DIGITS_BASE if base is None else base)
    if methods is None:
        methods, skipped = suite_methods(base, block)
    else:
        skipped = {}
    jobs = []
    for seed in range(seeds):
        for method in methods:
            for s in (sparsities if method != "dense" else [0.0]):
                jobs.append((f"{method} s={s:g} seed={seed}", method_config(base, method, s, seed, block)))
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    summaries, failures = [], {f"skipped:{m}": r for m, r in skipped.items()}
    bar = _SuiteProgress(progress, len(jobs))

    def record(name: str, summary: dict[str, Any] | None, error: str | None) -> None:
        if summary is not None:
            summaries.append(summary)
            bar.done(f"{name}: test accuracy {summary['test_accuracy']:.3f} ({summary['train_seconds']:.1f} s)")
        else:
            failures[name] = error or "failed"
            bar.done(f"{name}: FAILED {error}")

    try:
        if workers <= 1:
            for name, cfg in jobs:
                record(name, *_call(_suite_worker, cfg, str(runs_dir)))
        else:
            ctx = multiprocessing.get_context("spawn")
            # one thread per process: the processes, not the threads, share the cores
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool:
                futures = {pool.submit(_call, _suite_worker, cfg, str(runs_dir)): name for name, cfg in jobs}
                for fut in as_completed(futures):
                    record(futures[fut], *fut.result())
    finally:
        bar.close()
    return summaries, failures


def _call(fn, *args) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except Exception as e:  # a failed run is reported, the others go on
        return None, f"{type(e).__name__}: {e}"


class _SuiteProgress:
    """Runs done out of all, with the time left, on a terminal; a log line per run otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.bar = enabled, None
        if not enabled:
            return
        from rich.console import Console
        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )
            self.bar = Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console)
            self.task = self.bar.add_task("runs", total=total, last="")
            self.bar.start()

    def done(self, line: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, last=line)
        elif self.enabled:
            log.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
