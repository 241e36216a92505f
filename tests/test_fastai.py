"""The fastai callbacks: clock mapping, exact counts and zeros, optimizer state of grown weights,
no gradient leaking after an update, GradientAccumulation, cancelled steps, save/load/resume,
SparsifyCallback's call forms, and the lazy top-level names.

Every fit trains a small batch-norm MLP on scikit-learn's digits (21 batches of 64 per
epoch) for one to four epochs.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from functools import partial

import pytest
import torch

from fastai.basics import (
    SGD, Adam, Callback, CancelFitException, CancelStepException, CrossEntropyLossFlat, DataLoaders, Learner,
    OptimWrapper, accuracy, nn,
)
from fastai.callback.all import GradientAccumulation  # (fastai.callback.all also adds fit_one_cycle)

import fastsparse as sparse
from fastsparse.core.scores import large_final
from fastsparse.experiments.data import load_digits_split
from fastsparse.integrations.fastai import (
    STATE_KEY, DynamicSparseTrainingCallback, SparseTrainingCallback, SparsifyCallback, saved_state,
)
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.core.schedules import iterative

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {"set": sparse.SET_presets, "snfs": sparse.SNFS_presets, "rigl": sparse.RigL_presets}
N_ITER = 21  # 1347 training digits in batches of 64, last one dropped


def digits_dls(bs: int = 64, shuffle: bool = True) -> DataLoaders:
    x_train, y_train, x_valid, y_valid = load_digits_split()
    return DataLoaders.from_dsets(list(zip(x_train, y_train)), list(zip(x_valid, y_valid)), bs=bs, shuffle=shuffle)


def bn_mlp(width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 10))


def make_learner(sparsity: float | None = 0.9, shuffle: bool = True, opt_func=Adam, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    random.seed(seed)  # fastai's DataLoader draws its shuffling seed from Python's random
    learn = Learner(digits_dls(shuffle=shuffle), bn_mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    opt_func=opt_func)
    if sparsity is not None:
        sparse.sparsify_model(learn.model, model_sparsity=sparsity, sparse_f=sparse.erdos_renyi_sparsity)
    return learn


def fit(learn: Learner, n_epoch: int, cbs, method: str = "fit", **kw) -> None:
    with learn.no_logging(), learn.no_bar():
        getattr(learn, method)(n_epoch, cbs=cbs, **kw)


def accuracy_of(learn: Learner) -> float:
    with learn.no_bar():
        return float(learn.validate()[1])


def masks_of(model) -> dict[str, torch.Tensor]:
    return {sp.name: sp.mask.clone() for sp in sparse_params(model)}


def counts(model) -> list[int]:
    return [int(sp.mask.sum()) for sp in sparse_params(model)]


def masked_nonzero(model) -> int:
    return sum(int((sp.param[~sp.mask] != 0).sum()) for sp in sparse_params(model))


class Checker(Callback):
    """Runs after the sparse callback at every event it watches and records what it saw."""

    order = 50
    run_valid = False

    def __init__(self):
        self.steps, self.nonzero, self.count_errors, self.grad_leaks = 0, [], [], []
        self.grown, self.grown_weight_nonzero, self.grown_state_nonzero = 0, 0, 0

    def before_fit(self):
        self.expected = counts(self.learn.model)

    def after_pred(self):  # the gradients left from the previous batch must be zero
        leak = sum(float(p.grad.abs().sum()) for p in self.learn.model.parameters() if p.grad is not None)
        self.grad_leaks.append(leak)

    def before_step(self):
        self.old = masks_of(self.learn.model)

    def after_step(self):
        self.steps += 1
        model = self.learn.model
        self.nonzero.append(masked_nonzero(model))
        state = getattr(self.learn.opt, "opt", self.learn.opt).state
        for sp in sparse_params(model):
            grown = sp.mask & ~self.old[sp.name]
            self.grown += int(grown.sum())
            self.grown_weight_nonzero += int((sp.param[grown] != 0).sum())
            for value in state.get(sp.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == sp.param.shape:
                    self.grown_state_nonzero += int((value[grown] != 0).sum())
        self.count_errors.append(self._count_error())

    def _count_error(self) -> int:
        now = counts(self.learn.model)
        return abs(sum(now) - sum(self.expected))


# --- DynamicSparseTrainingCallback ----------------------------------------------------------------

RUNS = [("set", Adam, 1e-2), ("snfs", Adam, 1e-2), ("rigl", Adam, 1e-2), ("snfs", partial(SGD, mom=0.9), 0.1),
        ("snfs", partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9), 0.1)]


@pytest.mark.parametrize("preset,opt_func,lr", RUNS, ids=["set-adam", "snfs-adam", "rigl-adam", "snfs-sgd",
                                                           "snfs-torch-sgd"])
def test_density_stays_exact_with_masked_weights_zero_and_grown_state_zeroed(preset, opt_func, lr):
    """fastsparse 0.0.5 dropped nothing at an update and drifted to ~1.3x the target density."""
    learn = make_learner(opt_func=opt_func)
    initial = counts(learn.model)
    sps = sparse_params(learn.model)
    erk = sparse.erdos_renyi_sparsity([tuple(sp.param.shape) for sp in sps], 0.9)
    assert initial == [n_keep(sp.mask.numel(), s) for sp, s in zip(sps, erk)]
    check = Checker()
    cb = DynamicSparseTrainingCallback(**PRESETS[preset], batches_per_update=5)
    fit(learn, 2, [cb, check], method="fit_one_cycle", lr_max=lr)

    history = cb.sparsifier.history
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]  # 42 steps, updates until 75%
    assert all(h["changed"] > 0 for h in history)                  # connectivity really moved
    assert check.grown > 0 and check.grown_weight_nonzero == 0 and check.grown_state_nonzero == 0
    assert check.steps == 2 * N_ITER and max(check.nonzero) == 0
    assert max(check.count_errors) == 0 and sum(counts(learn.model)) == sum(initial)
    if preset != "snfs":  # SNFS redistributes growth between layers; SET and RigL keep each layer's count
        assert counts(learn.model) == initial
    assert max(check.grad_leaks[1:]) == 0.0
    assert accuracy_of(learn) > 0.8  # measured 0.91-0.96


def test_update_batch_gradients_do_not_reach_the_next_batch():
    """0.0.5 cancelled the update batch, skipping zero_grad: its gradients joined the next batch's."""
    learn = make_learner()
    check = Checker()
    cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=2)
    fit(learn, 1, [cb, check])
    assert len(cb.sparsifier.history) == 7  # steps 2, 4, ..., 14 (< 75% of 21)
    assert check.grad_leaks[0] == 0.0 and max(check.grad_leaks) == 0.0


def test_batches_per_update_none_updates_once_per_epoch():
    learn = make_learner()
    cb = DynamicSparseTrainingCallback(**sparse.SET_presets)
    fit(learn, 4, cb)
    assert cb.sparsifier.groups[0].algorithm.update.freq == N_ITER
    assert [h["step"] for h in cb.sparsifier.history] == [N_ITER, 2 * N_ITER]  # 63 is at 75%: stop


def test_gradient_accumulation_counts_optimizer_steps():
    learn = make_learner()
    check = Checker()
    cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=3)
    fit(learn, 2, [GradientAccumulation(n_acc=128), cb, check])
    assert check.steps == N_ITER == cb.sparsifier.step_count  # 42 batches of 64, a step every 128 items
    assert [h["step"] for h in cb.sparsifier.history] == [3, 6, 9, 12, 15]  # steps, not batches
    assert max(check.nonzero) == 0 and max(check.count_errors) == 0 and counts(learn.model) == check.expected

    per_epoch = DynamicSparseTrainingCallback(**sparse.RigL_presets)
    fit(make_learner(), 1, [GradientAccumulation(n_acc=128), per_epoch])
    assert per_epoch.sparsifier.groups[0].algorithm.update.freq == N_ITER // 2


class SkipEveryThirdStep(Callback):
    """Raises CancelStepException like MixedPrecision does for a step with non-finite gradients."""

    order = 5

    def before_fit(self):
        self.skipped = 0

    def before_step(self):
        if self.learn.iter % 3 == 2:
            self.skipped += 1
            raise CancelStepException()


def test_cancelled_steps_neither_count_nor_update_masks():
    learn = make_learner()
    skip, check = SkipEveryThirdStep(), Checker()
    cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=4)
    fit(learn, 2, [skip, cb, check])
    assert skip.skipped == 14 and cb.sparsifier.step_count == 2 * N_ITER - 14
    # 28 counted steps in 42 batches; updates at counted steps 4, 8, ..., 28 while the batch is before 75%
    assert [h["step"] for h in cb.sparsifier.history] == [4, 8, 12, 16, 20]
    assert max(check.nonzero) == 0 and counts(learn.model) == check.expected


class StopAfterEpoch(Callback):
    order = 90

    def __init__(self, epoch: int):
        self.stop_epoch = epoch

    def after_epoch(self):
        if self.learn.epoch == self.stop_epoch:
            raise CancelFitException()


def test_learn_save_load_resumes_exactly(tmp_path):
    """learn.save (with the optimizer) carries masks and the engine's clock; fit(start_epoch=2)
    after learn.load ends where the uninterrupted fit ends."""
    def dst():
        return DynamicSparseTrainingCallback(**sparse.SET_presets, batches_per_update=8)

    full = make_learner(shuffle=False)
    full_cb = dst()
    fit(full, 4, full_cb)

    first = make_learner(shuffle=False)
    first.path = tmp_path
    fit(first, 4, [dst(), StopAfterEpoch(1)])
    assert saved_state(first.opt)["kind"] == "engine"
    assert saved_state(first.opt)["state"]["step_count"] == 2 * N_ITER
    first.save("half")

    resumed = make_learner(shuffle=False, seed=1)  # other weights and masks: load must replace them
    resumed.path = tmp_path
    assert masks_of(resumed.model).keys() == masks_of(full.model).keys()
    resumed.load("half")
    assert all(torch.equal(a, b) for a, b in zip(masks_of(resumed.model).values(), masks_of(first.model).values()))
    resumed_cb = dst()
    fit(resumed, 4, resumed_cb, start_epoch=2)

    assert resumed_cb.sparsifier.step_count == full_cb.sparsifier.step_count == 4 * N_ITER
    assert resumed_cb.sparsifier.history == full_cb.sparsifier.history
    for (name, a), b in zip(masks_of(resumed.model).items(), masks_of(full.model).values()):
        assert torch.equal(a, b), name
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert STATE_KEY in resumed.opt.hypers[0]


def test_resume_without_saved_state_warns_and_estimates_the_clock():
    learn = make_learner()
    cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=5)
    with pytest.warns(UserWarning, match="estimated from the epoch"):
        fit(learn, 2, cb, start_epoch=1)
    assert cb.sparsifier.step_count == 2 * N_ITER
    assert [h["step"] for h in cb.sparsifier.history] == [25, 30]  # steps 22..42 at 52%..100% of the fit


def test_errors_are_raised_at_construction_or_before_training():
    with pytest.raises(ValueError, match="batches_per_update"):
        DynamicSparseTrainingCallback(batches_per_update=0)
    with pytest.raises(ValueError, match="stop_pct"):
        DynamicSparseTrainingCallback(stop_pct=0.0)
    with pytest.raises(ValueError, match="redistribution"):
        DynamicSparseTrainingCallback(redistribution="uniform")
    with pytest.raises(ValueError, match="grow score"):
        DynamicSparseTrainingCallback(grow_score_f="nope")
    learn = make_learner(sparsity=None)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="sparsify_model"):
        fit(learn, 1, DynamicSparseTrainingCallback())
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_sparsifier_callback_runs_any_engine_algorithm():
    learn = make_learner(sparsity=None)
    alg = sparse.RigL(sparsity=0.8, distribution="erk", update=sparse.UpdateSchedule(freq=6, stop=0.75))
    cb = SparseTrainingCallback(alg)
    check = Checker()
    fit(learn, 2, [cb, check])
    assert [h["step"] for h in cb.sparsifier.history] == [6, 12, 18, 24, 30]
    assert max(check.nonzero) == 0 and max(check.count_errors) == 0
    assert abs(cb.sparsifier.sparsity() - 0.8) < 1e-3 and accuracy_of(learn) > 0.8


# --- SparsifyCallback ------------------------------------------------------------------------------

def _lottery_run(cb, epochs: int = 4):
    learn = make_learner(sparsity=None, shuffle=False)
    fit(learn, epochs, cb)
    return learn


def test_sparsify_callback_blog_form_percent_and_keyword_fraction_agree():
    with pytest.warns(UserWarning, match="50% "):
        blog = SparsifyCallback(50, 'weight', 'global', large_final, iterative, start_epoch=1, lth=True,
                                rewind_epoch=1, reset_end=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keyword = SparsifyCallback(sparsity=0.5, granularity='weight', context='global', criteria=large_final,
                                   schedule=iterative, start_epoch=1, lth=True, rewind_epoch=1, reset_end=True)
    a, b = _lottery_run(blog), _lottery_run(keyword)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)

    sched = blog.scheduler
    total = sum(sp.mask.numel() for sp in sparse_params(a.model))
    assert sum(counts(a.model)) == n_keep(total, 0.5)
    # iterative, 3 steps between epoch 1 and the end of 4 epochs: thirds reached in epochs 1, 2 and 3
    assert [round(e["progress"] * 4 * N_ITER) for e in sched.events] == [N_ITER + 1, 2 * N_ITER + 1, 3 * N_ITER + 1]
    # reset_end: the ticket is returned at its values from the start of epoch 1, masked
    rewind = sched.rewind_state
    for name, tensor in a.model.state_dict().items():
        if name.endswith("_mask"):
            continue
        expected = rewind[name]
        mask = a.model.state_dict().get(name + "_mask")
        if mask is not None:
            expected = expected * mask
        assert torch.equal(tensor, expected), name
    assert masked_nonzero(a.model) == 0


def test_sparsify_callback_lth_rewinds_after_every_pruning_event():
    cb = SparsifyCallback(sparsity=0.6, granularity='weight', context='local', criteria='large_final',
                          schedule='iterative', start_epoch=1, lth=True)
    learn = make_learner(sparsity=None, shuffle=False)
    init = {k: v.clone() for k, v in learn.model.state_dict().items()}
    seen = []

    class AfterEvent(Callback):
        order = 60

        def after_step(self):
            if len(cb.scheduler.events) > len(seen):
                seen.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})

    fit(learn, 4, [cb, AfterEvent()])
    assert len(seen) == 3
    for state in seen:  # right after each event: initial weights, biases and BN buffers, masked
        for name, value in init.items():
            mask = state.get(name + "_mask")
            assert torch.equal(state[name], value * mask if mask is not None else value), name
    assert counts(learn.model) == [n_keep(sp.mask.numel(), 0.6) for sp in sparse_params(learn.model)]
    assert accuracy_of(learn) > 0.8  # measured 0.89


def test_sparsify_callback_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SparsifyCallback(150, 'weight', 'global', large_final, iterative)
    with pytest.raises(TypeError, match="exactly once"):
        SparsifyCallback(0.5, end_sparsity=0.5)
    with pytest.raises(TypeError, match="one of them"):
        SparsifyCallback(0.5, context='global', method='local')
    with pytest.raises(ValueError, match="unknown schedule"):
        SparsifyCallback(0.5, schedule='sometimes')
    with pytest.raises(ValueError, match="end_epoch"):
        SparsifyCallback(0.5, start_epoch=3, end_epoch=2)


# --- the top-level names ---------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=HERE)


def test_star_import_is_lazy_and_works_without_fastai_or_lightning():
    code = """
import sys
sys.modules['fastai'] = None        # as if fastai and Lightning were not installed
sys.modules['lightning'] = None
import torch
from fastsparse import *
import fastsparse as sparse
assert {'DynamicSparseTrainingCallback', 'SparsifyCallback', 'SparseLightningCallback'} <= set(sparse.__all__)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
hooks = sparsify_model(model, model_sparsity=0.75, sparse_f=erdos_renyi_sparsity)
opt = DynamicSparseTrainingOptimizerWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), **RigL_presets,
                                            batches_per_update=1)
x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
torch.nn.functional.cross_entropy(model(x), y).backward()
opt.step(1, 0.1)
assert len(opt.sparsifier.history) == 1
assert not isinstance(object(), DynamicSparseTrainingCallback)
for name in ('DynamicSparseTrainingCallback', 'SparseLightningCallback'):
    try:
        getattr(sparse, name)()
    except ImportError as e:
        assert "pip install 'fastsparse[" in str(e), e
    else:
        raise AssertionError(name + ' built without its framework')
print('ok')
"""
    out = _python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

    code = """
import sys
from fastsparse import *
assert 'fastai' not in sys.modules and 'lightning' not in sys.modules, 'a framework was imported eagerly'
cb = DynamicSparseTrainingCallback(**SNFS_presets, batches_per_update=32)
from fastsparse.integrations.fastai import DynamicSparseTrainingCallback as Real
assert type(cb) is Real and isinstance(cb, DynamicSparseTrainingCallback)
class Mine(DynamicSparseTrainingCallback):
    pass
assert issubclass(Mine, Real) and 'lightning' not in sys.modules
print('ok')
"""
    out = _python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --- sparse execution ------------------------------------------------------------------------------
def _wrapped_adam(params, **kw):
    from fastai.optimizer import OptimWrapper
    return OptimWrapper(params, torch.optim.Adam, **kw)


def test_sparse_execution_in_fastai_keeps_the_masked_runs_counts_and_accuracy():
    from fastsparse.core.sparse_linear import SparseLinear, weight_masks

    runs = {}
    for execution in ("masked", "sparse"):
        learn = make_learner(opt_func=_wrapped_adam)
        cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=5, execution=execution)
        fit(learn, 3, cb, lr=1e-2)
        masks = {k: v.bool().clone() for k, v in weight_masks(learn.model).items()}
        runs[execution] = (masks, accuracy_of(learn), cb, learn)
    (mm, macc, mcb, _), (sm, sacc, scb, slearn) = runs["masked"], runs["sparse"]
    assert sum(isinstance(m, SparseLinear) for m in slearn.model.modules()) == 3
    assert [int(sm[k].sum()) for k in mm] == [int(v.sum()) for v in mm.values()]
    agree = sum(int((mm[k] == sm[k]).sum()) for k in mm) / sum(v.numel() for v in mm.values())
    assert agree > 0.99
    assert [h["step"] for h in scb.sparsifier.history] == [h["step"] for h in mcb.sparsifier.history]
    assert macc > 0.85 and abs(sacc - macc) <= 0.03


def test_sparse_execution_with_fastais_own_optimizer_is_refused_with_what_to_use():
    from fastsparse.engine.execution import ExecutionRefused

    learn = make_learner(opt_func=Adam)
    cb = DynamicSparseTrainingCallback(**sparse.RigL_presets, batches_per_update=5, execution="sparse")
    with pytest.raises(ExecutionRefused, match="OptimWrapper"):
        fit(learn, 1, cb)
    with pytest.raises(ValueError, match="execution must be one of"):
        SparseTrainingCallback("rigl", execution="fastest")
