"""The seed documents' examples, run exactly as docs/integrations.md shows them.

Each block marked ``<!-- example: name -->`` in docs/integrations.md is executed as written
(what users read is what this runs); the test then checks the outcome: exact mask counts,
exact zeros, accuracy on digits above what a broken run reaches, the reloaded learner
validating to the same numbers. The examples are those of the fastsparse 0.0.5 README and of
the fasterai lottery-ticket blog, with the digits data and a batch-norm MLP in place of
MNIST and torchvision's ResNet (nothing can be downloaded here).

Progress bars are switched off while the examples run (fastai's ``ProgressCallback`` is taken
out of the default callbacks, as in a non-interactive session) and Python's ``random`` is
seeded (fastai's shuffling draws from it); nothing else is changed.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fastai.callback.progress import ProgressCallback
from fastai.learner import defaults

from doc_examples import run_example
from fastsparse.core.distributions import erdos_renyi_sparsity
from fastsparse.core.masks import n_keep, sparse_params

@pytest.fixture(autouse=True)
def _quiet_fastai(monkeypatch, tmp_path):
    random.seed(0)  # fastai's DataLoader draws its shuffling seed from Python's random (torch's is seeded in conftest)
    monkeypatch.setattr(defaults, "callbacks", [cb for cb in defaults.callbacks if cb is not ProgressCallback])
    monkeypatch.chdir(tmp_path)  # save_model writes into the working directory


def counts(model) -> list[int]:
    return [int(sp.mask.sum()) for sp in sparse_params(model)]


def erk_counts(model, sparsity: float) -> list[int]:
    sps = sparse_params(model)
    return [n_keep(sp.mask.numel(), s) for sp, s in zip(sps, erdos_renyi_sparsity(
        [tuple(sp.param.shape) for sp in sps], sparsity))]


def masked_nonzero(model) -> int:
    return sum(int((sp.param[~sp.mask] != 0).sum()) for sp in sparse_params(model))


def test_fastai_quickstart_snfs_at_99_percent():
    ns = run_example("fastai_quickstart")
    learn, cb, hooks = ns["learn"], ns["cbs"][0], ns["sparse_hooks"]
    # 5 epochs of 21 batches: updates after steps 32 and 64 (96 is past 75% of 105)
    assert [h["step"] for h in cb.sparsifier.history] == [32, 64]
    assert all(h["changed"] > 0 for h in cb.sparsifier.history)
    # SNFS_presets keeps every layer's count, as requested by the ERK distribution
    assert counts(learn.model) == erk_counts(learn.model, 0.99)
    assert masked_nonzero(learn.model) == 0
    assert len(hooks) == 0  # (4) removed: nothing enforces the masks any more, they stay as buffers
    assert {k for k in learn.model.state_dict() if k.endswith("_mask")} == {"0.weight_mask", "3.weight_mask",
                                                                             "6.weight_mask"}
    error = float(learn.validate()[1])
    assert 1 - error > 0.75  # measured 0.87 on seeds 0-2 (static masks, same set-up: 0.80-0.85; untrained ~0.1)


def test_fastai_save_reload_validates_to_the_same_numbers():
    ns = run_example("fastai_save")
    learn = ns["learn"]
    before = [float(v) for v in learn.validate()]
    masks = [sp.mask.clone() for sp in sparse_params(learn.model)]
    assert Path("sparse_tiny_mnist").exists()
    assert sum(counts(learn.model)) == sum(erk_counts(learn.model, 0.9))
    # 5 epochs of 21 batches, an update every 8 steps until 75%: 8, 16, ..., 72
    assert [h["step"] for h in ns["cbs"].sparsifier.history] == list(range(8, 79, 8))

    with pytest.warns(UserWarning, match="Could not load the optimizer state"):  # learn.opt is None, as in the seed
        reloaded = run_example("fastai_load")
    assert (reloaded["val_loss"], reloaded["val_acc"]) == (before[0], before[1])
    assert reloaded["learn"] is not learn
    for mask, sp in zip(masks, sparse_params(reloaded["learn"].model)):
        assert torch.equal(mask, sp.mask), sp.name
    assert masked_nonzero(reloaded["learn"].model) == 0
    assert before[1] > 0.9  # measured 0.98


def test_plain_pytorch_wrapper_loop():
    ns = run_example("pytorch_wrapper")
    model, opt = ns["model"], ns["opt"]
    # 20 epochs of 21 batches; the wrapper's default of 100 batches per update, until 75% (step 315)
    assert [h["step"] for h in opt.sparsifier.history] == [100, 200, 300]
    assert counts(model) == erk_counts(model, 0.9)  # RigL keeps every layer's count exactly
    assert masked_nonzero(model) == 0
    model.eval()
    with torch.no_grad():
        acc = float((model(ns["x_valid"]).argmax(1) == ns["y_valid"]).float().mean())
    assert acc > 0.9  # measured 0.96


def test_customisation_first_layer_dense_and_custom_scores():
    ns = run_example("fastai_custom")
    learn, cb = ns["learn"], ns["cbs"][0]
    algorithm = cb.sparsifier.groups[0].algorithm
    assert algorithm.keep_score is ns["custom_keep_scoring_function"]
    assert algorithm.grow_score is ns["custom_grow_scoring_function"]
    # 3 epochs of 21 batches, an update every 16 steps until 75%: 16, 32
    assert [h["step"] for h in cb.sparsifier.history] == [16, 32]
    assert all(h["changed"] > 0 for h in cb.sparsifier.history)
    first, *others = sparse_params(learn.model)
    assert bool(first.mask.all())  # the first layer stays dense through the updates
    assert [int(sp.mask.sum()) for sp in others] == [n_keep(sp.mask.numel(), 0.95) for sp in others]
    assert masked_nonzero(learn.model) == 0
    assert float(learn.validate()[1]) > 0.8  # measured 0.87-0.93 on seeds 0-2


def _global_count_is_half(model) -> bool:
    total = sum(sp.mask.numel() for sp in sparse_params(model))
    return sum(counts(model)) == n_keep(total, 0.5)


def test_blog_lottery_tickets_lth_then_rewind():
    ns = run_example("lottery_baseline")
    assert sparse_params(ns["learn"].model) == []  # the baseline stays dense
    assert ns["baseline"][1] > 0.9  # measured 0.98

    with pytest.warns(UserWarning, match="50% "):
        run_example("lottery_lth", ns)
    cb, learn = ns["sp_cb"], ns["learn"]
    steps = 20 * 11  # 20 epochs of 11 batches of 128
    # iterative, 3 steps from epoch 5: pruned right after epochs 5, 10 and 15 begin, then reset to W_0
    assert [round(e["progress"] * steps) for e in cb.scheduler.events] == [5 * 11 + 1, 10 * 11 + 1, 15 * 11 + 1]
    assert [round(e["sparsity"], 2) for e in cb.scheduler.events] == [0.17, 0.33, 0.5]
    rewind = cb.scheduler.rewind_state
    assert all(torch.equal(rewind[k], v) for k, v in ns["initial_weights"].items())
    assert _global_count_is_half(learn.model) and masked_nonzero(learn.model) == 0
    assert ns["lth"][1] > 0.9  # measured 0.99

    with pytest.warns(UserWarning, match="50% "):
        run_example("lottery_rewind", ns)
    cb, learn = ns["sp_cb"], ns["learn"]
    assert len(cb.scheduler.events) == 3
    rewind = cb.scheduler.rewind_state  # the weights after the first epoch, not W_0
    assert not torch.equal(rewind["0.weight"], ns["initial_weights"]["0.weight"])
    assert _global_count_is_half(learn.model) and masked_nonzero(learn.model) == 0
    assert ns["rewound"][1] > 0.9  # measured 0.99
