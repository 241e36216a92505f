"""``torchrun --nproc_per_node 2 -m fastsparse train``: two ranks (gloo, CPU) share each global
batch, rank 0 writes one run folder, the ranks end with the same model, and the result matches
a single process that takes the whole global batch."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastsparse.experiments.suite import DIGITS_BASE
from fastsparse.experiments.runner import run

CFG = {**copy.deepcopy(DIGITS_BASE), "epochs": 8, "model": {"name": "mlp", "sizes": [64, 128, 10]},
       "data": {"name": "digits", "batch_size": 32}, "device": "cpu",
       "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "distribution": "erk", "update": {"freq": 10, "stop": 0.75}}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(CFG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "fastsparse", "train", str(path), "--out",
                           str(tmp / "runs"), "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_rank_zero_writes_one_complete_run_folder(two_ranks):
    tmp, proc = two_ranks
    (run_dir,) = (tmp / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.9, abs=2e-3)
    # 1347 examples in global batches of 2 × 32: 22 steps per epoch, updates every 10 steps up to 75%
    assert summary["steps"] == 8 * 22
    assert summary["mask_updates"] == len(range(10, int(0.75 * 176), 10))
    assert proc.stdout.count("summary") == 1                     # one rank prints


def test_two_ranks_match_one_process_with_the_global_batch(two_ranks, tmp_path):
    tmp, _ = two_ranks
    (run_dir,) = (tmp / "runs").iterdir()
    two = json.loads((run_dir / "summary.json").read_text())
    one = run({**copy.deepcopy(CFG), "data": {"name": "digits", "batch_size": 64}}, tmp_path, progress=False)
    assert two["test_accuracy"] > 0.85
    assert abs(two["test_accuracy"] - one["test_accuracy"]) < 0.03
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(Path(one["run_dir"]) / "model.pt", weights_only=True)
    # same data in the same global batches: the first masks agree, later ones nearly so
    masks = [k for k in a if k.endswith("_mask")]
    overlap = sum(int((a[k] & b[k]).sum()) for k in masks) / sum(int(a[k].sum()) for k in masks)
    assert overlap > 0.8
