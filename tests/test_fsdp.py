"""FSDP2 (``fully_shard``): the engine on sharded weights, two processes (torchrun, gloo, CPU).

The masks a 2-rank FSDP run holds after every update are the masks one process computes:
static, SET and RigL on the digits MLP and SET and RigL on a small conv net, compared bit for
bit (with the whole batch on both ranks the weights match too: FSDP's average of two equal
gradients is exact); RigL with the batch split across the ranks, where the gradients are
reduced in another order, still picks the same masks on this run. The sharded selection is
checked against the one-process selection on 300 small tensors full of ties and 5 large ones
(bounded from a sample first). Ranks that
disagree raise MaskDisagreement on every rank (no hang); what FSDP does not run is refused
before anything changes. The worker is tests/fsdp_worker.py (one launch per scenario, 6-20 s).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import rank_results

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_worker.py")
LAUNCH_TIMEOUT = 120
RUNS = ["static-mlp-same", "set-mlp-same", "rigl-mlp-same", "set-cnn-same", "rigl-cnn-same"]
PRUNING = ["gmp-mlp-same", "gmpglobal-mlp-same", "gmpglobal-cnn-same", "granet-mlp-same", "granetglobal-cnn-same"]


def _launch(scenario: str, out_dir, ranks: int = 2) -> list[dict]:
    prefix = f"{scenario}-" if scenario == "reload" else ""
    return rank_results(WORKER, ["--scenario", scenario, "--out", str(out_dir)], out_dir, ranks, prefix,
                        LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def agree(tmp_path_factory):
    return _launch("agree", tmp_path_factory.mktemp("fsdp_agree"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", RUNS + PRUNING)
def test_sharded_masks_are_the_one_process_masks_at_every_update(agree, run):
    for result in agree:
        r = result[run]
        # every 10 steps until 75 % of 60 (GMP: up to the first update step at or after 45)
        n_updates = 0 if run.startswith("static") else 5 if run in PRUNING else 4
        assert len(r["got"]) == len(r["expected"]) == n_updates + 2   # start, updates, end
        for got, expected in zip(r["got"], r["expected"]):
            assert _same(got, expected)
        assert r["history"] == r["ref_history"]
        assert r["sparsity"] == r["ref_sparsity"]
        assert _same(r["weights"], r["ref_weights"])   # both ranks saw the whole batch


def test_masks_moved_and_kept_their_counts(agree):
    for run in RUNS[1:]:
        r = agree[0][run]
        first, last = r["got"][0], r["got"][-1]
        assert any(not torch.equal(first[k], last[k]) for k in first)
        assert all(int(first[k].sum()) == int(last[k].sum()) for k in first)
        assert all(h["changed"] > 0 for h in r["history"])


def test_gmp_prunes_to_the_exact_counts_of_its_schedule(agree):
    from fastsparse.core.distributions import resolve_sparsities
    from fastsparse.core.masks import n_keep
    from fastsparse.core.schedules import Clock, Cubic

    shapes = {"0.weight": (128, 64), "2.weight": (64, 128), "4.weight": (10, 64)}
    finals = dict(zip(shapes, resolve_sparsities("erk", list(shapes.values()), 0.9)))
    r = agree[0]["gmp-mlp-same"]
    for masks, step in zip(r["got"][1:-1], (10, 20, 30, 40, 50)):
        for name, shape in shapes.items():   # local: each layer on its own cubic from dense
            numel = shape[0] * shape[1]
            assert int(masks[name].sum()) == n_keep(numel, Cubic(0.0, finals[name], 0, 0.75)(Clock(step, 60)))
    for run in PRUNING[1:3]:   # global: the model's count, one threshold
        r = agree[0][run]
        total = sum(v.numel() for v in r["got"][0].values())
        for masks, step in zip(r["got"][1:-1], (10, 20, 30, 40, 50)):
            assert sum(int(v.sum()) for v in masks.values()) == n_keep(total, Cubic(0.0, 0.9, 0, 0.75)(Clock(step, 60)))
        for before, after in zip(r["got"], r["got"][1:]):   # nested
            assert all(not bool((after[k] & ~before[k]).any()) for k in before)


def test_granet_prunes_to_gmps_counts_and_regrows(agree):
    from fastsparse.core.masks import n_keep
    from fastsparse.core.schedules import Clock, Cubic

    for run in ("granet-mlp-same", "granetglobal-cnn-same"):
        r = agree[0][run]
        total = sum(v.numel() for v in r["got"][0].values())
        assert sum(int(v.sum()) for v in r["got"][0].values()) == pytest.approx(total / 2, abs=3)   # random, 0.5
        assert all(h["changed"] > 0 for h in r["history"])   # regrown at every update
        if run.startswith("granetglobal"):
            for masks, step in zip(r["got"][1:-1], (10, 20, 30, 40, 50)):
                assert sum(int(v.sum()) for v in masks.values()) == n_keep(total, Cubic(0.5, 0.9, 0, 0.75)(
                    Clock(step, 60)))


def test_rigl_with_the_batch_split_across_ranks(agree):
    r = agree[0]["rigl-mlp-split"]
    for got, expected in zip(r["got"], r["expected"]):
        for k in got:
            assert int(got[k].sum()) == int(expected[k].sum())
            assert float((got[k] == expected[k]).float().mean()) >= 0.999
    # on this run the reduction order changed no choice at all
    assert all(_same(g, e) for g, e in zip(r["got"], r["expected"]))
    assert not _same(r["weights"], r["ref_weights"])   # the weights differ in their last bits


def test_sharded_selection_equals_the_one_process_selection(tmp_path):
    for r in _launch("select", tmp_path):
        assert r["cases"] == 425 and r["wrong"] == []


def test_disagreeing_ranks_raise_on_every_rank(tmp_path):
    results = _launch("diverge", tmp_path)
    for r in results:
        for case in ("seed", "sparsity", "flip", "k"):
            assert r[case]["raised"], case
        assert "at step 0" in r["seed"]["message"] and "at step 0" in r["sparsity"]["message"]
        assert "at step 10" in r["flip"]["message"] and "'0.weight'" in r["flip"]["message"]
        assert "different numbers of weights" in r["k"]["message"]
        assert not r["after"]["raised"]


def test_what_fsdp_does_not_run_is_refused_before_any_change(tmp_path):
    for r in _launch("refuse", tmp_path):
        assert r["sparse"]["refused"] and "execution='masked'" in r["sparse"]["message"]
        assert r["snip"]["refused"] and "train this method with DDP" in r["snip"]["message"]
        assert r["gmp_rows"]["refused"] and "granularity='row' (use 'weight')" in r["gmp_rows"]["message"]
        assert r["set_drop"]["refused"] and "drop_rule='set'" in r["set_drop"]["message"]
        assert all(r[k]["unchanged"] for k in ("sparse", "snip", "gmp_rows", "set_drop"))


def test_sharded_checkpoint_resumes_refuses_and_loads_on_other_numbers_of_ranks(tmp_path):
    from fastsparse.deploy import read_sparse, save_sparse
    from fastsparse.engine.sharded_checkpoint import load_sharded
    from fastsparse.experiments.models import MLP

    results = _launch("dcp", tmp_path)
    for r in results:
        assert r["resumed_at"] == 25
        assert _same(r["resumed"], r["continued"])          # 25 more steps from the checkpoint: bit for bit
        assert r["resumed_history"] == r["history"] and len(r["history"]) == 4
        assert "another run" in r["identity"] and "'seed': 7" in r["identity"]
        assert "lacks __1_0.distcp" in r["missing"]
        assert "__0_0.distcp does not match its checksum" in r["corrupt"]
        assert "points a chunk at '../corrupt/__0_0.distcp'" in r["crafted"] and not r["crafted_ran"]
        assert r["unchanged"]                                   # every refusal before any change
    # the 2-rank checkpoint in one process, unsharded: the whole state at the save, then exported
    torch.manual_seed(0)
    model = MLP((64, 128, 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    import fastsparse as sparse
    engine = sparse.Sparsifier(model, opt, sparse.create("rigl", sparsity=0.9, distribution="erk",
                                                          update=sparse.UpdateSchedule(freq=10, stop=0.75)),
                               total_steps=60, seed=7)
    load_sharded(tmp_path / "ckpt", model, opt, engine, {"run": "digits-rigl", "seed": 7})
    whole = torch.load(tmp_path / "whole_at_save.pt", weights_only=True)
    assert _same(dict(model.state_dict()), whole)
    assert engine.step_count == 25 and len(engine.history) == 2
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    save_sparse(model.state_dict(), tmp_path / "model.safetensors")
    assert _same({k: v for k, v in read_sparse(tmp_path / "model.safetensors").state_dict.items()}, whole)
    # ... and on 3 ranks (uneven shards: 43, 43, 42 rows of 128; 4, 4, 2 of 10)
    three = _launch("reload", tmp_path, ranks=3)
    assert [r["rows"]["4.weight"][0] for r in three] == [4, 4, 2]
    for r in three:
        assert _same(r["state"], whole) and r["step"] == 25 and r["history"] == results[0]["history"][:2]
        assert all(torch.equal(r["momentum"][n], opt.state[p]["momentum_buffer"]) for n, p in model.named_parameters())
