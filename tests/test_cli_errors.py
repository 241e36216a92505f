"""Every error a user can trigger from the command line is one line (what was wrong, what is
allowed) and a non-zero exit, never a traceback (issue 13). A table of bad configs, bad files and
failing environments runs through the CLI in-process; two run as real processes."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fastsparse.experiments.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

GOOD = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 256},
    "model": {"name": "mlp", "sizes": [64, 32, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "epochs": 1,
    "sparsity": {"algorithm": "set", "sparsity": 0.9, "update": {"freq": 2}},
}


def _config(tmp_path: Path, name="cfg.yaml", text: str | None = None, **changes) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / name
    path.write_text(text if text is not None else yaml.safe_dump(cfg))
    return path


def one_line_error(result, code: int, *words: str) -> str:
    """The command failed with ``code``; stderr holds one ``error:`` line with ``words``; no traceback."""
    everything = result.output + (result.stderr or "")
    assert "Traceback" not in everything, everything
    assert result.exit_code == code, (result.exit_code, everything)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


# --- bad configs -------------------------------------------------------------------------------------
CONFIGS = {
    "negative momentum": (dict(optimizer={"name": "sgd", "lr": 0.1, "momentum": -1}),
                          "optimizer: SGD refuses these settings: Invalid momentum value: -1"),
    "adam betas out of range": (dict(optimizer={"name": "adam", "lr": 0.1, "betas": [2, 3]}),
                                "optimizer: Adam refuses these settings: Invalid beta parameter"),
    "negative layer width": (dict(model={"name": "mlp", "sizes": [64, -5, 10]}),
                             "model: sizes must be positive integers, got [64, -5, 10]"),
    "zero layer width": (dict(model={"name": "mlp", "sizes": [64, 0, 10]}), "model: sizes must be positive integers"),
    "negative cnn width": (dict(model={"name": "cnn", "width": -3}), "model: width must be positive integers"),
    "update after the end": (dict(sparsity={"algorithm": "rigl", "sparsity": 0.9, "update": {"freq": 1, "start": 5000}}),
                             "sparsity.update.start: the first mask update would come at step 5000"),
    "reversed update window": (dict(sparsity={"algorithm": "rigl", "update": {"start": 0.8, "stop": 0.2}}),
                               "sparsity.update: the update schedule starts at 0.8 and stops at 0.2"),
    "unknown algorithm": (dict(sparsity={"algorithm": "rigel"}), "sparsity.algorithm"),
    "sparsity one": (dict(sparsity={"algorithm": "set", "sparsity": 1.0}), "sparsity.sparsity"),
    "string batch size": (dict(data={"name": "digits", "batch_size": "big"}), "data.batch_size"),
}


@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_is_one_line(tmp_path, command, case):
    changes, words = CONFIGS[case]
    path = _config(tmp_path, **changes)
    args = [command, path] + (["--out", tmp_path / "runs", "-q"] if command == "train" else [])
    one_line_error(invoke(*args), 2, words)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("text, words", [
    (yaml.safe_dump(GOOD) + "epochs: 3\n", "duplicate key 'epochs' (first given at line"),
    ("", "the file is empty"),
    ("seed: [0\n", "not valid YAML: line"),
    ("- 1\n- 2\n", "the file must hold a mapping"),
])
def test_a_bad_yaml_file_is_one_line(tmp_path, text, words):
    one_line_error(invoke("validate", _config(tmp_path, text=text)), 2, words)


def test_a_missing_config_file_is_one_line(tmp_path):
    one_line_error(invoke("train", tmp_path / "none.yaml"), 2, "no such file")


def test_a_huge_batch_size_is_validated_without_allocating(tmp_path):
    path = _config(tmp_path, data={"name": "digits", "batch_size": 10**12},
                   sparsity={"algorithm": "snip", "sparsity": 0.9})
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert "1 training steps (1 epochs × 1)" in result.stdout


# --- bad files and folders -----------------------------------------------------------------------------
@pytest.fixture
def interrupted(tmp_path):
    """An interrupted run of GOOD (2 epochs, stopped after the first) and its config file."""
    from fastsparse.experiments.runner import RunInterrupted, run

    path = _config(tmp_path, epochs=2)

    def stop(epoch, metrics):
        raise RunInterrupted()

    with pytest.raises(RunInterrupted):
        run(yaml.safe_load(path.read_text()), tmp_path / "runs", progress=False, on_epoch_end=stop)
    (run_dir,) = (tmp_path / "runs").iterdir()
    return path, run_dir


def _resume(path: Path, run_dir: Path):
    return invoke("train", path, "--out", run_dir.parent, "--resume", "-q")


def test_an_empty_checkpoint_is_one_line_not_aborted(interrupted):
    path, run_dir = interrupted
    (run_dir / "checkpoint.pt").write_bytes(b"")
    line = one_line_error(_resume(path, run_dir), 2, "checkpoint.pt is empty (0 bytes)")
    assert "Aborted" not in line


def test_a_truncated_checkpoint_is_one_line(interrupted):
    path, run_dir = interrupted
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    one_line_error(_resume(path, run_dir), 2, "is truncated or not a checkpoint")


def test_a_checkpoint_carrying_code_is_one_line_and_never_runs(interrupted, tmp_path):
    path, run_dir = interrupted
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["epoch"] = Payload()
    torch.save(state, run_dir / "checkpoint.pt")
    one_line_error(_resume(path, run_dir), 2, "holds a pickled", "nothing in it ran")
    assert not marker.exists()


def test_a_checkpoint_of_another_config_is_one_line(interrupted, tmp_path):
    from fastsparse.experiments.runner import RunInterrupted, run

    path, run_dir = interrupted
    other = dict(yaml.safe_load(path.read_text()), seed=1)

    def stop(epoch, metrics):
        raise RunInterrupted()

    with pytest.raises(RunInterrupted):
        run(other, tmp_path / "other", progress=False, on_epoch_end=stop)
    (other_dir,) = (tmp_path / "other").iterdir()
    shutil.copy(other_dir / "checkpoint.pt", run_dir / "checkpoint.pt")
    one_line_error(_resume(path, run_dir), 2, "belongs to a run of another config", "seed: 1 -> 0")


def test_out_naming_an_existing_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    one_line_error(invoke("train", _config(tmp_path), "--out", tmp_path / "afile", "-q"), 2,
                   "is a file, not a folder; pass --out a folder")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_locked_run_folder_is_one_line(interrupted):
    import fcntl

    path, run_dir = interrupted
    fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        one_line_error(_resume(path, run_dir), 2, "is being trained by")
    finally:
        os.close(fd)


def test_resume_without_a_run_is_one_line(tmp_path):
    one_line_error(invoke("train", _config(tmp_path), "--out", tmp_path / "runs", "--resume", "-q"), 2,
                   "nothing to resume")


def _junk(folder: Path) -> Path:
    (folder / "junk.pt").write_bytes(b"\x80\x02junk")
    return folder / "junk.pt"


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing", "no such checkpoint"),
    (_junk, "cannot read"),
    (lambda d: d, "a folder without checkpoint.pt"),
])
def test_export_of_a_bad_source_is_one_line(tmp_path, make, words):
    one_line_error(invoke("export", make(tmp_path), "--out", tmp_path / "m.st"), 2, words)


def test_bench_inference_of_a_crafted_file_is_one_line(tmp_path):
    path = tmp_path / "deep.st"
    head = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(len(head).to_bytes(8, "little") + head)
    one_line_error(invoke("bench-inference", path), 2, "nests 100001 levels deep")
    path.write_bytes(b"not a safetensors file at all")
    one_line_error(invoke("bench-inference", path), 2, "truncated or not a safetensors file")


def test_report_and_convert_errors_are_one_line(tmp_path):
    one_line_error(invoke("report", tmp_path / "none"), 2)
    one_line_error(invoke("convert", "--from", "nowhere", "train.py --epochs 3"), 2)


# --- failing environments -------------------------------------------------------------------------------
@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")])
def test_a_failing_disk_while_checkpointing_is_one_line(tmp_path, monkeypatch, code, text):
    def fsync(fd):   # checkpoints are flushed before the rename: where a full disk shows
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    path = _config(tmp_path)
    result = invoke("train", path, "--out", tmp_path / "runs", "-q")
    one_line_error(result, 1, "cannot write", "checkpoint.pt", text, "--resume")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "run.lock").exists()
    assert not (run_dir / "checkpoint.pt").exists()


def test_disk_full_on_the_metrics_log_is_one_line(tmp_path, monkeypatch):
    import fastsparse.experiments.runner as runner_module

    def append(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.jsonl")

    monkeypatch.setattr(runner_module, "append_metrics", append)
    one_line_error(invoke("train", _config(tmp_path), "--out", tmp_path / "runs", "-q"), 1,
                   "No space left on device: runs/x/metrics.jsonl")


@pytest.mark.parametrize("error, code, words", [
    (ZeroDivisionError("float division by zero"), 1, "internal error: ZeroDivisionError: float division by zero; "
                                                     "please report it"),
    (RuntimeError("a\nmulti-line\nmessage"), 1, "internal error: RuntimeError: a; please report it"),
    (MemoryError(), 1, "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"), 1, "out of memory"),
])
def test_an_unexpected_error_is_one_line_saying_what_happened(tmp_path, monkeypatch, error, code, words):
    import fastsparse.experiments.runner as runner_module

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner_module, "prepare", boom)
    one_line_error(invoke("train", _config(tmp_path), "--out", tmp_path / "runs", "-q"), code, words)


def test_a_rank_disagreement_is_one_line(tmp_path, monkeypatch):
    import fastsparse.experiments.runner as runner_module
    from fastsparse.engine.distributed import MaskDisagreement

    def boom(*args, **kwargs):
        raise MaskDisagreement("at step 10 the ranks hold different masks for ['0.weight']")

    monkeypatch.setattr(runner_module, "prepare", boom)
    one_line_error(invoke("train", _config(tmp_path), "--out", tmp_path / "runs", "-q"), 1, "at step 10 the ranks")


# --- as real processes ------------------------------------------------------------------------------------
def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastsparse", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_a_real_process_prints_one_line_for_a_negative_width(tmp_path):
    path = _config(tmp_path, model={"name": "mlp", "sizes": [64, -5, 10]})
    proc = _cli("train", path, "--out", tmp_path / "runs", "-q", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "sizes must be positive integers, got [64, -5, 10]" in errors[0], proc.stderr


def test_a_real_process_prints_one_line_for_an_empty_checkpoint(interrupted):
    path, run_dir = interrupted
    (run_dir / "checkpoint.pt").write_bytes(b"")
    proc = _cli("train", path, "--out", run_dir.parent, "--resume", "-q", cwd=run_dir.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Aborted" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "checkpoint.pt is empty (0 bytes)" in errors[0], proc.stderr
