"""Fault injection (issue 13): ``fastsparse train`` killed with SIGKILL at random moments (during
start-up, between steps, right after an epoch's log line, and while a file of the run folder is
being written, checkpoint.pt included), then resumed until it completes, ends bit-identical to an
uninterrupted run: the same summary (timings aside), the same logs, the same weights and masks;
no temporary file or lock is left behind, and after every kill the checkpoint on disk (if any)
passes every check of ``--resume``. Slow: about 30 launches of a real process."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 256},
    "model": {"name": "mlp", "sizes": [64, 32, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "epochs": 6,
    "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "update": {"freq": 2, "stop": 0.75}},
}
MIN_KILLS = 20
VOLATILE = {"train_seconds", "run_dir", "seconds"}


def _launch(config: Path, out: Path) -> subprocess.Popen:
    run_dirs = [d for d in out.iterdir() if d.is_dir()] if out.is_dir() else []
    resume = ["--resume"] if run_dirs else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastsparse", "train", str(config), "--out", str(out), "-q",
                             *resume], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _files(out: Path) -> list[Path]:
    return [p for d in out.iterdir() if d.is_dir() for p in d.iterdir()] if out.is_dir() else []


def _new_tmp(out: Path, since_ns: int, name: str | None = None) -> bool:
    """A temporary file written by the current process (leftovers of earlier kills are older)."""
    for p in _files(out):
        if p.name.endswith(".tmp") and (name is None or p.name == name):
            try:
                if p.stat().st_mtime_ns >= since_ns:
                    return True
            except FileNotFoundError:   # renamed into place meanwhile
                pass
    return False


def _lines(out: Path) -> int:
    logs = [p for p in _files(out) if p.name == "metrics.jsonl"]
    try:
        return len(logs[0].read_bytes().splitlines()) if logs else 0
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, out: Path, trigger: str, rng: random.Random, startup: float,
               since_ns: int) -> bool:
    """Kill ``proc`` when ``trigger`` fires; True if it was killed (not finished first)."""
    deadline = time.monotonic() + 120
    delay = rng.uniform(0.5 * startup, 1.3 * startup)
    started = time.monotonic()
    logged, more = _lines(out), rng.randint(1, 2)
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger == "delay":
            fire = time.monotonic() - started >= delay
        elif trigger == "any_write":
            fire = _new_tmp(out, since_ns)
        elif trigger == "checkpoint_write":
            fire = _new_tmp(out, since_ns, "checkpoint.pt.tmp")
        else:   # after one or two more epochs' log lines (the log is rewritten from the checkpoint first)
            fire = _lines(out) >= logged + more
        if fire:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0002)
    proc.wait(timeout=60)
    return proc.returncode == -signal.SIGKILL


def _comparable(run_dir: Path) -> dict:
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in VOLATILE}
    metrics = [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
               for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "metrics": metrics, "updates": (run_dir / "updates.jsonl").read_text()}


def _same_tensors(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert sa[k].contiguous().view(-1).view(torch.uint8).equal(sb[k].contiguous().view(-1).view(torch.uint8)), k


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    from fastsparse.experiments.checkpoint import ResumeError, read_checkpoint

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    t0 = time.monotonic()
    ref = _launch(config, tmp_path / "reference")
    _, err = ref.communicate(timeout=300)
    startup = time.monotonic() - t0
    assert ref.returncode == 0, err.decode()
    (reference,) = (tmp_path / "reference").iterdir()
    expected = _comparable(reference)

    rng = random.Random(13)
    triggers = ["delay", "any_write", "checkpoint_write", "log_line"]
    out = tmp_path / "killed"
    kills, landed_in_write, completions, launches, epochs_logged = 0, 0, 0, 0, []
    while kills < MIN_KILLS or completions == 0:
        launches += 1
        assert launches < 200, f"{kills} kills in {launches} launches"
        since = time.time_ns()
        proc = _launch(config, out)
        trigger = rng.choice(triggers) if kills < MIN_KILLS else "never"
        killed = _kill_when(proc, out, trigger, rng, startup, since)
        if killed:
            kills += 1
            landed_in_write += _new_tmp(out, since)   # the kill interrupted one of this process's writes
            epochs_logged.append(_lines(out))
            for ckpt in (p for p in _files(out) if p.name == "checkpoint.pt"):
                try:   # a kill never leaves a checkpoint that --resume would refuse
                    read_checkpoint(ckpt)
                except ResumeError as e:
                    pytest.fail(f"after kill {kills} ({trigger}): {e}")
            continue
        stderr = proc.stderr.read().decode()
        assert proc.returncode == 0, f"launch {launches} failed ({trigger}): {stderr}"
        (run_dir,) = out.iterdir()
        assert _comparable(run_dir) == expected, f"launch {launches}: the resumed run differs"
        _same_tensors(reference / "model.pt", run_dir / "model.pt")
        ours, theirs = read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(reference / "checkpoint.pt")
        # every tensor of the last checkpoint (model, optimizer, engine, RNG states) bit for bit
        assert ours["integrity"]["tensors"] == theirs["integrity"]["tensors"]
        assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name == "run.lock"] == []
        completions += 1
        if kills < MIN_KILLS:   # start over, to kill the next runs at other moments
            for p in run_dir.iterdir():
                p.unlink()
            run_dir.rmdir()
    print(f"\n{kills} kills ({landed_in_write} while the killed process was writing a file; epochs in the log at "
          f"each kill: {epochs_logged}) in {launches} launches; {completions} resumed runs completed, each "
          "bit-identical to the uninterrupted run")
    assert kills >= MIN_KILLS and completions >= 1
