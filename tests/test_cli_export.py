"""`fastsparse export` and `fastsparse bench-inference` on a run the CLI trained."""
from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from fastsparse.experiments.cli import app
from fastsparse.deploy import load_sparse
from fastsparse.core.masks import sparse_params
from fastsparse.experiments.models import MLP

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_rigl.yaml"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _trained_run(tmp_path: Path) -> Path:
    result = invoke("train", EXAMPLE, "--set", "epochs=2", "--out", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if (p / "checkpoint.pt").is_file()]
    return run_dir


def test_export_then_bench_inference(tmp_path):
    run_dir = _trained_run(tmp_path)
    out = tmp_path / "model.safetensors"
    result = invoke("export", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert "dense" in result.output.lower()  # the size is printed against the dense state dict

    # the exported file restores the trained weights and masks bit for bit
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    model = MLP([64, 300, 100, 10])
    load_sparse(out, model)
    for sp in sparse_params(model):
        assert torch.equal(sp.mask, state[sp.mask_name])
        assert torch.equal(sp.param.detach(), state[sp.name])
    # 98% sparse: the file is far smaller than the dense fp32 weights
    dense_bytes = sum(v.numel() * 4 for k, v in state.items() if not k.endswith("_mask"))
    assert out.stat().st_size < 0.2 * dense_bytes

    result = invoke("bench-inference", out, "--batch", "1,4")
    assert result.exit_code == 0, result.output
    assert "dense" in result.output.lower() and "sparse" in result.output.lower()


def test_export_bad_input_exits_2(tmp_path):
    result = invoke("export", tmp_path / "missing", "--out", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "missing" in result.output
    run_dir = _trained_run(tmp_path)
    result = invoke("export", run_dir, "--out", tmp_path / "x.safetensors", "--format", "zip")
    assert result.exit_code == 2 and "auto, bitmask or csr" in result.output
    assert not (tmp_path / "x.safetensors").exists()
    result = invoke("bench-inference", tmp_path / "x.safetensors", "--batch", "0")
    assert result.exit_code == 2 and "--batch" in result.output
