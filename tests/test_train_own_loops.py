"""``fastsparse train`` for the methods that add to the loop: Sup-tickets (cyclic learning rate,
a ticket per cycle, superposition) and score search (gem, edge_popup: search, then fine-tuning),
from a config and from the command line, with resume and the budget checks."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fastsparse.algorithms.gems import hc_iter_keep_counts
from fastsparse.core.schedules import Clock, Cyclic


def cyclic_lr(t, lr_1, lr_2, period=12000):   # t = k / 12 lands on a whole step
    return Cyclic(lr_1, lr_2, period)(Clock(round(t * period)))
from fastsparse.experiments.cli import app
from fastsparse.experiments.config import ConfigError
from fastsparse.experiments.suite import DIGITS_BASE
from fastsparse.experiments.runner import RunInterrupted, prepare, run

# digits with a small MLP and large batches: 6 steps per epoch
BASE = {**copy.deepcopy(DIGITS_BASE), "model": {"name": "mlp", "sizes": [64, 64, 10]},
        "data": {"name": "digits", "batch_size": 256}}
SPE = 6


def config(epochs: int, **block) -> dict:
    return {**copy.deepcopy(BASE), "epochs": epochs, "sparsity": block}


def sup(epochs: int = 10, **kw) -> dict:
    block = {"algorithm": "suptickets", "sparsity": 0.9, "distribution": "erk", "cycle": 2, "cycle_rate": 0.4,
             "lr_1": 0.01, "lr_2": 0.05, **kw}
    return config(epochs, **block)


def metrics(summary: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def _interrupt_at(epoch: int):
    def stop(e, m):
        if e == epoch:
            raise RunInterrupted(f"stopped after epoch {e}")
    return stop


def _same_run(a: dict, b_dir: Path, b: dict) -> None:
    volatile = {"train_seconds", "run_dir"}
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    ma = torch.load(Path(a["run_dir"]) / "model.pt", weights_only=True)
    mb = torch.load(b_dir / "model.pt", weights_only=True)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


# --- Sup-tickets ---------------------------------------------------------------------------------
def test_suptickets_config_runs_the_cycles_saves_tickets_and_superposes(tmp_path):
    summary = run(sup(), tmp_path, progress=False)
    m = metrics(summary)
    # budget: ⌊10 · 0.4⌋ = 4 cyclic epochs = 2 cycles of 2 epochs after 6 epochs of RigL
    assert [x["phase"] for x in m] == ["train"] * 10 + ["superposed"]
    # the learning rate of the last step of each epoch is the triangle's value there
    for epoch in range(7, 11):
        t = ((epoch - 6) * SPE - 1) % (2 * SPE) / (2 * SPE)
        assert m[epoch - 1]["lr"] == pytest.approx(cyclic_lr(t, 0.01, 0.05))
    assert m[5]["lr"] != pytest.approx(cyclic_lr(0.0, 0.01, 0.05))      # the base phase: the config's cosine
    # the superposed model is pruned back to exactly the target count
    assert summary["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert summary["test_accuracy"] == m[-1]["test_accuracy"]
    state = torch.load(Path(summary["run_dir"]) / "checkpoint.pt", weights_only=True)
    tickets = state["sparsifier"]["recipes"][0]["tickets"]
    assert [t[3] for t in tickets] == [True, False, False]   # the base model, then a ticket per cycle
    t1, t2 = (t[2] for t in tickets[1:])
    assert any(not torch.equal(t1[k], t2[k]) for k in t1)              # re-exploration: each ticket its own mask
    model = torch.load(Path(summary["run_dir"]) / "model.pt", weights_only=True)
    for name, mask in model.items():
        if name.endswith("_mask"):
            assert not model[name[:-5]][~mask].any()                   # exact zeros outside the final mask


def test_suptickets_run_resumes_mid_cycle_bit_for_bit(tmp_path):
    cfg = sup()
    whole = run(cfg, tmp_path / "a", progress=False)
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "b", progress=False, on_epoch_end=_interrupt_at(9))   # inside the second cycle
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = run(cfg, tmp_path / "b", progress=False, resume=True)
    _same_run(whole, run_b, resumed)


def test_suptickets_cycle_longer_than_the_budget_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sparsity.cycle: a cycle of 5 epochs is longer"):
        prepare(sup(cycle=5), load_data=False)


def test_suptickets_from_the_command_line(tmp_path):
    path = tmp_path / "sup.yaml"
    path.write_text(yaml.safe_dump(sup(epochs=5, cycle_rate=0.4)))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["phase"] == "superposed" and json.loads((run_dir / "summary.json").read_text())["method"] == \
        "suptickets"


# --- score search ----------------------------------------------------------------------------------
def gem(epochs: int = 7, **kw) -> dict:
    block = {"algorithm": "gem", "sparsity": 0.9, "iter_period": 2, "fine_tune_epochs": 3, "fine_tune_lr": 0.05,
             **kw}
    return config(epochs, **block)


def test_gem_config_searches_then_fine_tunes_under_the_found_mask(tmp_path):
    summary = run(gem(), tmp_path, progress=False)
    m = metrics(summary)
    assert [x["phase"] for x in m] == ["search"] * 7 + ["fine_tune"] * 3
    assert [x["epoch"] for x in m] == list(range(1, 11))
    numel = 64 * 64 + 64 * 10
    counts = hc_iter_keep_counts(numel, 0.9, 7, 2)                     # 3 rounds land on the target
    assert [x["flagged"] for x in m if x["epoch"] in (2, 4, 6)] == counts
    assert summary["active_params"] == counts[-1] == round(0.1 * numel)
    assert m[7]["lr"] == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 3)).item()))
    model = torch.load(Path(summary["run_dir"]) / "model.pt", weights_only=True)
    masks = {k[:-5]: v for k, v in model.items() if k.endswith("_mask")}
    assert sum(int(v.sum()) for v in masks.values()) == counts[-1]
    assert all(not model[k][~v].any() for k, v in masks.items())


def test_gem_fine_tuning_trains_the_weights_under_the_found_mask(tmp_path):
    # a short search of a small net leaves a weak ticket (≈ 0.17); fine-tuning it gives ≈ 0.68
    summary = run(gem(epochs=9, fine_tune_epochs=15, fine_tune_lr=0.3), tmp_path, progress=False)
    m = metrics(summary)
    assert summary["test_accuracy"] > 0.5 and summary["test_accuracy"] > m[8]["test_accuracy"] + 0.3
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("stop", [3, 7, 8])   # inside the search, at its end, inside fine-tuning
def test_gem_run_resumes_in_either_phase_bit_for_bit(tmp_path, stop):
    cfg = gem()
    whole = run(cfg, tmp_path / "a", progress=False)
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "b", progress=False, on_epoch_end=_interrupt_at(stop))
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = run(cfg, tmp_path / "b", progress=False, resume=True)
    _same_run(whole, run_b, resumed)


def test_edge_popup_config_keeps_the_per_layer_counts(tmp_path):
    summary = run(config(3, algorithm="edge_popup", sparsity=0.8, fine_tune_epochs=1), tmp_path, progress=False)
    assert summary["density_per_layer"] == pytest.approx({"0.weight": 0.2, "2.weight": 0.2}, abs=2e-3)
    assert [x["phase"] for x in metrics(summary)] == ["search"] * 3 + ["fine_tune"]


def test_gem_target_out_of_reach_and_sharing_the_model_are_config_errors():
    with pytest.raises(ConfigError, match=r"sparsity.iter_period: GEM-MINER cannot reach"):
        prepare(gem(epochs=2), load_data=False)
    cfg = config(5)
    cfg["sparsity"] = [{"algorithm": "gem", "sparsity": 0.9, "param_filter": "0.weight"},
                       {"algorithm": "static", "sparsity": 0.5, "param_filter": "2.weight"}]
    with pytest.raises(ConfigError, match="cannot share the model"):
        prepare(cfg, load_data=False)
    with pytest.raises(ConfigError, match="fine_tune_lr_policy"):
        prepare(gem(fine_tune_lr_policy="linear"), load_data=False)


def test_the_config_blocks_of_the_tickets_doc_validate_and_plan():
    import re

    from fastsparse.experiments.config import parse_config

    text = (Path(__file__).resolve().parents[1] / "docs" / "tickets.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        cfg, _ = parse_config({**copy.deepcopy(BASE), **yaml.safe_load(block)})
        exp = prepare(cfg, load_data=False)
        assert exp.plan is not None and exp.plan.rows
