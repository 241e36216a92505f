"""Rank agreement under torch.distributed: two processes (torchrun, gloo, CPU) training with DDP.

Invariant 5: after every update every rank holds identical masks (RigL's gradient growth
sees the all-reduced gradient, SET's random growth draws from generators seeded the same
on every rank), so the replicas end with identical masks and weights; and when the ranks
do disagree, the engine raises ``fastsparse.MaskDisagreement`` on every rank.

The worker is tests/dist_worker.py; each scenario is one launch (~10 s on 2 CPU cores).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import rank_results

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
LAUNCH_TIMEOUT = 120


def _launch(scenario: str, out_dir) -> list[dict]:
    return rank_results(WORKER, ["--scenario", scenario, "--out", str(out_dir)], out_dir, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def agree_results(tmp_path_factory):
    return _launch("agree", tmp_path_factory.mktemp("dist_agree"))


@pytest.fixture(scope="module")
def diverge_results(tmp_path_factory):
    return _launch("diverge", tmp_path_factory.mktemp("dist_diverge"))


def test_ranks_trained_on_different_shards(agree_results):
    r0, r1 = agree_results
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["n_train"] + r1["n_train"] == 1347  # 75% of the 1797 digits
    assert not torch.equal(r0["first_input"], r1["first_input"])


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_masks_and_weights_identical_on_both_ranks(agree_results, method):
    r0, r1 = agree_results[0][method], agree_results[1][method]
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    mask_keys = [k for k in s0 if k.endswith("_mask")]
    assert len(mask_keys) == 3  # the three Linear weights
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{method}: {k} differs between rank 0 and rank 1"
    # the masks really moved during training (the check is not comparing two initial masks)
    assert r0["steps"] > 0 and len(r0["history"]) >= 3
    assert r0["history"] == r1["history"]
    assert sum(rec["changed"] for rec in r0["history"]) > 0
    # SET and RigL keep every layer's count: exactly 90% ERK sparsity at the end
    from fastsparse.core.distributions import erdos_renyi_sparsity
    from fastsparse.core.masks import n_keep
    weights = [s0[k[: -len("_mask")]] for k in mask_keys]
    targets = erdos_renyi_sparsity([tuple(w.shape) for w in weights], 0.9)
    for k, w, s in zip(mask_keys, weights, targets):
        assert int(s0[k].sum()) == n_keep(w.numel(), s)
        assert int((w[~s0[k]] != 0).sum()) == 0  # exact zeros outside the mask


def test_flipped_mask_bit_is_detected_at_the_update(diverge_results):
    import dist_worker
    for r in diverge_results:
        res = r["flip"]
        assert res["raised"], f"rank {r['rank']}: a diverged mask went unnoticed"
        assert res["step"] == dist_worker.FLIP_STEP
        assert "0.weight" in res["message"]
        # the update before the flip passed the check: the engine does not cry wolf
        assert r["flip_updates_before"] == dist_worker.FLIP_STEP // dist_worker.FREQ - 1
        assert r["flip_engine_steps"] == dist_worker.FLIP_STEP


def test_rank_dependent_growth_seed_is_detected_at_first_update(diverge_results):
    import dist_worker
    for r in diverge_results:
        res = r["grow_seed"]
        assert res["raised"], f"rank {r['rank']}: SET growth seeded per rank went unnoticed"
        assert res["step"] == dist_worker.FREQ
        assert r["grow_seed_engine_steps"] == dist_worker.FREQ


def test_rank_dependent_initial_masks_are_detected_when_built(diverge_results):
    for r in diverge_results:
        res = r["init_seed"]
        assert res["raised"], f"rank {r['rank']}: different initial masks went unnoticed"
        assert res["step"] == 0
        assert "init_seed_built" not in r


def test_masks_that_collided_under_the_old_checksum_are_told_apart(diverge_results):
    for r in diverge_results:
        assert r["collide"]["raised"], f"rank {r['rank']}: masks {{0,3}} and {{1,2}} passed as equal"
        assert "['m']" in r["collide"]["message"]


@pytest.mark.parametrize("scenario, step", [("count", 5), ("count_engine", 0)])
def test_ranks_with_different_numbers_of_sparse_parameters_all_refuse(diverge_results, scenario, step):
    held = {0: (2, 3), 1: (1, 2)}
    for r in diverge_results:
        res = r[scenario]
        assert res["raised"], f"rank {r['rank']}: different numbers of masks went unnoticed"
        assert res["step"] == step
        lo, hi = (1, 2) if scenario == "count" else (2, 3)
        assert f"different numbers of sparse parameters (between {lo} and {hi}" in res["message"]
        assert f"holds {held[r['rank']][scenario == 'count_engine']}" in res["message"]
        assert "count_engine_built" not in r


def test_the_group_works_after_the_refusals(diverge_results):
    for r in diverge_results:
        assert r.get("agree_after") and not r["agree_after_check"]["raised"]
