"""Empty or reversed update schedules (issue 13): a method that changes masks on its update schedule
must have an update inside training. Where the total is known (the runner), a start after the last
step, every listed step after it, or a window with no step in it is a ConfigError at the key to
change; a freq longer than a short run is a note. Static masks and IMP (its own levels) are left alone."""
from __future__ import annotations

import copy

import pytest
import yaml

from fastsparse.experiments.config import ConfigError, load_config
from fastsparse.experiments.experiment import prepare
from fastsparse.experiments.runner import run

# 1347 digits for training, batches of 27: 50 steps an epoch, 100 steps in all
BASE = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 27},
    "model": {"name": "mlp", "sizes": [64, 32, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "epochs": 2,
}


def cfg(**sparsity):
    return {**copy.deepcopy(BASE), "sparsity": {"algorithm": "rigl", "sparsity": 0.9, **sparsity}}


def refused(config, path, *words):
    with pytest.raises(ConfigError) as info:
        prepare(config, load_data=False)
    problems = {p.path: p.message for p in info.value.problems}
    assert path in problems, problems
    for w in words:
        assert w in problems[path], problems[path]
    return problems[path]


def test_the_runner_knows_the_total():
    assert prepare(cfg(), load_data=False).total_steps == 100


def test_a_start_after_the_last_step_is_refused(tmp_path):
    config = cfg(update={"freq": 10, "start": 5000})
    refused(config, "sparsity.update.start", "step 5000, after the last of the 100 training steps",
            "allowed: a start within training (a step ≤ 100")
    with pytest.raises(ConfigError):
        run(config, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [], "a refused config created a run folder"


def test_the_same_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "sparsity:\n  algorithm: set\n  update: {freq: 10, start: 5000}\n")
    refused(load_config(path), "sparsity.update.start", "after the last of the 100 training steps")


def test_a_reversed_window_from_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "sparsity:\n  algorithm: rigl\n  update: {start: 0.8, stop: 0.2}\n")
    with pytest.raises(ConfigError, match="sparsity.update: the update schedule starts at 0.8 and stops at 0.2"):
        prepare(load_config(path), load_data=False)


@pytest.mark.parametrize("update", [{"freq": 1, "start": 100}, {"freq": 10, "start": 0.99}, {"freq": 1, "start": 0.99},
                                    {"steps": [50, 150]}, {"freq": 10, "start": 60, "stop": 0.9}])
def test_a_schedule_with_one_update_inside_training_passes(update):
    exp = prepare(cfg(update=update), load_data=False)
    assert not any("no mask update" in n for n in exp.notes)


@pytest.mark.parametrize("update, path, words", [
    ({"freq": 1, "start": 101}, "sparsity.update.start", "step 101, after the last of the 100"),
    ({"steps": [150, 200]}, "sparsity.update.steps", "every update step [150, 200] falls after the 100 training steps"),
    ({"freq": 10, "start": 60, "stop": 0.5}, "sparsity.update", "from 60 to 0.5 holds no step"),
    ({"freq": 10, "start": 0.6, "stop": 40}, "sparsity.update", "from 0.6 to 40 holds no step"),
])
def test_neighbours_of_an_empty_schedule_are_refused(update, path, words):
    refused(cfg(update=update), path, words)


def test_a_gradual_method_names_its_own_start():
    config = {**copy.deepcopy(BASE), "sparsity": {"algorithm": "gmp", "sparsity": 0.9, "start": 5000, "end": 6000}}
    refused(config, "sparsity.start", "after the last of the 100 training steps")


def test_a_later_block_is_named_by_its_index():
    config = {**copy.deepcopy(BASE), "sparsity": [
        {"algorithm": "set", "sparsity": 0.9, "param_filter": ["0.weight"], "update": {"freq": 10}},
        {"algorithm": "rigl", "sparsity": 0.9, "param_filter": ["2.weight"], "update": {"freq": 10, "start": 500}}]}
    refused(config, "sparsity[1].update.start", "step 500")


def test_static_masks_are_not_checked():
    prepare({**copy.deepcopy(BASE), "sparsity": {"algorithm": "static", "sparsity": 0.9,
                                                 "update": {"freq": 10, "start": 5000}}}, load_data=False)


def test_a_freq_longer_than_a_short_run_is_a_note():
    exp = prepare(cfg(update={"freq": 500}), load_data=False)
    assert any("sparsity: no mask update falls in the 100 training steps (one every 500 steps" in n for n in exp.notes)
