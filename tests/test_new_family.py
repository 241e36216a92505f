"""A new family of methods, defined only here: one algorithm class and its recipe, registered,
then validated from a config, planned in the dry run, driven from ``from_config`` and trained by
``fastsparse train`` (resumed bit for bit), with no edit to the runner or the config code."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import fastsparse as sparse
from fastsparse.algorithms import base as registry
from fastsparse.core.masks import n_keep
from fastsparse.experiments.config import ConfigError, parse_config
from fastsparse.experiments.experiment import prepare
from fastsparse.experiments.runner import RunInterrupted, run

from helpers import batch, mlp


class CoolDown(sparse.Recipe):
    """Owns the learning rate: the optimizer's own, but ``cool`` times it for the step after each swap."""

    owns_lr = True

    def __init__(self, algorithm, params, engine):
        super().__init__(algorithm, params, engine)
        self.cooled: list[int] = []

    def attached(self):
        self.base = self.engine.learning_rates()

    def learning_rate(self, step):
        cool = self.algorithm.cool if self.cooled and self.cooled[-1] == step else 1.0
        return [lr * cool for lr in self.base]

    def after_update(self, clock):
        self.cooled.append(clock.step)

    def state_dict(self):
        return {"cooled": list(self.cooled)}

    def load_state_dict(self, state):
        self.cooled = list(state["cooled"])


class Swap(sparse.SparsityAlgorithm):
    """Every update, per layer: the ``swap`` smallest active |w| out, as many random inactive ones in."""

    name = "test_swap"
    recipe = CoolDown

    def __init__(self, sparsity: float = 0.8, swap: int = 2, cool: float = 0.5, **kwargs):
        super().__init__(sparsity, **kwargs)
        if isinstance(swap, bool) or not isinstance(swap, int) or swap < 0:
            raise ValueError(f"swap must be an integer ≥ 0, got {swap!r}")
        self.swap, self.cool = swap, float(cool)

    def update_masks(self, params, optimizer, clock, seed):
        out = []
        for sp in params:
            rand = torch.rand(sp.param.shape, generator=sparse.generator_for(seed, clock.step, sp.name))
            out.append(sparse.drop_and_grow(sp.mask, sp.param.detach().abs(), rand, self.swap, self.swap))
        return out


@pytest.fixture
def family():
    sparse.register(Swap)
    try:
        yield Swap
    finally:
        del registry._REGISTRY[Swap.name]


def _config(epochs=4, **block):
    return {"seed": 0, "data": {"name": "digits", "batch_size": 256}, "model": {"name": "mlp", "sizes": [64, 32, 10]},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "epochs": epochs,
            "sparsity": {"algorithm": "test_swap", "sparsity": 0.8, "swap": 3, "update": {"freq": 4}, **block}}


def test_its_keys_are_validated_from_its_constructor(family):
    config, _ = parse_config(_config())
    assert config.sparsity.algorithm == "test_swap"
    with pytest.raises(ConfigError) as info:
        parse_config(_config(swap="three", coool=0.1))
    problems = {p.path: p.message for p in info.value.problems}
    assert "must be an integer" in problems["sparsity.swap"]
    assert "did you mean 'cool'" in problems["sparsity.coool"]
    with pytest.raises(ConfigError, match=r"sparsity.swap: swap must be an integer ≥ 0, got -1"):
        parse_config(_config(swap=-1))


def test_the_dry_run_plans_it(family):
    exp = prepare(_config(), load_data=False)
    rows = [r for r in exp.plan.rows if r.algorithm == "test_swap"]
    assert [r.name for r in rows] == ["0.weight", "2.weight"] and all(r.target_sparsity == 0.8 for r in rows)


def test_from_config_runs_its_recipe(family):
    torch.manual_seed(0)
    model = mlp((8, 32, 24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparse.from_config(model, opt, {"algorithm": "test_swap", "sparsity": 0.8, "swap": 3,
                                             "update": {"freq": 4}, "cool": 0.25}, total_steps=12)
    x, y = batch()
    lrs = []
    for _ in range(12):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        lrs.append(engine.lr_used)
    assert [r["step"] for r in engine.history] == [4, 8, 12]
    assert lrs[4] == pytest.approx(0.025) and lrs[8] == pytest.approx(0.025) and lrs[5] == pytest.approx(0.1)
    for sp in engine.groups[0].params:
        assert int(sp.mask.sum()) == n_keep(sp.mask.numel(), 0.8) and (sp.param[~sp.mask] == 0).all()


def test_the_runner_trains_it_and_resumes_it_bit_for_bit(family, tmp_path):
    summary = run(_config(), tmp_path / "a", progress=False)
    assert summary["mask_updates"] == 4 * 6 // 4 and summary["sparsity"] == pytest.approx(0.8, abs=1e-3)

    def stop(epoch, m):
        if epoch == 2:
            raise RunInterrupted("stop")

    with pytest.raises(RunInterrupted):
        run(_config(), tmp_path / "b", progress=False, on_epoch_end=stop)
    resumed = run(_config(), tmp_path / "b", progress=False, resume=True)
    volatile = {"train_seconds", "run_dir"}
    assert {k: v for k, v in summary.items() if k not in volatile} == \
        {k: v for k, v in resumed.items() if k not in volatile}
    a = torch.load(Path(summary["run_dir"]) / "model.pt", weights_only=True)
    b = torch.load(Path(resumed["run_dir"]) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
