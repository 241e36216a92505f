"""The command line: validate (dry run, every problem with its path), train (summary, bad input, a real
kill and --resume), compare on a small suite, report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fastsparse.experiments.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_rigl.yaml"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def example_with(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return write(tmp_path, yaml.safe_dump(cfg))


def test_validate_prints_the_dry_run_table():
    result = invoke("validate", EXAMPLE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("0.weight", "300×64", "rigl", "2.18%", "418 / 19,200", "0.bias", "left dense: 1-D",
                 "target sparsity 98.00%", "2,200 training steps"):
        assert text in out, text


def test_validate_reports_three_errors_with_their_paths(tmp_path):
    bad = write(tmp_path, """
seed: 0
epochs: 10
sparsity:
  - algorithm: rigl
    sparsity: 1.5
    param_filter: ["0.weight"]
  - algorithm: set
    param_filter: ["2.weight"]
    update: {freq: 0}
    drop_fractoin: 0.2
""")
    result = invoke("validate", bad)
    assert result.exit_code == 2
    err = result.stderr
    assert "3 problems" in err
    assert "sparsity[0].sparsity: sparsity must be in [0, 1)" in err
    assert "sparsity[1].update.freq: must be ≥ 1" in err
    assert "sparsity[1].drop_fractoin: unknown key for algorithm 'set' (did you mean 'drop_fraction'?)" in err


@pytest.mark.parametrize("changes, words", [
    ({"epochz": 3}, "epochz: unknown key (did you mean 'epochs'?)"),
    ({"seed": "zero"}, "seed: must be an integer"),
    ({"sparsity__sparsity": 1.0}, "sparsity.sparsity: sparsity must be in [0, 1)"),
    ({"sparsity__update": {"freq": 0}}, "sparsity.update.freq: must be ≥ 1"),
    ({"sparsity__param_filters": {"*attn*": {"drop_fraction": 0.1}}}, 'param_filters["*attn*"]: matches none'),
    ({"model__sizes": [32, 300, 100, 10]}, "sizes[0] is 32, but the data has 64 input features"),
])
def test_bad_input_exits_2_with_a_message_to_act_on(tmp_path, changes, words):
    path = example_with(tmp_path, **changes)
    for command in ("validate", "train"):
        args = [command, path] + (["--out", tmp_path / "runs"] if command == "train" else [])
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert words in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "runs").exists()          # nothing was written that --resume could trust


def test_missing_data_folder_validates_on_shapes_but_does_not_train(tmp_path):
    path = example_with(tmp_path, data={"name": "mnist", "root": "/nonexistent/mnist"},
                        model={"name": "mlp", "sizes": [784, 300, 100, 10]})
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    notes = " ".join(result.stderr.split())
    assert "data.root: MNIST: the folder /nonexistent/mnist" in notes and "the dry run assumes inputs (1, 28, 28)" in notes
    result = invoke("train", path, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and "data.root: MNIST: the folder /nonexistent/mnist" in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists()


def test_balance_groups_that_do_not_divide_the_rows(tmp_path):
    path = write(tmp_path, """
data: {name: synthetic, features: 16, classes: 4}
model: {name: transformer, dim: 16, heads: 4, patch: 4}
sparsity:
  algorithm: rigl
  param_filters:
    "*attn.[qkv].weight": {balance_out_groups: 3}
""")
    result = invoke("validate", path)
    assert result.exit_code == 2
    assert 'param_filters["*attn.[qkv].weight"]: balance_out_groups=3 does not divide the 16 rows' in \
        " ".join(result.stderr.split())


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("sparsity: [unclosed\n", "not valid YAML: line"),
    ("- a\n- b\n", "must hold a mapping"),
    (b"\xff\xfe\x00binary", "cannot read"),
])
def test_unreadable_or_empty_files(tmp_path, content, words):
    path = tmp_path / "cfg.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = invoke("validate", path)
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    result = invoke("train", folder)
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_train_writes_the_run_folder_and_prints_the_summary(tmp_path):
    result = invoke("train", EXAMPLE, "--set", "epochs=3", "--set", "sparsity.update.freq=10", "--out",
                    tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"test_accuracy", "sparsity", "density_per_layer", "train_seconds", "dense_equivalent_flops",
            "sparse_flops", "config"} <= set(summary)
    assert summary["config"]["epochs"] == 3 and summary["config"]["sparsity"]["update"]["freq"] == 10
    assert "test_accuracy" in result.stdout and run_dir.name in result.stdout.replace("\n", "")
    bad = invoke("train", EXAMPLE, "--set", "epochs")
    assert bad.exit_code == 2 and "expected key=value" in bad.stderr


def test_resuming_after_the_config_changed_is_refused(tmp_path):
    cfg = example_with(tmp_path, epochs=4)
    runs = tmp_path / "runs"
    from fastsparse.experiments.config import load_config
    from fastsparse.experiments.runner import RunInterrupted, run

    def stop(epoch, metrics):
        raise RunInterrupted("killed")

    with pytest.raises(RunInterrupted):
        run(load_config(cfg), runs, progress=False, source=str(cfg.resolve()), on_epoch_end=stop)
    changed = yaml.safe_load(cfg.read_text())
    changed["sparsity"]["drop_fraction"] = 0.5
    cfg.write_text(yaml.safe_dump(changed))
    result = invoke("train", cfg, "--out", runs, "--resume", "--quiet")
    assert result.exit_code == 2
    assert "config changed" in result.stderr and "sparsity.drop_fraction: 0.3 -> 0.5" in result.stderr


def _train_process(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastsparse.experiments.cli", "train", str(cfg), "--out", str(out),
                             "--quiet", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killing_a_run_and_resuming_matches_an_uninterrupted_run(tmp_path):
    cfg = example_with(tmp_path, epochs=40, sparsity__update={"freq": 20, "stop": 0.75})
    whole = _train_process(cfg, tmp_path / "a")
    killed = _train_process(cfg, tmp_path / "b")
    deadline = time.time() + 120
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        found = list((tmp_path / "b").glob("*/checkpoint.pt"))
        checkpoint = found[0] if found else None
        time.sleep(0.01)
    assert checkpoint is not None, killed.communicate()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    run_b = checkpoint.parent
    assert not (run_b / "summary.json").exists()
    epochs_done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 40
    resumed = _train_process(cfg, tmp_path / "b", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert whole.wait(timeout=300) == 0, whole.communicate()
    (run_a,) = (tmp_path / "a").iterdir()
    a = json.loads((run_a / "summary.json").read_text())
    b = json.loads((run_b / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_loss", "sparsity", "density_per_layer", "sparse_flops",
                "dense_equivalent_flops", "mask_updates", "itop_rate", "config"):
        assert a[key] == b[key], key
    wa = torch.load(run_a / "model.pt", weights_only=True)
    wb = torch.load(run_b / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compare_on_a_small_suite_and_report(tmp_path):
    suite = write(tmp_path, """
methods: [dense, static, rigl]
sparsities: [0.9]
seeds: 1
base: {data: {name: digits}, model: {name: mlp, sizes: [64, 32, 10]}, epochs: 2}
block: {distribution: erk, update: {freq: 10}, drop_fraction: 0.3}
""", "suite.yaml")
    out = tmp_path / "cmp"
    result = invoke("compare", suite, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "report:" in result.stdout
    text = (out / "report.md").read_text()
    assert "| dense | 0% |" in text and "| static | 90% |" in text and "| rigl | 90% |" in text
    assert "fastsparse compare" in text
    for png in ("accuracy.png", "density.png", "mask_updates.png", "accuracy_vs_flops.png"):
        (out / png).unlink()
    redrawn = invoke("report", out)
    assert redrawn.exit_code == 0 and (out / "accuracy.png").is_file() and (out / "report.md").is_file()
    assert invoke("report", tmp_path / "nothing").exit_code == 2
    bad = write(tmp_path, "methods: [rigll]\n", "bad_suite.yaml")
    result = invoke("compare", bad, "--out", out)
    assert result.exit_code == 2 and "did you mean 'rigl'" in result.stderr
