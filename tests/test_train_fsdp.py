"""``parallel: fsdp`` under torchrun (2 ranks, gloo, CPU): the runner of ``fastsparse train`` on a
``fully_shard``-ed model. The run equals the DDP run bit for bit (same weights, masks and
metrics); a run interrupted after epoch 2 and resumed from its checkpoint ends where the whole
run ends, bit for bit; the 2-rank checkpoint loads in one process, verified, and exports.
In one process the key trains the model whole, with a note. The worker is
tests/fsdp_train_worker.py (one launch, ~17 s)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsparse.experiments.checkpoint import read_checkpoint
from fastsparse.experiments.models import MLP

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(HERE, "fsdp_train_worker.py"), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    errors = [p.read_text() for p in out.glob("rank*.err")]
    assert proc.returncode == 0 and not errors, f"{errors}\n{stderr[-4000:]}"
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1] and seen[0]["interrupted"]
    return {k: Path(v) for k, v in seen[0].items() if k != "interrupted"}


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run_dir: Path, keys=("train_loss", "test_accuracy", "sparsity", "itop_rate", "forward_flops")):
    return [{k: json.loads(line)[k] for k in keys} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_run_equals_the_ddp_run(runs):
    assert _same(_model(runs["whole"]), _model(runs["ddp"]))
    assert _metrics(runs["whole"]) == _metrics(runs["ddp"])
    summary = json.loads((runs["whole"] / "summary.json").read_text())
    assert summary["config"]["parallel"] == "fsdp" and "parallel" not in json.loads(
        (runs["ddp"] / "summary.json").read_text())["config"]   # the default keeps earlier run folders' hashes
    assert summary["mask_updates"] == len(range(10, int(0.75 * 88), 10))   # 22 steps an epoch, 4 epochs
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_resumed_fsdp_run_ends_bit_for_bit_where_the_whole_run_ends(runs):
    assert _same(_model(runs["resumed"]), _model(runs["whole"]))
    assert _metrics(runs["resumed"]) == _metrics(runs["whole"])
    assert (runs["resumed"] / "updates.jsonl").read_text() == (runs["whole"] / "updates.jsonl").read_text()


def test_two_rank_checkpoint_loads_in_one_process_and_exports(runs, tmp_path):
    from fastsparse.deploy import export_command
    from fastsparse.deploy import read_sparse

    state = read_checkpoint(runs["whole"] / "checkpoint.pt")      # verified: checksums, nothing unpickled
    model = MLP((64, 128, 10))
    for name, module in (("0", model[0]), ("2", model[2])):
        module.register_buffer("weight_mask", torch.zeros_like(module.weight, dtype=torch.bool))
    model.load_state_dict(state["model"])
    assert all(int(model.get_buffer(f"{n}.weight_mask").sum()) == state["mask_counts"][f"{n}.weight_mask"]
               for n in ("0", "2"))
    text = export_command(str(runs["whole"]), str(tmp_path / "m.safetensors"))
    assert "2 masked tensors compressed" in text
    back = read_sparse(tmp_path / "m.safetensors").state_dict
    assert _same({k: back[k] for k in state["model"]}, dict(state["model"]))


def test_parallel_fsdp_in_one_process_trains_the_model_whole_and_says_so():
    from fastsparse.experiments.experiment import prepare
    from fsdp_train_worker import CFG

    exp = prepare({**CFG, "epochs": 1})
    assert any("one process trains it whole" in note for note in exp.notes)
    assert not any(hasattr(p, "device_mesh") for p in exp.model.parameters())
