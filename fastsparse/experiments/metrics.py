"""What a run records: test evaluation, the metrics files, the progress bar, ``summary.json``."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.flops import forward_flops, training_flops, training_rule
from ..core.masks import select_params
from ..core.sharded import global_count, is_sharded
from ..core.sparse_linear import weight_masks
from .config import config_hash
from .data import Data
from .experiment import ranks
from .rundir import atomic_write, method_label

__all__ = ["evaluate", "perplexity", "masks_of", "Progress", "METRIC_COLUMNS", "write_metrics", "append_metrics", "summary",
           "target_sparsity"]

log = logging.getLogger("fastsparse.train")


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the test set, per target: per example for a classifier,
    per token for a language model (targets (N, T), outputs (N, vocab, T))."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    for x, y in data.test_batches(batch_size, device):
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    model.train()
    return loss / n, correct / n


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy per token), the language-model figure (inf past float range)."""
    return math.exp(loss) if loss < 700 else float("inf")


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return weight_masks(model)


def _density_per_layer(model: nn.Module, exp: Any) -> dict[str, float]:
    masks = masks_of(model)
    if exp.plan is not None:
        names = [r.name for r in exp.plan.rows if r.algorithm is not None]
    else:
        names = [sp.name for sp in select_params(model)]
    return {n: _density(masks[n]) if n in masks else 1.0 for n in names}


def _density(mask: torch.Tensor) -> float:
    return global_count(mask) / mask.numel() if is_sharded(mask) else float(mask.float().mean())


class Progress:
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
                  "sparsity", "updates", "changed_fraction", "itop_rate", "forward_flops", "flagged", "seconds",
                  "test_perplexity")


def _csv_writer(f) -> csv.DictWriter:
    return csv.DictWriter(f, fieldnames=METRIC_COLUMNS, restval="", extrasaction="ignore")


def write_metrics(run_dir: Path, metrics: list[dict[str, Any]], updates: list[dict[str, Any]]) -> None:
    """Rewrite the three logs from the checkpoint's records (at the start and on resume)."""
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    buf = io.StringIO()
    if metrics:
        writer = _csv_writer(buf)
        writer.writeheader()
        writer.writerows(metrics)
    atomic_write(run_dir / "metrics.csv", buf.getvalue())
    atomic_write(run_dir / "updates.jsonl", "".join(json.dumps(u) + "\n" for u in updates))


def append_metrics(run_dir: Path, m: dict[str, Any], new_updates: list[dict[str, Any]]) -> None:
    """Append one epoch to the logs (the checkpoint, written first, holds the same records)."""
    if ranks()[0] != 0:
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


def target_sparsity(sparsifier: Any) -> float:
    """What the algorithms aim at by the end of training, over all their parameters."""
    rows = sparsifier.report()
    total = sum(r["numel"] for r in rows)
    return sum(r["target_sparsity"] * r["numel"] for r in rows) / total if total else 0.0


def summary(exp: Any, sp: Any, metrics: list[dict[str, Any]], acc: dict[str, Any], f_dense: float,
            run_dir: Path) -> dict[str, Any]:
    """``summary.json``: the last epoch's metrics, sparsity reached and aimed at, FLOPs, the run."""
    last = metrics[-1]
    epochs = sum(p.epochs for p in exp.phases)
    examples = exp.n_train * epochs
    rule = training_rule(exp.plan.algorithms if exp.plan is not None else [])
    f_sparse_mean = acc["sparse_forward"] / examples if sp is not None else f_dense
    dense_flops = training_flops("dense", f_dense, f_dense, examples)
    sparse_flops = training_flops(rule, f_dense, f_sparse_mean, examples, acc["update_examples"])
    density = _density_per_layer(exp.model, exp)
    total = sum(m.numel() for m in masks_of(exp.model).values())
    return {
        "method": method_label(exp.resolved),
        "target_sparsity": target_sparsity(sp) if sp is not None else 0.0,
        "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        **({"test_perplexity": last["test_perplexity"]} if "test_perplexity" in last else {}),
        "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "sparsity": sp.sparsity() if sp is not None else 0.0,
        "density_per_layer": density,
        "train_seconds": acc["train_seconds"],
        "dense_equivalent_flops": dense_flops, "sparse_flops": sparse_flops,
        "flops_fraction": sparse_flops / dense_flops if dense_flops else 1.0,
        "flops_rule": rule, "forward_flops_dense": f_dense, "forward_flops_sparse": forward_flops(exp.model, exp.cost),
        "mask_updates": len(sp.history) if sp is not None else 0,
        "itop_rate": last["itop_rate"],
        "sparse_params": total, "active_params": sum(global_count(m) for m in masks_of(exp.model).values()),
        "epochs": epochs, "steps": epochs * exp.steps_per_epoch, "seed": exp.config.seed,
        "run_dir": str(run_dir), "hash": config_hash(exp.resolved), "config": exp.resolved,
    }
