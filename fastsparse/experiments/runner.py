"""``fastsparse train``: one plain, readable training loop for every method, driven by phases.

One epoch of a phase::

    for each batch (order from a seeded generator saved in every checkpoint):
        loss = cross_entropy(net(x), y) [+ the phase's extra loss]; loss.backward()
        optimizer.step()      # the engine's hooks: the recipe's learning rate before; masks, updates after
        lr_scheduler.step()   # the phase's learning-rate schedule, per step
    evaluate on the test set; write metrics; checkpoint

Most methods train in one phase; a method whose recipe runs its own loop (a score search, then
fine-tuning) brings its phases (:mod:`fastsparse.recipes.base`), and the loop runs them the same
way. ``--resume`` continues from ``checkpoint.pt`` bit for bit, inside any phase: same batches,
same masks, same weights as a run that was never interrupted. The run folder: :mod:`.rundir`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.flops import forward_flops
from ..core.schedules import Clock
from ..core.sharded import is_sharded
from ..core.sparse_linear import dense_state_dict
from ..recipes.base import PhaseParts, RunContext
from .config import ExperimentConfig, config_hash
from .experiment import Experiment, make_optimizer, prepare, ranks, train_batches
from .metrics import Progress, append_metrics, evaluate, perplexity, summary, write_metrics
from .checkpoint import ResumeError, check_fit, check_identity, check_masks, leftover_files, read_checkpoint, \
    save_checkpoint
from .lock import RunLocked, hold_run_folder
from .rundir import (
    RunFolderError, atomic_save, atomic_write, config_diff, find_changed_run, run_dir_for, saved_config, to_yaml,
)
from .sharded_runs import (
    CHECKPOINT_DIR, counters_of, has_checkpoint, leftover_folders, load_run_checkpoint, read_run_checkpoint, recover,
    save_run_checkpoint,
)

__all__ = ["run", "prepare", "Experiment", "RunInterrupted", "ResumeError", "RunFolderError", "RunLocked",
           "run_dir_for", "evaluate"]

log = logging.getLogger("fastsparse.train")


class RunInterrupted(RuntimeError):
    """Raised from an ``on_epoch_end`` callback to stop a run after its checkpoint (tests, time limits)."""


def run(config: ExperimentConfig | dict, out: str | os.PathLike = "runs", *, resume: bool | str = False,
        progress: bool = True, source: str | None = None, checkpoint_every: int = 1,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the experiment ``config`` into its run folder under ``out``; return ``summary.json``'s content.

    A finished run (its ``summary.json`` exists) is not trained again. ``resume``: continue an
    interrupted run from its last checkpoint; the config must be the one it started with, and the
    checkpoint is verified (:mod:`.checkpoint`) before anything changes. ``resume="auto"``: continue
    if there is a checkpoint, start otherwise. One process at a time trains a run folder
    (:mod:`.lock`). ``checkpoint_every``: epochs between checkpoints (the last epoch always has one;
    results do not depend on it). ``on_epoch_end(epoch, metrics)`` is called after each epoch's logs.
    """
    exp = prepare(config)
    for note in exp.notes:
        log.warning("%s", note)
    out = Path(out)
    run_dir = run_dir_for(exp.resolved, out)
    sharded = _sharded(exp.model)   # parallel: fsdp under torchrun: sharded checkpoints (.sharded_runs)
    ckpt_path = run_dir / (CHECKPOINT_DIR if sharded else "checkpoint.pt")

    def has_ckpt() -> bool:
        return has_checkpoint(run_dir) if sharded else ckpt_path.is_file()
    saved = saved_config(run_dir) if (run_dir / "config.yaml").is_file() else None
    if saved is not None and saved != exp.resolved:
        diff = "; ".join(config_diff(saved, exp.resolved))
        raise ResumeError(f"{run_dir} holds a run of another config ({diff}); "
                          f"start the new config in its own folder (--out {run_dir.parent})")
    if (run_dir / "summary.json").is_file():
        log.info("%s is complete; not training it again", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    if resume is True and not run_dir.is_dir():
        changed = find_changed_run(out, source, exp.resolved)
        if changed is not None:
            raise ResumeError(f"the config changed since {changed[0]} was started, so it cannot be resumed: "
                              + "; ".join(changed[1]) + ". Restore those settings to resume, or train "
                              "without --resume to start a new run")
        raise ResumeError(f"nothing to resume: no run of this config in {out} (expected {run_dir.name}); "
                          f"train without --resume to start it")
    if ranks()[1] > 1:
        import torch.distributed as dist
        dist.barrier()   # every rank has made the checks above before rank 0 writes anything
    with hold_run_folder(run_dir):
        if (run_dir / "summary.json").is_file():   # finished by the process that held the lock before us
            return json.loads((run_dir / "summary.json").read_text())
        if sharded:
            recover(run_dir)
        if resume == "auto":
            resume = has_ckpt()
        if resume and not has_ckpt():
            log.warning("%s has no checkpoint yet; starting it from the beginning", run_dir)
        if not resume and has_ckpt():
            raise ResumeError(f"{run_dir} holds an interrupted run of this config: pass --resume to continue it, "
                              f"or delete the folder to start over")
        if resume:
            exp = _replay_execution(exp, config, run_dir)
        state = None
        if resume and has_ckpt():
            state = read_run_checkpoint(run_dir, exp.resolved) if sharded else _verified_checkpoint(exp, ckpt_path)
            _check_position(exp, state, ckpt_path)
        return _train(exp, run_dir, state, ckpt_path, source, progress, max(1, checkpoint_every), on_epoch_end)


def _open_folder(exp: Experiment, run_dir: Path, source: str | None) -> None:
    """The first writes of a run (after a checkpoint was verified and loaded): leftovers of a killed
    writer removed, the resolved config and where it came from."""
    if ranks()[0] == 0:
        for leftover in leftover_files(run_dir):
            log.warning("removing %s, left by a process killed while writing it", leftover)
            leftover.unlink()
        for folder in leftover_folders(run_dir):
            log.warning("removing %s, left by a process killed while writing it", folder)
            shutil.rmtree(folder)
    atomic_write(run_dir / "config.yaml", to_yaml(exp.resolved))
    if not (run_dir / "run.json").is_file():
        atomic_write(run_dir / "run.json", json.dumps({"source": source, "hash": config_hash(exp.resolved),
                                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    if _saved_execution(run_dir) != {c.name: c.execution for c in getattr(exp.sparsifier, "choices", [])}:
        atomic_write(run_dir / "execution.json", json.dumps(_execution_of(exp), indent=1))


def _verified_checkpoint(exp: Experiment, path: Path) -> dict[str, Any]:
    """The checkpoint, checked for integrity, identity, shape and the masks' invariants (nothing changed yet)."""
    state = read_checkpoint(path)
    check_identity(state, exp.resolved, path)
    check_masks(state, path)
    return state


def _check_position(exp: Experiment, state: dict[str, Any], path: Path) -> None:
    """The checkpoint's phase and epoch lie inside this run."""
    starts = [sum(p.epochs for p in exp.phases[:i]) for i in range(len(exp.phases))]
    phase, epoch = state["phase"], state["epoch"]
    if not 0 <= phase < len(exp.phases) or not starts[phase] <= epoch <= starts[phase] + exp.phases[phase].epochs:
        raise ResumeError(f"{path}: phase {phase}, epoch {epoch} lie outside this run's "
                          f"{len(exp.phases)} phases of {[p.epochs for p in exp.phases]} epochs (corrupt)")


def _execution_of(exp: Experiment) -> dict[str, dict[str, Any]]:
    """How each sparse layer runs and why (``execution.json``, ``summary.json``)."""
    return {c.name: c.as_dict() for c in exp.sparsifier.choices} if exp.sparsifier is not None else {}


def _saved_execution(run_dir: Path) -> dict[str, str]:
    path = run_dir / "execution.json"
    return {name: c["execution"] for name, c in json.loads(path.read_text()).items()} if path.is_file() else {}


def _replay_execution(exp: Experiment, config: Any, run_dir: Path) -> Experiment:
    """A resumed ``execution: auto`` run takes the per-layer choice its start measured, not a new one."""
    saved = _saved_execution(run_dir)
    if exp.sparsifier is None or not saved or saved == {c.name: c.execution for c in exp.sparsifier.choices}:
        return exp
    log.info("resuming with the execution the run started with: %s", saved)
    exp.sparsifier.remove()
    return prepare(config, execution=saved)


def _context(exp: Experiment, run_dir: Path) -> RunContext:
    config = exp.config
    return RunContext(
        model=exp.model, seed=config.seed, epochs=config.epochs, steps_per_epoch=exp.steps_per_epoch,
        make_optimizer=lambda params, lr=None: make_optimizer(config, params, lr),
        lr_schedule=lambda steps: config.lr_schedule.schedule(exp.steps_per_epoch),
        evaluate=lambda model: evaluate(model, exp.data),
        save=lambda name, obj: atomic_save(obj, run_dir / name),
        write_json=lambda name, obj: atomic_write(run_dir / name, json.dumps(obj, indent=1)),
        train_inputs=lambda: (x for x, _ in train_batches(exp.data, config.data.batch_size, exp.device)))


class _Phase:
    """A started phase: its parts, its learning-rate scheduler and where its epochs lie."""

    def __init__(self, exp: Experiment, index: int, parts: PhaseParts, first_epoch: int):
        self.index, self.parts, self.first_epoch = index, parts, first_epoch
        self.phase = exp.phases[index]
        self.last_epoch = first_epoch + self.phase.epochs
        total = self.phase.epochs * exp.steps_per_epoch
        schedule = parts.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            parts.optimizer, lambda step: schedule(Clock(step, total)))

    def state(self) -> dict[str, Any]:
        sp = self.parts.sparsifier
        opt = self.parts.optimizer
        return {"phase": self.index, "optimizer": opt.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sparsifier": sp.state_dict() if sp is not None else None,
                "phase_state": self.parts.state()}

    def load(self, state: dict[str, Any]) -> None:
        self.parts.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.parts.sparsifier is not None:
            self.parts.sparsifier.load_state_dict(state["sparsifier"])


def _train(exp: Experiment, run_dir: Path, state: dict[str, Any] | None, ckpt_path: Path, source: str | None,
           progress: bool, every: int, on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    config, model = exp.config, exp.model
    ctx = _context(exp, run_dir)
    order = torch.Generator().manual_seed(config.seed)
    metrics: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    acc = {"train_seconds": 0.0, "sparse_forward": 0.0, "update_examples": 0}
    index, epoch = 0, 0
    if state is not None:
        index, epoch = state["phase"], state["epoch"]
        metrics, updates, acc = state["metrics"], state["updates"], state["accumulators"]
        order.set_state(state["data_rng"])
    starts = [sum(p.epochs for p in exp.phases[:i]) for i in range(len(exp.phases))]
    if state is not None:
        current = _resume(exp, ctx, state, ckpt_path, starts[index])
        log.info("resuming %s at epoch %d (%s)", run_dir, epoch, current.phase.name)
    else:
        current = _Phase(exp, index, exp.phases[index].start(ctx, None), starts[index])
        epoch = current.first_epoch
    _open_folder(exp, run_dir, source)
    write_metrics(run_dir, metrics, updates + _history(current))
    f_dense = forward_flops(model, exp.cost, sparse=False)
    total_epochs = starts[-1] + exp.phases[-1].epochs
    bar = Progress(progress, total_epochs * exp.steps_per_epoch, total_epochs, epoch, _label_of(exp))
    try:
        while True:
            for e in range(epoch, current.last_epoch):
                n_history = len(_history(current))
                m = _epoch(exp, current, e, order, acc, bar)
                metrics.append(m)
                if (e + 1) % every == 0 or e + 1 == current.last_epoch:
                    _checkpoint(run_dir, exp, current, e + 1, order, metrics, updates, acc)
                append_metrics(run_dir, m, _history(current)[n_history:])
                bar.epoch(m)
                if on_epoch_end is not None:
                    on_epoch_end(e + 1, m)
            metrics += _end_phase(exp, current, run_dir, metrics)
            updates += _history(current)
            if current.index + 1 == len(exp.phases):
                break
            epoch = current.last_epoch
            index = current.index + 1
            current = _Phase(exp, index, exp.phases[index].start(ctx, None), starts[index])
            _checkpoint(run_dir, exp, current, epoch, order, metrics, updates, acc)
    finally:
        bar.close()
    return _finish(exp, current.parts.sparsifier, run_dir, metrics, acc, f_dense)


def _resume(exp: Experiment, ctx: RunContext, state: dict[str, Any], path: Path, first_epoch: int) -> _Phase:
    """The checkpoint's phase, started from its state; the model, optimizer, schedule and engine
    loaded after their fit is checked (a verified checkpoint of this config always fits)."""
    try:
        current = _Phase(exp, state["phase"], exp.phases[state["phase"]].start(ctx, state["phase_state"]), first_epoch)
        if "sharded" in state:   # each rank reads its shards, verified before anything changes
            load_run_checkpoint(state, exp.model, current.parts.optimizer, current.parts.sparsifier, exp.resolved)
            current.scheduler.load_state_dict(state["scheduler"])
        else:
            check_fit(state, exp.model, current.parts.optimizer, path)
            exp.model.load_state_dict(state["model"])
            current.load(state)
        torch.set_rng_state(state["torch_rng"])
    except ResumeError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return current


def _sharded(holder: Any) -> bool:
    """A model (or the optimizer of one) sharded by ``parallel: fsdp``."""
    params = holder.parameters() if isinstance(holder, nn.Module) else \
        (p for g in holder.param_groups for p in g["params"])
    return is_sharded(next(iter(params), None))


def _label_of(exp: Experiment) -> str:
    from .rundir import label
    return label(exp.resolved)


def _history(current: _Phase) -> list[dict[str, Any]]:
    sp = current.parts.sparsifier
    return list(sp.history) if sp is not None else []


def _epoch(exp: Experiment, current: _Phase, epoch: int, order: torch.Generator, acc: dict[str, Any],
           bar: Progress) -> dict[str, Any]:
    """One epoch of the current phase; returns its metrics."""
    config, data, parts = exp.config, exp.data, current.parts
    net_module, opt, sparsifier = parts.net, parts.optimizer, parts.sparsifier
    bs, n = config.data.batch_size, data.n_train
    rank, world = ranks()
    device = exp.device
    net = net_module
    if world > 1 and not _sharded(net_module) and any(p.requires_grad for p in net_module.parameters()):
        from torch.nn.parallel import DistributedDataParallel
        # masks are buffers kept equal by the engine (and checked at every update): not broadcast
        net = DistributedDataParallel(net_module, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    loss_f = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    t0 = time.perf_counter()
    f_start = forward_flops(exp.model, exp.cost)
    net_module.train()
    loss_sum, correct, changed = 0.0, 0, []
    perm = torch.randperm(n, generator=order)
    batches = [perm[i:i + bs * world].tensor_split(world)[rank] for i in range(0, n, bs * world)]
    # image folders crop each image by (seed, epoch, index): the same on a resume, whatever the workers
    for idx, (x, y) in zip(batches, data.train_epoch(batches, device, seed=config.seed, epoch=epoch)):
        n_updates = len(sparsifier.history) if sparsifier is not None else 0
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = loss_f(out, y)
        total = loss + parts.extra_loss() if parts.extra_loss is not None else loss
        total.backward()
        opt.step()
        current.scheduler.step()
        if parts.after_step is not None:
            parts.after_step()
        loss_sum += float(loss.detach()) * y.numel()
        correct += int((out.argmax(1) == y).sum())
        if sparsifier is not None and len(sparsifier.history) > n_updates:
            changed.append(sparsifier.history[-1]["changed_fraction"])
            acc["update_examples"] += len(idx)
        bar.step()
    if world > 1:
        loss_sum, correct = _sum_over_ranks(loss_sum, correct)
    done = epoch + 1 - current.first_epoch
    extra = parts.after_epoch(done) if parts.after_epoch is not None else {}
    test_loss, test_acc = evaluate(net_module, data)
    targets = n * data.targets_per_example   # examples, or the tokens of a language model
    f_end = forward_flops(exp.model, exp.cost)
    acc["sparse_forward"] += 0.5 * (f_start + f_end) * n
    acc["train_seconds"] += time.perf_counter() - t0
    lr = sparsifier.lr_used if sparsifier is not None and sparsifier.lr_used is not None else opt.param_groups[0]["lr"]
    return {
        "epoch": epoch + 1, "phase": current.phase.name, "step": done * exp.steps_per_epoch, "lr": lr,
        "train_loss": loss_sum / targets, "train_accuracy": correct / targets, "test_loss": test_loss,
        "test_accuracy": test_acc,
        "sparsity": sparsifier.sparsity() if sparsifier is not None else 0.0,
        "updates": len(changed), "changed_fraction": sum(changed) / len(changed) if changed else 0.0,
        "itop_rate": sparsifier.exploration_rate() if sparsifier is not None else 1.0,
        "forward_flops": f_end, "seconds": acc["train_seconds"], **(extra or {}),
        **({"test_perplexity": perplexity(test_loss)} if data.sequences else {}),
    }


def _end_phase(exp: Experiment, current: _Phase, run_dir: Path, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The end of a phase: its own end (a search attaches its masks), then the engine's end of
    training (Sup-tickets' superposition), recorded as one more metrics line when it changed the model."""
    parts, lines = current.parts, []
    if parts.end is not None:
        parts.end()
    sp = parts.sparsifier
    if sp is not None and not sp.finished:
        labels = sp.finish()
        if labels:
            test_loss, test_acc = evaluate(exp.model, exp.data)
            m = dict(metrics[-1], phase="+".join(labels), test_loss=test_loss,
                     test_accuracy=test_acc, sparsity=sp.sparsity(), forward_flops=forward_flops(exp.model, exp.cost))
            lines.append(m)
            append_metrics(run_dir, m, [])
            log.info("%s: test accuracy %.4f after %s", "+".join(labels), test_acc, current.phase.name)
    return lines


def _sum_over_ranks(*values: float) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return t.cpu().tolist()


def _checkpoint(run_dir: Path, exp: Experiment, current: _Phase, epoch: int, order: torch.Generator,
                metrics: list[dict[str, Any]], updates: list[dict[str, Any]], acc: dict[str, Any]) -> None:
    """Everything a resumed run needs to continue bit for bit, written atomically (under FSDP
    sharded, by every rank: nothing is gathered)."""
    if _sharded(exp.model):
        counters = counters_of(epoch, current.index, current.scheduler, current.parts.state(), order, metrics,
                               updates, acc, exp.resolved)
        save_run_checkpoint(run_dir, exp.model, current.parts.optimizer, current.parts.sparsifier, exp.resolved,
                            counters)
        return
    state = {"epoch": epoch, "model": exp.model.state_dict(), **current.state(), "data_rng": order.get_state(),
             "torch_rng": torch.get_rng_state(), "metrics": metrics, "updates": updates, "accumulators": acc,
             "config_hash": config_hash(exp.resolved), "config": exp.resolved}
    save_checkpoint(state, run_dir / "checkpoint.pt")


def _finish(exp: Experiment, sparsifier: Any, run_dir: Path, metrics: list[dict[str, Any]], acc: dict[str, Any],
            f_dense: float) -> dict[str, Any]:
    """Final weights, then ``summary.json``: the mark of a complete run. Under FSDP the final
    weights are the last sharded checkpoint (``checkpoint.dcp``, written after the last epoch;
    ``fastsparse export`` reads it in one process): nothing is gathered, no ``model.pt``."""
    result = summary(exp, sparsifier, metrics, acc, f_dense, run_dir)
    if (run_dir / "execution.json").is_file():
        result["execution"] = json.loads((run_dir / "execution.json").read_text())
    if not _sharded(exp.model):
        atomic_save(dense_state_dict(exp.model), run_dir / "model.pt")   # masked form, whatever the execution
    atomic_write(run_dir / "summary.json", json.dumps(result, indent=1))
    log.info("%s: test accuracy %.4f, sparsity %.4f, %.1f s -> %s", result["method"], result["test_accuracy"],
             result["sparsity"], result["train_seconds"], run_dir)
    return result
