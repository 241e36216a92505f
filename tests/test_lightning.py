"""The Lightning callback: algorithm, config dict or YAML; checkpoints that resume with the same
masks and clock; rank-zero logging; and a two-process CPU DDP fit whose ranks end with
identical masks (tests/lightning_worker.py, launched with torchrun)."""
from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from doc_examples import run_example
from fastsparse.experiments.config import ConfigError
from fastsparse.core.distributions import erdos_renyi_sparsity
from fastsparse.integrations.lightning import SparseLightningCallback
from fastsparse.core.masks import n_keep, sparse_params
from helpers import rank_results
from lightning_worker import FREQ, SPARSITY, DigitsModule, digits_loader, rigl, summary, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
N_ITER = 43  # 1347 training digits in batches of 32


def module(seed: int = 0) -> DigitsModule:
    torch.manual_seed(seed)
    return DigitsModule()


def masks_of(m) -> dict[str, torch.Tensor]:
    return {sp.name: sp.mask.clone() for sp in sparse_params(m)}


def erk_counts(m) -> list[int]:
    sps = sparse_params(m)
    return [n_keep(sp.mask.numel(), s) for sp, s in zip(sps, erdos_renyi_sparsity(
        [tuple(sp.param.shape) for sp in sps], SPARSITY))]


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.stop_epoch = epoch

    def on_train_epoch_end(self, trainer_, pl_module):
        if trainer_.current_epoch == self.stop_epoch:
            trainer_.should_stop = True


class SeeMasksAtTrainStart(pl.Callback):
    def on_train_start(self, trainer_, pl_module):
        self.masks = masks_of(pl_module)
        self.step_count = next(cb for cb in trainer_.callbacks if isinstance(cb, SparseLightningCallback)
                               ).sparsifier.step_count


def test_docs_example_trains_sparse_digits():
    ns = run_example("lightning_quickstart")
    cb, m = ns["cb"], ns["module"]
    # 10 epochs of 43 batches, an update every 50 steps until 75% (322)
    assert [h["step"] for h in cb.sparsifier.history] == [50, 100, 150, 200, 250, 300]
    assert all(h["changed"] > 0 for h in cb.sparsifier.history)
    assert [int(sp.mask.sum()) for sp in sparse_params(m)] == erk_counts(m)
    assert all(int((sp.param[~sp.mask] != 0).sum()) == 0 for sp in sparse_params(m))
    with torch.no_grad():
        acc = float((m.net(ns["x_valid"]).argmax(1) == ns["y_valid"]).float().mean())
    assert acc > 0.85  # measured 0.94 on seeds 0-2 (untrained: ~0.1)


def test_checkpoint_resumes_in_a_new_trainer_with_the_same_masks(tmp_path):
    full_module, full_cb = module(), SparseLightningCallback(rigl())
    full = trainer(4, [full_cb])
    full.fit(full_module, digits_loader())
    done = summary(full_module, full_cb, full)
    # 172 optimizer steps, an update every 10 until 75% (129)
    assert [h["step"] for h in done["history"]] == list(range(FREQ, 130, FREQ))
    assert done["step_count"] == done["global_step"] == 4 * N_ITER
    assert list(done["active"].values()) == erk_counts(full_module)
    assert all(int((sp.param[~sp.mask] != 0).sum()) == 0 for sp in sparse_params(full_module))

    half_module, half_cb = module(), SparseLightningCallback(rigl())
    half = trainer(4, [half_cb, StopAfterEpoch(1)])
    half.fit(half_module, digits_loader())
    path = tmp_path / "half.ckpt"
    half.save_checkpoint(path)
    saved = masks_of(half_module)
    assert half_cb.sparsifier.step_count == 2 * N_ITER

    fresh = module(seed=1)  # other weights; the callback attaches other masks until the checkpoint loads
    probe, resumed_cb = SeeMasksAtTrainStart(), SparseLightningCallback(rigl())
    resumed = trainer(4, [resumed_cb, probe])
    resumed.fit(fresh, digits_loader(), ckpt_path=path)
    assert probe.step_count == 2 * N_ITER
    assert all(torch.equal(probe.masks[k], saved[k]) for k in saved)
    after = summary(fresh, resumed_cb, resumed)
    assert after["history"] == done["history"] and after["step_count"] == done["step_count"]
    for k, v in done["state"].items():
        assert torch.allclose(after["state"][k].float(), v.float(), atol=1e-6), k
    assert all(torch.equal(after["state"][k], v) for k, v in done["state"].items() if k.endswith("_mask"))


def test_target_and_actual_sparsity_are_logged():
    m, cb = module(), SparseLightningCallback(rigl())
    t = trainer(2, [cb])
    t.fit(m, digits_loader())
    records = summary(m, cb, t)["records"]
    # one record per mask update (steps 10..60, before 75% of 86) and one per epoch end (43, 86)
    assert [step for step, _ in records] == [10, 20, 30, 40, 43, 50, 60, 86]
    kept = sum(int(sp.mask.sum()) for sp in sparse_params(m))
    total = sum(sp.mask.numel() for sp in sparse_params(m))
    for _, metrics in records:
        assert metrics["sparsity/actual"] == pytest.approx(1 - kept / total, abs=1e-12)
        assert metrics["sparsity/target"] == pytest.approx(SPARSITY, abs=1e-3)


def test_algorithm_config_dict_and_yaml_give_the_same_run(tmp_path):
    import yaml

    block = {"algorithm": "rigl", "sparsity": SPARSITY, "distribution": "erk", "drop_fraction": 0.3,
             "update": {"freq": FREQ, "stop": 0.75}}
    path = tmp_path / "sparsity.yaml"
    path.write_text(yaml.safe_dump(block))
    runs = []
    for source in (rigl(), block, str(path)):
        m, cb = module(), SparseLightningCallback(source, seed=3)
        trainer(1, [cb]).fit(m, digits_loader())
        assert len(cb.sparsifier.history) == 3  # steps 10, 20, 30 of 43
        runs.append(masks_of(m))
    for other in runs[1:]:
        assert all(torch.equal(other[k], runs[0][k]) for k in runs[0])


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(TypeError, match="expected an algorithm"):
        SparseLightningCallback(42)
    with pytest.raises(TypeError, match="expected an algorithm"):
        SparseLightningCallback("not-an-algorithm")
    with pytest.raises(ConfigError, match="no such file"):
        SparseLightningCallback(str(tmp_path / "missing.yaml"))
    with pytest.raises(TypeError, match="seed"):
        SparseLightningCallback(rigl(), seed=0.5)


# --- two processes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_ddp")
    return rank_results(os.path.join(HERE, "lightning_worker.py"), ["--out", str(out)], out, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["rigl", "set"])
def test_ddp_ranks_end_with_identical_masks(ddp_results, run):
    r0, r1 = ddp_results[0][run], ddp_results[1][run]
    assert (ddp_results[0]["rank"], ddp_results[1]["rank"], ddp_results[0]["world"]) == (0, 1, 2)
    assert r0["batches_per_epoch"] == 22  # each rank trains on its half: 674 digits in batches of 32
    # 66 steps, an update every 10 until 75%: 10, ..., 40; the masks really moved
    assert [h["step"] for h in r0["history"]] == [10, 20, 30, 40] and r0["history"] == r1["history"]
    assert all(h["changed"] > 0 for h in r0["history"])
    s0, s1 = r0["state"], r1["state"]
    assert [k for k in s0 if k.endswith("_mask")] == ["net.0.weight_mask", "net.2.weight_mask", "net.4.weight_mask"]
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{run}: {k} differs between the ranks"
    assert r0["active"] == r1["active"]
    # the logger hears from rank zero only
    assert r0["is_global_zero"] and not r1["is_global_zero"]
    assert len(r0["records"]) == 4 + 3 and r1["records"] == []


def _dense_masks(m) -> dict[str, torch.Tensor]:
    from fastsparse.core.sparse_linear import weight_masks
    return {k: v.bool().clone() for k, v in weight_masks(m).items()}


def test_sparse_execution_trains_the_same_masks_and_resumes_from_a_checkpoint(tmp_path):
    from fastsparse.core.sparse_linear import SparseLinear, dense_state_dict

    masked_module, masked_cb = module(), SparseLightningCallback(rigl())
    trainer(4, [masked_cb]).fit(masked_module, digits_loader())
    full_module, full_cb = module(), SparseLightningCallback(rigl(), execution="sparse")
    trainer(4, [full_cb]).fit(full_module, digits_loader())
    layers = [m for m in full_module.net if isinstance(m, SparseLinear)]
    assert len(layers) == 3 and {c.execution for c in full_cb.sparsifier.choices} == {"sparse"}
    assert [h["step"] for h in full_cb.sparsifier.history] == [h["step"] for h in masked_cb.sparsifier.history]
    masked, sparse_ = _dense_masks(masked_module), _dense_masks(full_module)
    assert [int(sparse_[k].sum()) for k in masked] == [int(v.sum()) for v in masked.values()]
    agree = sum(int((masked[k] == sparse_[k]).sum()) for k in masked) / sum(v.numel() for v in masked.values())
    assert agree > 0.999

    half_module, half_cb = module(), SparseLightningCallback(rigl(), execution="sparse")
    half = trainer(4, [half_cb, StopAfterEpoch(1)])
    half.fit(half_module, digits_loader())
    path = tmp_path / "half.ckpt"
    half.save_checkpoint(path)
    resumed_module, resumed_cb = module(seed=1), SparseLightningCallback(rigl(), execution="auto")
    resumed = trainer(4, [resumed_cb])
    resumed.fit(resumed_module, digits_loader(), ckpt_path=path)   # "auto" replays the checkpoint's choice
    assert {c.execution for c in resumed_cb.sparsifier.choices} == {"sparse"}
    assert resumed_cb.sparsifier.history == full_cb.sparsifier.history
    done, after = dense_state_dict(full_module), dense_state_dict(resumed_module)
    assert done.keys() == after.keys()
    for k, v in done.items():
        assert torch.allclose(after[k].float(), v.float(), atol=1e-6), k
