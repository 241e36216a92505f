"""The run-folder lock (issue 13): two runs into one folder would interleave metrics.jsonl and
checkpoints; the second is refused with one sentence, before it reads or writes anything there.
A lock left by a dead process is taken over with a warning."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fastsparse.experiments.config import parse_config, resolve_config
from fastsparse.experiments.lock import LOCK_NAME, RunLock, RunLocked
from fastsparse.experiments.rundir import RunFolderError, run_dir_for
from fastsparse.experiments.runner import RunInterrupted, run

CFG = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 256},
    "model": {"name": "mlp", "sizes": [64, 32, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "epochs": 2,
    "sparsity": {"algorithm": "set", "sparsity": 0.9, "update": {"freq": 2, "stop": 0.75}},
}


def _run_dir(out: Path) -> Path:
    return run_dir_for(resolve_config(parse_config(CFG)[0]), out)


def _hold(path: Path, pid: int | None = None) -> int:
    """Take the lock as a live fastsparse process does: the file with its pid and host, flock held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid or os.getpid(), "host": socket.gethostname(),
                             "started": "2026-01-01T00:00:00"}).encode())
    return fd


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stop(epoch, metrics):
    raise RunInterrupted()


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_while_the_first_holds_the_lock_is_refused(tmp_path, resume):
    run_dir = _run_dir(tmp_path)
    if resume:   # an interrupted run, being resumed by someone else right now
        with pytest.raises(RunInterrupted):
            run(CFG, tmp_path, progress=False, on_epoch_end=_stop)
    fd = _hold(run_dir / LOCK_NAME)
    try:
        before = _contents(run_dir)
        with pytest.raises(RunLocked) as info:
            run(CFG, tmp_path, progress=False, resume=resume)
        message = str(info.value)
        assert "\n" not in message
        assert f"is being trained by pid {os.getpid()} on {socket.gethostname()}" in message
        assert _contents(run_dir) == before, "the refused run changed the folder"
    finally:
        os.close(fd)


def test_a_run_held_by_another_process_is_refused(tmp_path):
    """The holder is a real other process (flock is per open file, so this is what a second terminal sees)."""
    run_dir = _run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    code = ("import sys, time; from fastsparse.experiments.lock import RunLock; "
            "l = RunLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            run(CFG, tmp_path, progress=False)
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale now, and the next run takes it over
    run(CFG, tmp_path, progress=False)
    assert (run_dir / "summary.json").is_file() and not (run_dir / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = _run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    dead = _dead_pid()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="fastsparse.train"):
        run(CFG, tmp_path, progress=False)
    assert (run_dir / "summary.json").is_file()
    assert not (run_dir / LOCK_NAME).exists(), "the lock outlived the run"
    assert any(f"taking over the lock left by pid {dead}" in r.getMessage() for r in caplog.records)


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    run_dir = _run_dir(tmp_path)
    with pytest.raises(RunInterrupted):
        run(CFG, tmp_path, progress=False, on_epoch_end=_stop)
    assert not (run_dir / LOCK_NAME).exists()
    run(CFG, tmp_path, progress=False, resume=True)     # nobody holds it


def test_the_lock_holds_the_pid_and_host_while_training(tmp_path):
    seen = {}

    def look(epoch, metrics):
        seen.update(json.loads((_run_dir(tmp_path) / LOCK_NAME).read_text()))

    run(CFG, tmp_path, progress=False, on_epoch_end=look)
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()


def test_a_lock_released_between_open_and_flock_is_taken_again(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    again = RunLock(tmp_path)
    again.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()
    again.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_out_naming_a_file_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="afile is a file, not a folder; pass --out a folder"):
        run(CFG, tmp_path / "afile", progress=False)
    assert (tmp_path / "afile").read_text() == "x"
