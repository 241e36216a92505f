"""The command line, thin over the library::

    fastsparse train CONFIG [--set key=value ...] [--out DIR] [--resume]
    fastsparse validate CONFIG [--set key=value ...]
    fastsparse compare [SUITE] [--seeds N] [--out DIR] [--workers N]
    fastsparse report RUN_DIR
    fastsparse export RUN_DIR_OR_CHECKPOINT --out FILE [--format auto|bitmask|csr]
    fastsparse bench-inference FILE [--batch 1,16,128]
    fastsparse convert --from suptickets|rare-gems "COMMAND LINE" | FILE.yaml [--out FILE]

Exit status: 0 on success, 2 for a config or input problem (each printed with its path
in the config), 1 when training itself fails, 130 when interrupted. Every error is printed as
one line per problem, never a traceback (:mod:`.cli_errors`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_errors import err_console, fail, one_line_errors
from .config import ConfigError, load_config, parse_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train sparse neural networks: train and validate experiment files, compare methods, "
                       "report on runs.")
out_console = Console(width=None if sys.stdout.isatty() else 120)

_SET_HELP = "Override a setting by its dotted path, e.g. --set sparsity.sparsity=0.9 --set epochs=5 (repeatable)."


def _setup_logging(quiet: bool = False) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("fastsparse")
    logger.handlers[:] = [RichHandler(console=err_console, show_path=False, show_time=False)]
    logger.setLevel(logging.WARNING)        # the engine's own messages: warnings only
    logger.propagate = False
    logging.getLogger("fastsparse.train").setLevel(logging.WARNING if quiet else logging.INFO)


_fail = fail


def _load(config: Path, overrides: list[str]):
    raw = load_config(config, overrides)
    return parse_config(raw, source=str(config))


@app.command()
@one_line_errors
def train(
    config: Path = typer.Argument(..., help="Experiment file (YAML), e.g. examples/digits_rigl.yaml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder for run folders (or one run folder)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of this config."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings only."),
) -> None:
    """Train one experiment into <out>/<algorithm>-<config hash>/ and print its summary.
    Under ``torchrun --nproc_per_node N`` every rank trains its share of each batch (DDP);
    rank 0 writes the run folder."""
    from .rundir import RunFolderBlocked, RunFolderError
    from .runner import run

    distributed = _init_distributed()
    _setup_logging(quiet or distributed and int(os.environ.get("RANK", 0)) != 0)
    try:
        experiment, _ = _load(config, set_ or [])
        summary = run(experiment, out, resume=resume, progress=not quiet and not distributed,
                      source=str(config.resolve()))
    except RunFolderError as e:
        if isinstance(e, RunFolderBlocked):
            raise
        _fail(f"{e}; fix this, then continue with: fastsparse train {config} --out {out} --resume", 1)
    except KeyboardInterrupt:
        err_console.print(escape(f"interrupted; continue with: fastsparse train {config} --out {out} --resume"))
        raise typer.Exit(130)
    if not distributed or int(os.environ.get("RANK", 0)) == 0:
        table = Table(title=f"{summary['method']}: summary", title_justify="left", show_header=False)
        rows = (("test_accuracy", f"{summary['test_accuracy']:.4f}"), ("sparsity", f"{summary['sparsity']:.4f}"),
                ("train_seconds", f"{summary['train_seconds']:.1f}"),
                ("dense_equivalent_flops", f"{summary['dense_equivalent_flops']:.4g}"),
                ("sparse_flops", f"{summary['sparse_flops']:.4g} ({summary['flops_fraction']:.3f} × dense)"))
        if "test_perplexity" in summary:   # a language model
            rows = (("test_perplexity", f"{summary['test_perplexity']:.3f}"),) + rows
        for key, value in rows:
            table.add_row(key, value)
        out_console.print(table)
        out_console.print(escape(f"run folder: {summary['run_dir']}"), soft_wrap=True)
    if distributed:
        _leave_distributed()


def _init_distributed() -> bool:
    """Join the torch.distributed group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _leave_distributed() -> None:
    """Leave the group and exit at once: torch's own teardown after ``destroy_process_group``
    sometimes aborts a worker at exit, which torchrun would report as a failed run."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
@one_line_errors
def validate(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
) -> None:
    """Check a config without training: print each parameter, its algorithm and target density
    (the dry run), or every problem with its path in the config. Needs no data: without the data
    files it checks the config on the data set's shapes, and says so. A compare suite file is
    checked as a suite."""
    from .config import load_yaml
    from .experiment import prepare
    from .suite import is_suite, load_suite

    if not set_ and is_suite(load_yaml(config)):   # a ConfigError is printed by one_line_errors
        spec = load_suite(config)
        methods = ", ".join(spec.methods) if spec.methods else "every registered method that fits"
        out_console.print(f"valid suite: {methods} at sparsities {spec.sparsities}, {spec.seeds} seeds")
        return
    experiment, notes = _load(config, set_ or [])
    exp = prepare(experiment, load_data=False, require_data=False)
    _print_plan(exp, config)
    for note in notes + exp.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _print_plan(exp: Any, config: Path) -> None:
    """The dry run: each parameter, its shape, algorithm, target density, and what stays dense."""
    from ..engine.execution import cpu_kernels
    rows = exp.plan.rows if exp.plan is not None else []
    blocks = {r.block for r in rows if r.algorithm is not None}
    table = Table(title=escape(f"{config}: dry run"), title_justify="left")
    choices = {c.name: c for c in getattr(exp.sparsifier, "choices", [])}
    columns = ("parameter", "shape", "algorithm", "target density", "active / total") + \
        (("execution",) if choices else ()) + ("note",)
    for col in columns:
        table.add_column(col, justify="right" if col in ("target density", "active / total") else "left",
                         no_wrap=col != "note")
    if exp.plan is None:
        for name, p in exp.model.named_parameters():
            table.add_row(escape(name), "×".join(map(str, p.shape)), "dense", "100.00%", f"{p.numel():,} / {p.numel():,}",
                          "no sparsity block")
    for r in rows:
        active = round(r.target_density * r.numel)
        if r.algorithm is None:
            note = f"[dim]{escape(r.note)}[/]"
        else:
            start = f"starts at {100 * (1 - r.start_sparsity):.2f}%" if r.start_sparsity is not None else ""
            source = f"from {r.block}" if len(blocks) > 1 else ""
            note = escape(", ".join(x for x in (source, r.note, start) if x))
        execution = (_execution_cell(choices[r.name]),) if r.name in choices else ("",) if choices else ()
        table.add_row(escape(r.name), "×".join(map(str, r.shape)), r.algorithm or "[dim]dense[/]",
                      f"{100 * r.target_density:.2f}%", f"{active:,} / {r.numel:,}", *execution, note)
    out_console.print(table)
    sparse = [r for r in rows if r.algorithm is not None]
    if sparse:
        total = sum(r.numel for r in sparse)
        out_console.print(f"valid: {len(sparse)} sparse parameters, target sparsity "
                          f"{100 * exp.plan.target_sparsity():.2f}% over {total:,} weights; "
                          f"{exp.total_steps:,} training steps ({exp.config.epochs} epochs × {exp.steps_per_epoch})")
    else:
        out_console.print(f"valid: dense training, {exp.total_steps:,} steps")
    if len(exp.phases) > 1:
        out_console.print("phases: " + ", then ".join(f"{p.name} ({p.epochs} epochs)" for p in exp.phases))
    kernels = cpu_kernels(list(choices.values()), exp.model)
    if kernels is not None:
        out_console.print(f"sparse kernels: {escape(kernels)}", highlight=False)


def _execution_cell(choice: Any) -> str:
    """A dry run's execution column: sparse or masked, and why when it is not what was asked."""
    if choice.reason.startswith("execution:"):
        return choice.execution
    return escape(f"{choice.execution} ({choice.reason})")


@app.command()
@one_line_errors
def compare(
    suite: Optional[Path] = typer.Argument(None, help="Suite file (YAML) or a built-in suite: digits (the "
                                                      "default) or wide (sparse execution on a wide MLP)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per method (default 3, or the suite's)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for the runs and the report."),
    workers: int = typer.Option(0, "--workers", min=0, help="Parallel processes (0: up to 2, one per core)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the epochs of every run."),
) -> None:
    """Train every method of a suite at each sparsity over several seeds, then write report.md and plots."""
    from .suite import load_suite, remember_skipped, run_suite
    from .report import write_report

    _setup_logging()
    spec = load_suite(suite)
    if epochs is not None:
        spec.base["epochs"] = epochs
    try:
        summaries, failures = run_suite(out, methods=spec.methods, sparsities=spec.sparsities,
                                        seeds=seeds or spec.seeds, base=spec.base, block=spec.block,
                                        workers=workers or None, executions=spec.executions)
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to continue (finished runs are kept)")
        raise typer.Exit(130)
    skipped = remember_skipped(out, {k.split(":", 1)[1]: v for k, v in failures.items() if k.startswith("skipped:")})
    failed = {k: v for k, v in failures.items() if not k.startswith("skipped:")}
    for name, error in failed.items():
        err_console.print(f"[red]failed:[/] {escape(name)}: {escape(str(error))}", highlight=False)
    if not summaries:
        _fail("no run finished", 1)
    command = "fastsparse compare" + (f" {suite}" if suite else "") + f" --seeds {seeds or spec.seeds} --out {out}"
    report = write_report(out / "runs", out, skipped=skipped, command=command)
    out_console.print(escape(f"report: {report.resolve()}"))
    if failed:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def report(run_dir: Path = typer.Argument(..., help="A run folder, or a folder of runs (a compare output).")) -> None:
    """Redraw report.md and the plots of the finished runs in RUN_DIR."""
    from .report import write_report

    try:
        path = write_report(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    out_console.print(escape(f"report: {path.resolve()}"))


@app.command()
@one_line_errors
def export(
    source: Path = typer.Argument(
        ..., help="A run folder (its checkpoint.pt, or checkpoint.dcp under FSDP) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", help="The compressed file to write (safetensors)."),
    format: str = typer.Option("auto", "--format", help="auto (smaller of the two per tensor), bitmask or csr."),
) -> None:
    """Write the trained model compressed and print its size against the dense fp32 state dict."""
    from ..deploy import SparseFileError, export_command

    if format not in ("auto", "bitmask", "csr"):
        _fail(f"--format must be auto, bitmask or csr, got {format!r}")
    try:
        text = export_command(str(source), str(out), format=format)
    except (FileNotFoundError, ValueError, SparseFileError) as e:
        _fail(str(e))
    out_console.print(escape(text), highlight=False)


@app.command("bench-inference")
@one_line_errors
def bench_inference(
    file: Path = typer.Argument(..., help="A file written by `fastsparse export`."),
    batch: str = typer.Option("1,16,128", "--batch", help="Comma-separated batch sizes."),
) -> None:
    """Print dense vs sparse (CSR) latency per layer and end to end."""
    from ..deploy import SparseFileError, bench_inference_command

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        _fail(f"--batch must be positive integers separated by commas, got {batch!r}")
    if not file.is_file():
        _fail(f"no such file: {file}")
    try:
        text = bench_inference_command(str(file), batches)
    except (ValueError, SparseFileError) as e:
        _fail(str(e))
    out_console.print(escape(text), highlight=False)


@app.command()
@one_line_errors
def convert(
    source: str = typer.Argument(..., help="Their command line (quoted), or their YAML file (rare-gems)."),
    from_: str = typer.Option(..., "--from", help="The source system: suptickets or rare-gems."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the experiment file here (default: print it)."),
) -> None:
    """Translate a command line or config of another system into our experiment file; notes (run-environment
    options, differences in detail) are written as comments at its top."""
    import yaml

    from .convert import convert_with_notes

    text = source
    if from_.lower().replace("_", "-") == "rare-gems":
        path = Path(source)
        if not path.is_file():
            _fail(f"{source}: no such file (rare-gems converts a YAML config file)")
        text = path.read_text()
    try:
        config, notes = convert_with_notes(from_, text)
        parse_config(config)   # what we write must validate
    except ConfigError as e:
        _fail("the converted config does not validate (a converter defect; please report it): "
              + "; ".join(str(p) for p in e.problems), 1)
    head = f"# converted by: fastsparse convert --from {from_}\n" + "".join(
        f"# note: {line}\n" for note in notes for line in note.splitlines())
    body = head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if out is None:
        out_console.print(body, highlight=False, markup=False, end="")
    else:
        out.write_text(body)
        err_console.print(escape(f"wrote {out}"))


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``fastsparse`` console script."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="fastsparse")


if __name__ == "__main__":
    main()
