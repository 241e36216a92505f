"""Sparse execution from a config and the command line: the key, what the run folder records, resume.

Figures: the masked and sparse runs of one config end on the same masks and (float reordering
aside) the same accuracy; an ``auto`` run resumed after its calibration would choose otherwise
replays the choice it started with.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastsparse.experiments.config import ConfigError
from fastsparse.experiments.experiment import prepare
from fastsparse.experiments.runner import RunInterrupted, run

BASE = {"seed": 0, "data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "sizes": [64, 256, 256, 10]},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "epochs": 12,
        "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "distribution": "erk", "update": {"freq": 20, "stop": 0.75}}}


def config(**over):
    return {**BASE, **over}


def test_masked_and_sparse_runs_of_one_config_agree(tmp_path):
    masked = run(config(), tmp_path, progress=False)
    sparse = run(config(execution="sparse"), tmp_path, progress=False)
    assert masked["run_dir"] != sparse["run_dir"]     # the key is part of the run's identity
    assert set(sparse["execution"]) == {"0.weight", "2.weight", "4.weight"}
    assert all(c["execution"] == "sparse" for c in sparse["execution"].values())
    assert "execution" not in masked
    assert sparse["sparsity"] == pytest.approx(masked["sparsity"], abs=1e-12)
    assert sparse["active_params"] == masked["active_params"]
    assert sparse["forward_flops_sparse"] == masked["forward_flops_sparse"]
    assert masked["test_accuracy"] > 0.85
    assert abs(sparse["test_accuracy"] - masked["test_accuracy"]) <= 0.01
    # the final weights are saved in masked form, whatever the execution
    for r in (masked, sparse):
        state = torch.load(f"{r['run_dir']}/model.pt", weights_only=True)
        assert {"0.weight", "0.weight_mask"} <= set(state)
    ms = torch.load(f"{masked['run_dir']}/model.pt", weights_only=True)
    ss = torch.load(f"{sparse['run_dir']}/model.pt", weights_only=True)
    agree = (ms["2.weight_mask"] == ss["2.weight_mask"]).float().mean()
    assert agree > 0.99


def test_execution_sparse_with_a_method_that_cannot_is_refused():
    search = {"algorithm": "edge_popup", "sparsity": 0.8}
    with pytest.raises(ConfigError, match="execution: .*searches scores over the frozen dense weights.*set execution: "
                                          "masked"):
        prepare(config(execution="sparse", sparsity=search), load_data=False)
    auto = prepare(config(execution="auto", sparsity=search), load_data=False)
    assert any("execution: auto" in n and "trains masked" in n for n in auto.notes)
    imp = {"algorithm": "imp", "sparsity": 0.8}
    with pytest.raises(ConfigError, match="execution: execution: sparse, but no sparse parameter can run sparse.*imp's recipe rewinds"):
        prepare(config(execution="sparse", sparsity=imp), load_data=False)
    snfs = {"algorithm": "snfs", "sparsity": 0.9}
    with pytest.raises(ConfigError, match="no sparse parameter can run sparse .*snfs: .*use 'masked'"):
        prepare(config(execution="sparse", sparsity=snfs), load_data=False)


def test_bad_execution_value_is_one_clear_problem():
    with pytest.raises(ConfigError) as e:
        prepare(config(execution="fast"), load_data=False)
    assert "execution" in str(e.value) and "'masked', 'sparse' or 'auto'" in str(e.value)


def test_auto_resume_replays_the_choice_it_started_with(tmp_path, monkeypatch):
    import fastsparse.engine.execution as execution

    faster = {"sparse": True}

    def fake_calibrate(sp, batch_size, reps=5):
        return (2.0, 1.0) if faster["sparse"] else (1.0, 2.0)

    monkeypatch.setattr(execution, "calibrate", fake_calibrate)

    def stop(epoch, metrics):
        if epoch == 3:
            raise RunInterrupted("killed")

    cfg = config(execution="auto", model={"name": "mlp", "sizes": [64, 256, 256, 10]})
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path, progress=False, on_epoch_end=stop)
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    started = json.loads((folder / "execution.json").read_text())
    assert started["2.weight"]["execution"] == "sparse" and "measured 2.00x" in started["2.weight"]["reason"]
    faster["sparse"] = False          # a calibration now would keep every layer masked
    resumed = run(cfg, tmp_path, progress=False, resume=True)
    assert resumed["execution"] == started
    faster["sparse"] = True
    whole = run(cfg, tmp_path / "whole", progress=False)
    assert whole["execution"] == started
    assert (resumed["train_loss"], resumed["test_accuracy"]) == (whole["train_loss"], whole["test_accuracy"])


def test_from_config_runs_the_configs_execution():
    import fastsparse as fs
    from fastsparse.core.nets import MLP
    from fastsparse.core.sparse_linear import SparseLinear

    model = MLP((64, 128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = fs.from_config(model, opt, {"execution": "sparse", "sparsity": {"algorithm": "set", "sparsity": 0.9}},
                            total_steps=100)
    assert {c.execution for c in engine.choices} == {"sparse"}
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 2
    assert all(any(p is m.values for g in opt.param_groups for p in g["params"])
               for m in model.modules() if isinstance(m, SparseLinear))
    with pytest.raises(ConfigError, match="the config says 'sparse' and the caller execution='masked'"):
        fs.from_config(MLP((64, 128, 10)), None, {"execution": "sparse", "sparsity": {"algorithm": "set"}},
                       execution="masked")


def test_a_sparse_executed_gradual_run_resumes_bit_for_bit(tmp_path):
    # GMP shrinks the active counts: the values of a resumed layer take the checkpoint's length
    cfg = config(execution="sparse", epochs=6,
                 sparsity={"algorithm": "gmp", "sparsity": 0.9, "initial_sparsity": 0.5, "freq": 10,
                           "start": 0.1, "end": 0.7})

    def stop(epoch, metrics):
        if epoch == 3:
            raise RunInterrupted("killed")

    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "a", progress=False, on_epoch_end=stop)
    resumed = run(cfg, tmp_path / "a", progress=False, resume=True)
    whole = run(cfg, tmp_path / "b", progress=False)
    assert resumed["sparsity"] == whole["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert (resumed["train_loss"], resumed["test_accuracy"]) == (whole["train_loss"], whole["test_accuracy"])
    a = torch.load(f"{resumed['run_dir']}/model.pt", weights_only=True)
    b = torch.load(f"{whole['run_dir']}/model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_compare_with_executions_reports_each_setup_against_its_own_dense(tmp_path):
    from fastsparse.experiments.report import load_runs, write_report
    from fastsparse.experiments.suite import (
        BUILTIN_SUITES, DIGITS_BASE, load_suite, method_config, remember_skipped, run_suite,
    )

    wide = load_suite("wide")
    assert wide.executions == ["masked", "sparse"] and wide.base["model"]["sizes"] == [64, 2048, 2048, 10]
    assert set(BUILTIN_SUITES) == {"digits", "wide"}
    assert method_config(DIGITS_BASE, "rigl", 0.9, 0, execution="sparse")["execution"] == "sparse"
    assert "execution" not in method_config(DIGITS_BASE, "dense", 0.9, 0, execution="sparse")
    block = {"distribution": "erk", "update": {"freq": 10, "stop": 0.75}, "drop_fraction": 0.3}
    narrow = {**DIGITS_BASE, "epochs": 2}
    broad = {**DIGITS_BASE, "epochs": 2, "model": {"name": "mlp", "sizes": [64, 512, 10]}}
    run_suite(tmp_path, methods=["dense", "set", "rigl"], sparsities=[0.9, 0.98], seeds=1, base=narrow, block=block,
              workers=1, progress=False)   # the larger setup: the report's main table and figures
    summaries, failures = run_suite(tmp_path, methods=["dense", "rigl"], sparsities=[0.9], seeds=1, base=broad,
                                    block=block, workers=1, progress=False, executions=["masked", "sparse"])
    assert failures == {} and sorted(s["method"] for s in summaries) == ["dense", "rigl", "rigl (sparse execution)"]
    assert len(load_runs(tmp_path / "runs")) == 8
    remember_skipped(tmp_path, {"a": "first"})
    text = write_report(tmp_path / "runs", tmp_path, skipped=remember_skipped(tmp_path, {"b": "second"})).read_text()
    main, section = text.split("## digits, MLP 64-512-10, 2 epochs")
    assert "| rigl | 90% |" in main and "sparse execution" not in main
    assert "| rigl (sparse execution) | 90% |" in section and "| dense | 0% |" in section
    assert "`a`: first" in text and "`b`: second" in text
