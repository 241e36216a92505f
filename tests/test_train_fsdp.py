"""``parallel: fsdp`` under torchrun (2 ranks, gloo, CPU): the runner of ``fastsparse train`` on a
``fully_shard``-ed model, with sharded checkpoints (``checkpoint.dcp``, nothing gathered). The run
equals the DDP run bit for bit (same weights, masks and metrics); a run interrupted after epoch 2,
left as a process killed between the renames of a checkpoint write leaves it, and resumed ends
where the whole run ends, bit for bit, with the leftovers removed (and a GraNet run resumed after
epoch 1 too); ``fastsparse train --resume``
refuses a corrupted shard and another config's checkpoint in one line, the folder unchanged;
``fastsparse export`` reads the 2-rank run folder in one process. In one process the key trains
the model whole, with a note. The worker is tests/fsdp_train_worker.py (one launch, ~25 s)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastsparse.engine.sharded_checkpoint import read_sharded_model
from helpers import torchrun

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_train")
    code, _, stderr = torchrun(os.path.join(HERE, "fsdp_train_worker.py"), ["--out", str(out)], timeout=240)
    errors = [p.read_text() for p in out.glob("rank*.err")]
    assert code == 0 and not errors, f"{errors}\n{stderr[-4000:]}"
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1] and seen[0]["interrupted"]
    return {k: Path(v) if k in ("whole", "resumed", "ddp", "granet", "granet_resumed") else v
            for k, v in seen[0].items()}


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights and masks: ``model.pt`` of one process or DDP, the last sharded checkpoint
    (read whole, verified) of FSDP."""
    if (run_dir / "checkpoint.dcp").is_dir():
        assert not (run_dir / "model.pt").exists() and not (run_dir / "checkpoint.pt").exists()
        return read_sharded_model(run_dir / "checkpoint.dcp")
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
    assert runs["kept"] and runs["leftovers"] == ["checkpoint.dcp"]   # .old restored as the checkpoint, .tmp removed
    assert _same(_model(runs["resumed"]), _model(runs["whole"]))
    assert _metrics(runs["resumed"]) == _metrics(runs["whole"])
    assert (runs["resumed"] / "updates.jsonl").read_text() == (runs["whole"] / "updates.jsonl").read_text()


def test_resumed_granet_run_under_fsdp_ends_bit_for_bit_where_the_whole_run_ends(runs):
    assert _same(_model(runs["granet_resumed"]), _model(runs["granet"]))
    assert _metrics(runs["granet_resumed"]) == _metrics(runs["granet"])
    updates = (runs["granet"] / "updates.jsonl").read_text()
    assert updates == (runs["granet_resumed"] / "updates.jsonl").read_text() and len(updates.splitlines()) == 7
    assert json.loads((runs["granet"] / "summary.json").read_text())["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_resume_refuses_a_corrupted_shard_and_another_configs_checkpoint_in_one_line(runs):
    for case, words in (("corrupt", ("__1_0.distcp", "does not match its checksum")),
                        ("foreign", ("belongs to a run of another config", "seed: 1 -> 0"))):
        seen = runs[case]
        lines = [x for x in seen["output"].splitlines() if x.strip()]
        assert seen["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), seen["output"]
        assert all(w in lines[0] for w in words), lines[0]
        assert seen["unchanged"]


def test_two_rank_run_folder_exports_in_one_process(runs, tmp_path):
    from typer.testing import CliRunner

    from fastsparse.deploy import read_sparse
    from fastsparse.experiments.cli import app

    state = _model(runs["whole"])
    counts = {k: int(v.sum()) for k, v in state.items() if k.endswith("_mask")}
    assert sorted(counts) == ["0.weight_mask", "2.weight_mask"] and sum(counts.values()) == pytest.approx(
        0.1 * (64 * 128 + 128 * 10), abs=2)
    result = CliRunner().invoke(app, ["export", str(runs["whole"]), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0 and "2 masked tensors compressed" in result.output, result.output
    back = read_sparse(tmp_path / "m.safetensors").state_dict
    assert _same({k: back[k] for k in state}, state)


def test_export_refuses_a_corrupted_shard_in_one_line(runs, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from fastsparse.experiments.cli import app

    copy = tmp_path / "run"
    shutil.copytree(runs["whole"], copy)
    shard = copy / "checkpoint.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x04
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path / "m.safetensors")])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "__0_0.distcp does not match its checksum" in lines[0], \
        result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_parallel_fsdp_in_one_process_trains_the_model_whole_and_says_so():
    from fastsparse.experiments.experiment import prepare
    from fsdp_train_worker import CFG

    exp = prepare({**CFG, "epochs": 1})
    assert any("one process trains it whole" in note for note in exp.notes)
    assert not any(hasattr(p, "device_mesh") for p in exp.model.parameters())
