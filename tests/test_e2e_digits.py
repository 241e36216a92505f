"""End-to-end accuracy: 98%-sparse MLP 64-300-100-10 on digits (the issue's set-up, tests/digits_run.py).

Measured over seeds 0-9 (torch 2.13 CPU, one thread; test accuracy on the fixed 25% split):

    method          mean    std     min     max
    dense           0.978   0.003   0.973   0.982
    static (ERK)    0.642   0.074   0.560   0.776
    SET             0.920   0.023   0.860   0.940
    SNFS            0.960   0.005   0.953   0.969
    RigL            0.964   0.009   0.949   0.978
    RigL, wrapper   0.955   0.009   0.936   0.964   (seed API loop, step counted from 0)

Every run is deterministic, so a threshold is only ever crossed when a change in the code
draws a new value from these distributions; the single-seed thresholds leave about 3 to 4
standard deviations of room below the mean and still fail the obvious ways of breaking a
method (no effective updates: static level, below 0.78; masks not enforced: the
sparsity assertions; gradient or momentum growth turned random: SET level, mean 0.92).

    single seed (default suite)   static in [0.40, 0.85]   SET >= 0.85   SNFS >= 0.93   RigL >= 0.93
    mean of seeds 0, 1, 2 (slow)  static <= 0.80 and 0.10 below SET and RigL
                                  SET >= 0.90   SNFS >= 0.94   RigL >= 0.95
"""
from __future__ import annotations

import functools
import statistics

import pytest
import torch

import digits_run

SEEDS = (0, 1, 2)
SINGLE_SEED_MIN = {"set": 0.85, "snfs": 0.93, "rigl": 0.93}
MEAN_MIN = {"set": 0.90, "snfs": 0.94, "rigl": 0.95}
STATIC_SINGLE_RANGE = (0.40, 0.85)
STATIC_MEAN_MAX = 0.80
STATIC_GAP = 0.10
N_UPDATES = 32  # every 50 of 2200 steps, before step 1650 (75%): steps 50, 100, ..., 1600


@functools.lru_cache(maxsize=None)
def result(method: str, seed: int, path: str = "engine") -> digits_run.RunResult:
    return digits_run.run(method, seed, path=path)


def check_sparsity(r: digits_run.RunResult) -> None:
    """Exactly the ERK target count of active weights, and exact zeros everywhere else."""
    assert set(r.active) == {"0.weight", "2.weight", "4.weight"}
    assert set(r.targets) == set(r.active)
    if r.method == "snfs":
        # momentum redistribution moves active weights between layers; the total is fixed
        assert sum(r.active.values()) == sum(r.targets.values())
    else:
        assert r.active == r.targets
    assert sum(r.targets.values()) == 1003  # of 50,200 weights: 98.0% sparse
    assert r.outside_mask == 0
    assert all(r.nonzero[k] <= r.active[k] for k in r.active)
    if r.method != "static":
        assert r.updates == N_UPDATES
        assert r.changed > 0


@pytest.mark.parametrize("method", ["set", "snfs", "rigl"])
def test_dynamic_method_single_seed(method):
    r = result(method, 0)
    check_sparsity(r)
    assert r.accuracy >= SINGLE_SEED_MIN[method], f"{method} seed 0: test accuracy {r.accuracy:.4f}"


def test_static_single_seed_is_well_below_dynamic():
    r = result("static", 0)
    check_sparsity(r)
    lo, hi = STATIC_SINGLE_RANGE
    assert lo <= r.accuracy <= hi, f"static seed 0: test accuracy {r.accuracy:.4f}"
    assert r.accuracy <= result("rigl", 0).accuracy - STATIC_GAP


def test_seed_wrapper_loop_rigl_single_seed():
    """The seed's plain-PyTorch usage, verbatim: sparsify_model + the optimizer wrapper."""
    r = result("rigl", 0, "wrapper")
    check_sparsity(r)
    assert r.accuracy >= SINGLE_SEED_MIN["rigl"], f"wrapper RigL seed 0: test accuracy {r.accuracy:.4f}"


@pytest.mark.parametrize("method", ["set", "snfs", "rigl"])
def test_wrapper_counting_steps_from_one_is_the_engine_bit_for_bit(method):
    """The wrapper is a shell over the engine: fed the engine's own clock (steps from 1), it
    trains the very same network, so the engine's accuracy results carry over to it.
    (``SNFS_presets`` keeps the seed's choice of no redistribution; the registered "snfs"
    redistributes by momentum, so the comparison asks the wrapper for the same.)"""
    presets = {"redistribution": "momentum"} if method == "snfs" else None
    engine = digits_run.run(method, 3, epochs=20)
    wrapper = digits_run.run(method, 3, epochs=20, path="wrapper", first_step=1, presets=presets)
    assert engine.updates == wrapper.updates == 6  # steps 50, 100, ..., 300 of 440
    assert engine.changed == wrapper.changed > 0
    assert engine.active == wrapper.active
    assert engine.state.keys() == wrapper.state.keys()
    for k in engine.state:
        assert torch.equal(engine.state[k], wrapper.state[k]), k


def _mean(method: str, path: str = "engine") -> float:
    runs = [result(method, s, path) for s in SEEDS]
    for r in runs:
        check_sparsity(r)
    return statistics.mean(r.accuracy for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["set", "snfs", "rigl"])
def test_dynamic_method_mean_over_seeds(method):
    mean = _mean(method)
    assert mean >= MEAN_MIN[method], f"{method}: mean test accuracy {mean:.4f} over seeds {SEEDS}"


@pytest.mark.slow
def test_static_mean_is_well_below_set_and_rigl():
    static = _mean("static")
    assert static <= STATIC_MEAN_MAX, f"static: mean test accuracy {static:.4f}"
    assert static <= min(_mean("set"), _mean("rigl")) - STATIC_GAP
