"""The compare suite: every method × sparsity × seed on one base experiment, in worker processes
(``fastsparse compare``, ``make demo``), and its spec file."""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from ..algorithms.base import get_algorithm, list_algorithms
from .config import ConfigError, Problem, algorithm_parameters, load_yaml, parse_config, problems_of, suggest
from .config.schema import RESERVED, VOCABULARY, SparsityBlock, known_algorithm
from .config.specs import Spec, check_levels
from .experiment import prepare
from .rundir import atomic_write
from .runner import run

__all__ = ["DIGITS_BASE", "WIDE_SUITE", "BUILTIN_SUITES", "remember_skipped", "SUITE_BLOCK", "SuiteSpec", "load_suite",
           "is_suite", "method_config", "suite_methods",
           "run_suite"]

log = logging.getLogger("fastsparse.train")


DIGITS_BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "sizes": [64, 300, 100, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "lr_schedule": {"name": "cosine"},
    "epochs": 100,
}
SUITE_BLOCK: dict[str, Any] = {"distribution": "erk", "update": {"freq": 50, "stop": 0.75}, "drop_fraction": 0.3}


# sparse execution where it pays: a wide MLP, masked and sparse-executed runs of the same methods
WIDE_SUITE: dict[str, Any] = {
    "base": {**copy.deepcopy(DIGITS_BASE), "model": {"name": "mlp", "sizes": [64, 2048, 2048, 10]}, "epochs": 30},
    "methods": ["dense", "set", "rigl"], "sparsities": [0.98], "seeds": 2, "executions": ["masked", "sparse"],
}
BUILTIN_SUITES: dict[str, dict[str, Any]] = {"digits": {}, "wide": WIDE_SUITE}


def remember_skipped(out: str | os.PathLike, skipped: dict[str, str]) -> dict[str, str]:
    """The methods skipped by every compare into ``out`` so far (``skipped.json``), this one's added."""
    path = Path(out) / "skipped.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(skipped)
    if known:
        atomic_write(path, json.dumps(known, indent=1, sort_keys=True))
    return known


class SuiteSpec(Spec):
    """A comparison: ``base`` experiment (without ``sparsity``), the ``methods`` (``dense`` and
    registered names; default: every one that runs in the standard loop), the ``sparsities``,
    the number of ``seeds``, and the sparsity settings every method shares (``block``; the
    ones a method does not take are left out)."""

    base: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(DIGITS_BASE))
    methods: list[str] | None = None
    sparsities: list[float] = [0.9, 0.98]
    seeds: int = Field(3, ge=1)
    block: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(SUITE_BLOCK))
    # each sparse method runs once per execution (fastsparse.engine.execution); dense once
    executions: list[Literal["masked", "sparse", "auto"]] = ["masked"]

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v):
        for m in v or []:
            if m != "dense":
                known_algorithm(m)
        return v

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, v):
        for s in v:
            check_levels(s, 0.0, 1.0, False, "sparsity")
        return v


def is_suite(raw: Any) -> bool:
    """A compare suite file (``base``/``methods``/``block``/``seeds``), not an experiment."""
    return isinstance(raw, dict) and bool({"methods", "base", "block", "seeds", "sparsities", "executions"} & set(raw)) \
        and not {"model", "data", "sparsity"} & set(raw)


def load_suite(path: str | Path | None = None) -> SuiteSpec:
    """The built-in digits suite (``path`` None), another built-in suite by name (:data:`BUILTIN_SUITES`)
    or a suite file; its base experiment and shared block are validated too, and every problem is
    reported at once."""
    if path is None:
        return SuiteSpec()
    if str(path) in BUILTIN_SUITES and not Path(path).exists():
        return SuiteSpec.model_validate(copy.deepcopy(BUILTIN_SUITES[str(path)]))
    raw = load_yaml(path)
    problems: list[Problem] = []
    spec = None
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        problems += problems_of(e, "", VOCABULARY)
    base, block = raw.get("base"), raw.get("block")
    if isinstance(base, dict):
        try:
            parse_config({k: v for k, v in base.items() if k != "sparsity"})
        except ConfigError as e:
            problems += [Problem(f"base.{p.path}", p.message) for p in e.problems]
    if isinstance(block, dict):
        schema = {k: v for k, v in block.items() if k in SparsityBlock.model_fields}
        try:
            parse_config({"sparsity": {"algorithm": "dst", **schema}})
        except ConfigError as e:
            problems += [Problem(p.path.replace("sparsity", "block", 1), p.message) for p in e.problems]
        known = set(SparsityBlock.model_fields).union(
            *(algorithm_parameters(get_algorithm(n)) for n in list_algorithms()))
        problems += [Problem(f"block.{k}", f"no registered algorithm takes this key{suggest(k, sorted(known))}")
                     for k in block if k not in known or k in RESERVED]
    if problems:
        raise ConfigError(problems, str(path))
    assert spec is not None
    return spec


def method_config(base: dict[str, Any], method: str, sparsity: float, seed: int,
                  block: dict[str, Any] | None = None, execution: str = "masked") -> dict[str, Any]:
    """The experiment of one suite cell: ``base`` with ``method`` at ``sparsity`` (``dense``: no block)
    and ``execution``; settings of ``block`` the method does not take are left out."""
    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    cfg.pop("sparsity", None)
    if method == "dense":
        return cfg
    if execution != "masked":
        cfg["execution"] = execution
    accepted = algorithm_parameters(get_algorithm(method))
    settings = {k: v for k, v in (SUITE_BLOCK if block is None else block).items() if k in accepted}
    cfg["sparsity"] = {"algorithm": method, "sparsity": sparsity, **settings}
    return cfg


def _probe(method: str, base: dict[str, Any], block: dict[str, Any] | None) -> str | None:
    """None if ``method`` builds at 90% sparsity (and, in the standard phase, trains three steps);
    else why not."""
    cls = get_algorithm(method)
    if cls.comparison_note:
        return cls.comparison_note
    cfg = method_config(base, method, 0.9, 0, block)   # the base's epochs: Sup-tickets' cycles must fit them
    try:
        exp = prepare(cfg)
        if exp.sparsifier is not None or exp.plan is None:
            data = exp.data
            assert data is not None
            for _, (x, y) in zip(range(3), data.train_in_order(8, exp.device)):
                exp.optimizer.zero_grad()
                nn.functional.cross_entropy(exp.model(x), y).backward()
                exp.optimizer.step()
    except ConfigError as e:
        return "; ".join(str(p) for p in e.problems)
    except Exception as e:  # any failure means "does not fit this suite"; the reason goes in the report
        return f"{type(e).__name__}: {e}"
    return None


def suite_methods(base: dict[str, Any] = DIGITS_BASE, block: dict[str, Any] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """Every registered algorithm that runs in the standard loop on ``base``'s data, and the skipped ones."""
    order = ["static", "set", "snfs", "rigl"]
    names = [m for m in order if m in list_algorithms()] + [m for m in list_algorithms() if m not in order]
    ok, skipped = ["dense"], {}
    for m in names:
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
              progress: bool = True, executions: Sequence[str] = ("masked",)
              ) -> tuple[list[dict[str, Any]], dict[str, str]]:
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
                for execution in (executions if method != "dense" else ["masked"]):
                    name = f"{method} s={s:g} seed={seed}" + ("" if execution == "masked" else f" {execution}")
                    jobs.append((name, method_config(base, method, s, seed, block, execution)))
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
