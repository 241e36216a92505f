"""The Cerebras sparsity config, key by key (the table in docs/coming-from/cerebras.md), and the
guide's examples as configs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fastsparse as sparse
from fastsparse.experiments.cli import app
from fastsparse.experiments.config import ConfigError, load_config, parse_config, plan_sparsity
from fastsparse.experiments.models import MLP, TransformerEncoder
from fastsparse.core.schedules import Clock, Constant, Cosine, Cyclic, Exponential, Linear, Power, UpdateSchedule
from fastsparse.experiments.runner import prepare, run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("cerebras_*.yaml"))
TINY = ["data={name: synthetic, shape: [1, 8, 8], classes: 10, n_train: 16, n_test: 8, batch_size: 8}", "epochs=2"]


def _problems(raw) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return {p.path: p.message for p in e.value.problems}


def _plan(block, model=None):
    return plan_sparsity({"sparsity": block}, model or MLP([64, 30, 20, 10]))


@pytest.mark.parametrize("algorithm", ["static", "gmp", "set", "rigl"])
def test_algorithm_names(algorithm):
    (alg,) = _plan({"algorithm": algorithm, "sparsity": 0.5, "update": {"freq": 10}}).algorithms
    assert alg.name == algorithm


def test_custom_algorithm_class_validates_by_its_own_arguments():
    @sparse.register(name="my_static_cb")
    class MyStatic(sparse.SparsityAlgorithm):
        def __init__(self, sparsity=0.5, bonus: int = 1, **kwargs):
            super().__init__(sparsity, **kwargs)
            self.bonus = bonus

    (alg,) = _plan({"algorithm": "my_static_cb", "sparsity": 0.5, "bonus": 3}).algorithms
    assert isinstance(alg, MyStatic) and alg.bonus == 3
    assert "bonnus" in str(_problems({"sparsity": {"algorithm": "my_static_cb", "bonnus": 3}}))


def test_type_and_schedule_are_cerebras_spellings_of_algorithm_and_update():
    cfg, _ = parse_config({"sparsity": {"type": "set", "sparsity": 0.5, "schedule": {"freq": 7, "stop": 70}}})
    assert cfg.sparsity.algorithm == "set" and cfg.sparsity.update.freq == 7 and cfg.sparsity.update.stop == 70
    with pytest.raises(ConfigError, match="Cerebras's spelling of 'algorithm'.*keep one"):
        parse_config({"sparsity": {"type": "set", "algorithm": "rigl", "sparsity": 0.5}})


def test_sparsity_number_range_and_clamp():
    assert _plan({"sparsity": 0.3}).target_sparsity() == pytest.approx(0.3, abs=1e-3)
    assert "[0, 1)" in _problems({"sparsity": {"sparsity": 1.0}})["sparsity.sparsity"]


@pytest.mark.parametrize("spec, cls, at_step_10", [
    ({"type": "constant", "value": 0.3}, Constant, 0.3),
    ({"type": "linear", "init": 0.1, "slope": 0.01}, Linear, 0.2),
    ({"type": "exp", "init": 0.5, "gamma": 0.5}, Exponential, 0.5 * 0.5 ** 10),
    ({"type": "power", "init": 0.5, "beta": -1.0}, Power, 0.5 / 11),
    ({"type": "cosine", "init": 0.3, "half_period": 20}, Cosine, 0.15),
    ({"type": "cycling", "low": 0.1, "high": 0.5, "period": 20}, Cyclic, 0.5),
])
def test_dynamic_hyperparameter_types_for_drop_fraction(spec, cls, at_step_10):
    (alg,) = _plan({"algorithm": "rigl", "sparsity": 0.5, "drop_fraction": spec, "update": {"freq": 10}}).algorithms
    assert isinstance(alg.drop_fraction, cls)
    assert alg.drop_fraction(Clock(10, 100)) == pytest.approx(at_step_10)


def test_gmp_sparsity_as_a_schedule():
    (alg,) = _plan({"algorithm": "gmp", "sparsity": {"type": "cubic", "init": 0.0, "final": 0.8, "start": 0,
                                                   "end": 100}, "update": {"freq": 10}}).algorithms
    assert alg.sparsity == 0.8 and alg.initial_sparsity == 0.0


@pytest.mark.parametrize("init_method", ["random", "topk", "from_zeros"])
def test_init_method(init_method):
    model = MLP([64, 30, 20, 10])
    with torch.no_grad():
        model[0].weight[:, :32] = 0.0                # half zeros, for from_zeros
    sparse.from_config(model, None, {"sparsity": 0.5, "init_method": init_method, "param_filter": "0.weight"})
    w, m = model[0].weight, model[0].weight_mask
    assert int(m.sum()) == 960
    if init_method == "topk":
        assert w[m].abs().min() >= w[~m].abs().max()
    if init_method == "from_zeros":
        assert not m[:, :32].any()


def test_param_filter_default_glob_and_list():
    model = TransformerEncoder((1, 8, 8), 10, dim=16, depth=1, heads=2)
    default = {r.name for r in _plan({"sparsity": 0.5}, model).rows if r.algorithm}
    assert "layers.0.attn.q.weight" in default and "embed.weight" not in default and "head.weight" in default
    assert not any("norm" in n or n.endswith("bias") for n in default)
    one = {r.name for r in _plan({"sparsity": 0.5, "param_filter": "*.fc?.weight"}, model).rows if r.algorithm}
    assert one == {"layers.0.fc1.weight", "layers.0.fc2.weight"}
    two = {r.name for r in _plan({"sparsity": 0.5, "param_filter": ["*.q.weight", "head.weight"]}, model).rows
           if r.algorithm}
    assert two == {"layers.0.attn.q.weight", "head.weight"}
    with pytest.raises(ConfigError, match="param_filter"):
        _plan({"sparsity": 0.5, "param_filter": "nothing*"}, model)


def test_list_of_blocks_and_param_filters_overlays():
    plan = plan_sparsity(load_config(ROOT / "examples" / "cerebras_multiple_algorithms.yaml"), MLP([64, 300, 100, 10]))
    rows = {r.name: r for r in plan.rows if r.algorithm}
    assert rows["0.weight"].algorithm == "static" and rows["0.weight"].target_sparsity == pytest.approx(0.3)
    assert rows["2.weight"].algorithm == "set"
    over = _plan({"algorithm": "rigl", "sparsity": 0.5, "update": {"freq": 10},
                  "param_filters": {"0.*": {"sparsity": 0.9}}})
    assert {r.name: round(r.target_sparsity, 2) for r in over.rows if r.algorithm} == \
        {"0.weight": 0.9, "2.weight": 0.5, "4.weight": 0.5}


def test_update_freq_start_stop_and_steps():
    (alg,) = _plan({"algorithm": "set", "sparsity": 0.5, "update": {"freq": 10, "start": 20, "stop": 50}}).algorithms
    assert [t for t in range(1, 80) if alg.is_update(Clock(t, 100))] == [20, 30, 40]
    (alg,) = _plan({"algorithm": "set", "sparsity": 0.5, "update": [5, 9]}).algorithms
    assert alg.update == UpdateSchedule(steps=[5, 9])
    (alg,) = _plan({"algorithm": "set", "sparsity": 0.5, "update": {"freq": 10, "stop": 0.5}}).algorithms
    assert [t for t in range(1, 100) if alg.is_update(Clock(t, 100))] == [10, 20, 30, 40]


def test_drop_fraction_constant_and_range():
    # a number is RigL's cosine decay from it (to 0 at the end of updates); Cerebras's constant
    # number is {type: constant, value: ...}
    (alg,) = _plan({"algorithm": "set", "sparsity": 0.5, "drop_fraction": 0.2, "update": {"freq": 1}}).algorithms
    assert isinstance(alg.drop_fraction, Cosine) and alg.drop_fraction(Clock(0, 10)) == pytest.approx(0.2)
    (alg,) = _plan({"algorithm": "set", "sparsity": 0.5, "drop_fraction": {"type": "constant", "value": 0.2},
                    "update": {"freq": 1}}).algorithms
    assert alg.drop_fraction(Clock(3, 10)) == 0.2
    assert "[0, 1]" in _problems({"sparsity": {"algorithm": "set", "drop_fraction": 1.5}})["sparsity.drop_fraction"]


def test_balance_in_groups_and_balance_out_groups():
    model = TransformerEncoder((1, 8, 8), 10, dim=16, depth=1, heads=4)
    block = {"algorithm": "rigl", "sparsity": 0.5, "update": {"freq": 1},
             "param_filters": {"*attn.[qkv].weight": {"balance_out_groups": 4},
                               "*attn.out.weight": {"balance_in_groups": 4}}}
    sparse.from_config(model, None, block, total_steps=10)
    q, out = model.layers[0].attn.q.weight_mask, model.layers[0].attn.out.weight_mask
    assert q.view(4, 4, 16).sum((1, 2)).tolist() == [32] * 4         # each head's rows: same count
    assert out.view(16, 4, 4).sum((0, 2)).tolist() == [32] * 4       # each head's columns
    assert "does not divide" in str(_problems_plan({**block, "param_filters": {"*q.weight": {"balance_out_groups": 3}}},
                                                   model))


def _problems_plan(block, model):
    with pytest.raises(ConfigError) as e:
        plan_sparsity({"sparsity": block}, model)
    return e.value


def test_add_summaries_logs_which_weights_are_sparsified(caplog):
    with caplog.at_level(logging.INFO, logger="fastsparse.config"):
        _plan({"sparsity": 0.5, "add_summaries": True})
    text = caplog.text
    assert "0.weight (30, 64): static, target density 0.5000" in text and "0.bias (30,): dense" in text


def test_validate_only_and_logging_verbose_are_fastsparse_validate():
    result = CliRunner().invoke(app, ["validate", str(ROOT / "examples" / "cerebras_rigl_cosine.yaml")])
    assert result.exit_code == 0, result.output
    assert "0.weight" in result.output and "rigl" in result.output and "0.bias" in result.output


def test_log_sparsity_callback_is_the_lightning_callbacks_metrics():
    from fastsparse.integrations.lightning import SparseLightningCallback

    model = MLP([64, 30, 10])
    cb = SparseLightningCallback({"algorithm": "static", "sparsity": 0.5})
    cb.sparsifier = sparse.from_config(model, None, cb.config)
    assert cb.metrics() == {"sparsity/target": pytest.approx(0.5), "sparsity/actual": pytest.approx(0.5)}


def test_guide_examples_are_there():
    assert {p.stem for p in EXAMPLES} == {"cerebras_static", "cerebras_gmp", "cerebras_rigl_cosine",
                                          "cerebras_multiple_algorithms", "cerebras_balanced_attention"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_cerebras_example_validates_and_dry_runs(path):
    cfg, notes = parse_config(load_config(path))
    assert notes == []
    exp = prepare(cfg, load_data=False)
    assert exp.sparsifier is not None and 0 < exp.plan.target_sparsity() < 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_cerebras_example_runs_on_tiny_synthetic_data(path, tmp_path):
    faster = {"cerebras_gmp": ["sparsity.update.freq=1"],                       # GMP prunes within 4 steps
              # its listed steps (100 ... 800) all fall after 4 steps: refused as a schedule that never updates
              "cerebras_multiple_algorithms": ["sparsity[1].update.steps=[1, 3]"]}.get(path.stem, [])
    summary = run(load_config(path, TINY + faster), tmp_path, progress=False)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "summary.json").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and 0 < summary["sparsity"] < 1
