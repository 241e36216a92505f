"""The training loop and its run folder: accuracy on digits, logs, summary, FLOPs, bit-identical resume,
protection of existing runs, and the compare suite."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from fastsparse.core.schedules import Clock
from fastsparse.experiments.config import ConfigError, load_config, parse_config, resolve_config
from fastsparse.experiments.report import load_runs, summarize, write_report
from fastsparse.experiments.runner import ResumeError, RunInterrupted, run
from fastsparse.experiments.suite import DIGITS_BASE, method_config, run_suite, suite_methods

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_rigl.yaml"
SUMMARY_KEYS = {"test_accuracy", "sparsity", "density_per_layer", "train_seconds", "dense_equivalent_flops",
                "sparse_flops", "config"}


def short(epochs: int = 3, **sparsity) -> dict:
    cfg = load_config(EXAMPLE)
    cfg["epochs"] = epochs
    cfg["sparsity"].update({"update": {"freq": 10, "stop": 0.75}, **sparsity})
    return cfg


def test_rigl_on_digits_reaches_the_cores_accuracy(tmp_path):
    summary = run(load_config(EXAMPLE), tmp_path, progress=False)
    # the core's digits loop, same seed: RigL 98% ERK ≈ 0.95-0.96; static ≈ 0.66, SET ≈ 0.93
    assert summary["test_accuracy"] >= 0.94
    assert summary["sparsity"] == pytest.approx(0.98, abs=1e-3)
    assert summary["mask_updates"] == 32                        # every 50 steps up to 75% of 2200
    assert summary["flops_rule"] == "dense_gradient_at_updates"
    assert 0.02 < summary["sparse_flops"] / summary["dense_equivalent_flops"] < 0.03


def test_a_run_folder_holds_config_logs_checkpoint_weights_and_summary(tmp_path):
    cfg = short(epochs=3)
    summary = run(cfg, tmp_path, progress=False)
    (run_dir,) = tmp_path.iterdir()
    resolved = resolve_config(parse_config(cfg)[0])
    assert run_dir.name == f"rigl-{summary['hash']}"
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == resolved == summary["config"]
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "run.json", "checkpoint.pt", "metrics.jsonl",
                                                   "metrics.csv", "updates.jsonl", "model.pt", "summary.json"}
    assert SUMMARY_KEYS <= set(json.loads((run_dir / "summary.json").read_text()))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "test_accuracy", "sparsity", "lr", "changed_fraction",
            "itop_rate"} <= set(lines[0])
    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("epoch,phase,step,lr,train_loss") and len(csv_rows) == 4
    updates = [json.loads(x) for x in (run_dir / "updates.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [10, 20, 30, 40]           # every 10 steps until 75% of 66
    assert summary["test_accuracy"] == lines[-1]["test_accuracy"]
    assert set(summary["density_per_layer"]) == {"0.weight", "2.weight", "4.weight"}
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert float((state["0.weight"] * ~state["0.weight_mask"]).abs().sum()) == 0.0
    assert lines[-1]["itop_rate"] > lines[0]["itop_rate"] - 1e-9 and summary["itop_rate"] > 1 - 0.98


def test_a_finished_run_is_not_trained_again(tmp_path):
    first = run(short(epochs=2), tmp_path, progress=False)
    stamp = (Path(first["run_dir"]) / "summary.json").stat().st_mtime_ns
    assert run(short(epochs=2), tmp_path, progress=False) == first
    assert (Path(first["run_dir"]) / "summary.json").stat().st_mtime_ns == stamp


def test_dense_and_static_flops(tmp_path):
    dense = run({**copy.deepcopy(DIGITS_BASE), "epochs": 2}, tmp_path, progress=False)
    assert dense["sparsity"] == 0.0 and dense["sparse_flops"] == dense["dense_equivalent_flops"]
    assert Path(dense["run_dir"]).name.startswith("dense-")
    assert set(dense["density_per_layer"].values()) == {1.0}
    cfg = short(epochs=2, algorithm="static")
    cfg["sparsity"].pop("drop_fraction")   # not a key of static: refused, not ignored
    static = run(cfg, tmp_path, progress=False)
    f_s, f_d = static["forward_flops_sparse"], static["forward_flops_dense"]
    assert static["sparse_flops"] / static["dense_equivalent_flops"] == pytest.approx(f_s / f_d)
    assert static["dense_equivalent_flops"] == 3 * f_d * 1347 * 2


def _interrupt_at(epoch: int):
    def stop(e, metrics):
        if e == epoch:
            raise RunInterrupted(f"stopped after epoch {e}")
    return stop


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = short(epochs=5)
    whole = run(cfg, tmp_path / "a", progress=False)
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "b", progress=False, on_epoch_end=_interrupt_at(2))
    (run_b,) = (tmp_path / "b").iterdir()
    assert not (run_b / "summary.json").exists()
    assert len((run_b / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ResumeError, match="pass --resume"):
        run(cfg, tmp_path / "b", progress=False)
    resumed = run(cfg, tmp_path / "b", progress=False, resume=True)
    volatile = {"train_seconds", "run_dir"}
    assert {k: v for k, v in resumed.items() if k not in volatile} == \
           {k: v for k, v in whole.items() if k not in volatile}
    a = torch.load(Path(whole["run_dir"]) / "model.pt", weights_only=True)
    b = torch.load(run_b / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(d):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in
                (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert metrics(whole["run_dir"]) == metrics(run_b)
    assert (Path(whole["run_dir"]) / "updates.jsonl").read_text() == (run_b / "updates.jsonl").read_text()


def test_resuming_a_run_whose_config_changed_is_refused_with_the_difference(tmp_path):
    source = str(EXAMPLE)
    with pytest.raises(RunInterrupted):
        run(short(epochs=4), tmp_path, progress=False, source=source, on_epoch_end=_interrupt_at(1))
    changed = short(epochs=4, drop_fraction=0.5)
    with pytest.raises(ResumeError) as info:
        run(changed, tmp_path, progress=False, source=source, resume=True)
    assert "sparsity.drop_fraction: 0.3 -> 0.5" in str(info.value)
    (run_dir,) = tmp_path.iterdir()
    with pytest.raises(ResumeError, match="another config"):
        run(changed, run_dir, progress=False, resume=True)
    with pytest.raises(ResumeError, match="nothing to resume"):
        run(short(epochs=7), tmp_path / "empty", progress=False, resume=True)
    assert not (tmp_path / "empty").exists()


def test_bad_configs_fail_before_any_folder_is_written(tmp_path):
    bad = short(epochs=2)
    bad["model"]["sizes"] = [32, 300, 100, 10]
    with pytest.raises(ConfigError) as info:
        run(bad, tmp_path, progress=False)
    assert info.value.problems[0].path == "model" and "sizes[0] is 32" in info.value.problems[0].message
    bad = short(epochs=2)
    bad["sparsity"]["param_filters"] = {"*qkv*": {"drop_fraction": 0.1}}
    with pytest.raises(ConfigError, match="matches none"):
        run(bad, tmp_path, progress=False)
    bad = {**short(epochs=2), "data": {"name": "mnist", "root": str(tmp_path / "no_mnist")}}
    bad["model"]["sizes"] = [784, 300, 100, 10]
    with pytest.raises(ConfigError) as info:
        run(bad, tmp_path, progress=False)
    assert info.value.problems[0].path == "data.root" and "does not exist" in info.value.problems[0].message
    assert list(tmp_path.iterdir()) == []


def test_learning_rate_schedules():
    from fastsparse.experiments.config import LRScheduleSpec

    def lr_factor(step, total, steps_per_epoch, spec):
        return spec.schedule(steps_per_epoch)(Clock(step, total))

    cos = LRScheduleSpec(name="cosine")
    assert lr_factor(0, 100, 10, cos) == 1.0 and lr_factor(50, 100, 10, cos) == pytest.approx(0.5)
    warm = LRScheduleSpec(name="cosine", warmup_epochs=1)
    assert lr_factor(4, 100, 10, warm) == pytest.approx(0.5) and lr_factor(10, 100, 10, warm) == 1.0
    step = LRScheduleSpec(name="step", milestones=[2, 5], gamma=0.1)
    assert [lr_factor(s, 100, 10, step) for s in (19, 20, 50)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_factor(99, 100, 10, LRScheduleSpec(name="constant")) == 1.0


def test_other_models_and_data_train_through_the_same_loop(tmp_path):
    cfg = {"data": {"name": "synthetic", "features": 16, "classes": 3, "n_train": 256, "n_test": 128,
                    "batch_size": 32},
           "model": {"name": "transformer", "dim": 16, "depth": 1, "heads": 4, "patch": 4}, "epochs": 2,
           "optimizer": {"name": "adam", "lr": 0.003},
           "sparsity": {"algorithm": "rigl", "sparsity": 0.8, "update": {"freq": 4},
                        "param_filters": {"*attn.[qkv].weight": {"balance_out_groups": 4}}}}
    summary = run(cfg, tmp_path, progress=False)
    assert summary["sparsity"] == pytest.approx(0.8, abs=0.01) and summary["mask_updates"] > 0
    cnn = {"model": {"name": "cnn"}, "epochs": 1, "sparsity": {"algorithm": "set", "sparsity": 0.9}}
    assert run(cnn, tmp_path, progress=False)["sparsity"] == pytest.approx(0.9, abs=0.01)


# --- the compare suite ------------------------------------------------------------------------------
def test_method_configs_keep_only_the_settings_a_method_takes():
    cfg = method_config(DIGITS_BASE, "static", 0.9, 2)
    assert cfg["seed"] == 2 and cfg["sparsity"] == {"algorithm": "static", "sparsity": 0.9, "distribution": "erk",
                                                    "update": {"freq": 50, "stop": 0.75}}
    assert method_config(DIGITS_BASE, "rigl", 0.98, 0)["sparsity"]["drop_fraction"] == 0.3
    assert "sparsity" not in method_config(DIGITS_BASE, "dense", 0.9, 0)


def test_the_suite_takes_every_method_that_runs_in_the_standard_loop():
    import fastsparse as sparse

    methods, skipped = suite_methods()
    assert methods[:5] == ["dense", "static", "set", "snfs", "rigl"]
    assert set(methods[1:]) | set(skipped) == set(sparse.list_algorithms())
    assert "dst" in skipped and all(skipped.values())
    # the methods that add to the loop run through their drivers in ``fastsparse train``
    assert {"gem", "edge_popup", "suptickets"} <= set(methods)


def test_compare_runs_in_two_processes_and_reports(tmp_path):
    base = {**copy.deepcopy(DIGITS_BASE), "epochs": 2}
    block = {"distribution": "erk", "update": {"freq": 10, "stop": 0.75}, "drop_fraction": 0.3}
    summaries, failures = run_suite(tmp_path, methods=["dense", "rigl"], sparsities=[0.9, 0.98],
                                    seeds=1, base=base, block=block, workers=2, progress=False)
    assert failures == {} and len(summaries) == 3
    rows = summarize(load_runs(tmp_path / "runs"))
    assert [(r["method"], r["level"], r["runs"]) for r in rows] == [("dense", 0.0, 1), ("rigl", 0.9, 1),
                                                                    ("rigl", 0.98, 1)]
    assert rows[0]["flops"] == 1.0 and rows[2]["flops"] < rows[1]["flops"] < 0.2
    report = write_report(tmp_path / "runs", tmp_path, skipped={"x": "why"})
    text = report.read_text()
    assert "| rigl | 98% |" in text and "`x`: why" in text
    for png in ("accuracy.png", "density.png", "mask_updates.png", "accuracy_vs_flops.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    again, _ = run_suite(tmp_path, methods=["dense"], seeds=1, base=base, workers=1, progress=False)
    assert again[0]["run_dir"] == next(s["run_dir"] for s in summaries if s["method"] == "dense")


def test_sparser_checkpoints_resume_to_the_same_result(tmp_path):
    cfg = short(epochs=5)
    whole = run(cfg, tmp_path / "a", progress=False)
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "b", progress=False, checkpoint_every=2, on_epoch_end=_interrupt_at(3))
    (run_b,) = (tmp_path / "b").iterdir()
    assert torch.load(run_b / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert len((run_b / "metrics.jsonl").read_text().splitlines()) == 3        # epoch 3 logged, not checkpointed
    resumed = run(cfg, tmp_path / "b", progress=False, resume=True, checkpoint_every=2)
    assert resumed["test_accuracy"] == whole["test_accuracy"] and resumed["itop_rate"] == whole["itop_rate"]
    assert [json.loads(x)["epoch"] for x in (run_b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("name, shape, classes", [("cifar10_resnet20", [3, 32, 32], 10),
                                                   ("mnist_lenet300", [1, 28, 28], 10),
                                                   ("transformer_balanced", [1, 8, 8], 10),
                                                   ("digits_blocks", [1, 8, 8], 10)])
def test_the_other_examples_run_a_few_steps_on_tiny_data_of_their_shape(name, shape, classes, tmp_path):
    # the systems' examples have their own run tests (tests/test_coming_from_*.py, test_convert_suptickets.py)
    path = EXAMPLE.parent / f"{name}.yaml"
    tiny = load_config(path, [f"data={{name: synthetic, shape: {shape}, classes: {classes}, n_train: 16, "
                              "n_test: 8, batch_size: 8}", "epochs=1"])
    summary = run(tiny, tmp_path, progress=False)
    assert summary["steps"] == 2 and 0 < summary["active_params"] < summary["sparse_params"]
    assert summary["config"]["model"]["name"] == load_config(path)["model"]["name"]
