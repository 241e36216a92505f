"""Every registered method through every entry point: the same masks as its reference driver,
or a refusal that says what to use instead. Never less than the whole method, silently.

Entry points: the engine in a plain loop (``Sparsifier`` on a torch optimizer), ``from_config``,
the fastai callback, the Lightning callback, and ``fastsparse train`` (the runner). The
reference: the plain loop over the same batches; ``find_ticket`` for IMP (one training per
level); ``search`` for the score searches, which only the runner and their own drivers run.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.core.masks import sparse_params
from fastsparse.engine.recipe import recipe_class
from fastsparse.experiments.config import parse_config, plan_sparsity
from fastsparse.experiments.data import load_dataset
from fastsparse.experiments.models import create_model
from fastsparse.recipes.score_search import search

from helpers import mlp

NAMES = sparse.list_algorithms()
EPOCHS, SPE, LR = 5, 5, 0.05
ENTRY_POINTS = ["from_config", "fastai", "lightning", "runner"]


def _block(name: str) -> dict:
    """The method at 90% with frequent updates, in config form (only keys it takes)."""
    from fastsparse.experiments.config import algorithm_parameters

    takes = algorithm_parameters(sparse.get_algorithm(name))
    block = {"algorithm": name, "sparsity": 0.9}
    if "freq" in takes:
        block["freq"] = 2
    elif "update" in takes and name != "imp":
        block["update"] = {"freq": 2}
    if "drop_fraction" in takes:
        block["drop_fraction"] = {"type": "constant", "value": 0.3}
    if name == "imp":
        block["prune_fraction"] = 0.5      # 4 levels, one every T_0 = T / 5 steps, rewinding to step 0
    if name == "suptickets":               # 2 cycles of 1 epoch after 3 epochs of RigL
        block.update(cycle=1, cycle_rate=0.4, base_kwargs={"update": {"freq": 2}})
    if name == "sparsify":
        block.update(schedule="iterative", n_steps=3)
    if name in ("gem", "edge_popup"):
        block["sparsity"] = 0.8
    if name == "gem":
        block["iter_period"] = 1
    return block


def _own_loop(name: str) -> bool:
    cls = recipe_class(sparse.create(name))
    return cls is not None and bool(cls.own_loop)


def _algorithms(name: str, model: nn.Module) -> list:
    config, _ = parse_config({"sparsity": _block(name)})
    return plan_sparsity(config, model).algorithms


def _batches(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(SPE)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return mlp((8, 32, 24, 4))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {sp.name: sp.mask.clone() for sp in sparse_params(model)}


def _plain(name: str, batches, epochs: int = EPOCHS, model=None, opt=None, engine_of=None, **engine_kwargs):
    """The reference: the engine in a plain loop over ``batches`` every epoch."""
    model = model or _model()
    opt = opt or _sgd(model)
    engine = (engine_of or (lambda m, o: sparse.Sparsifier(m, o, _algorithms(name, m), **engine_kwargs)))(model, opt)
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, engine


def _engine_kwargs(batches) -> dict:
    return {"total_steps": EPOCHS * len(batches), "steps_per_epoch": len(batches), "data": batches[0]}


# --- the entry points, over the same batches ---------------------------------------------------
def _from_config(name: str, batches):
    model = _model()
    engine_of = lambda m, o: sparse.from_config(m, o, _block(name), **_engine_kwargs(batches))  # noqa: E731
    return _plain(name, batches, model=model, engine_of=engine_of)[0]


def _fastai(name: str, batches):
    from fastai.basics import CrossEntropyLossFlat, DataLoaders, Learner, OptimWrapper
    from fastai.data.load import DataLoader
    from functools import partial
    from fastsparse.integrations.fastai import SparseTrainingCallback

    model = _model()
    dls = DataLoaders(DataLoader(batches, bs=None, shuffle=False), DataLoader(batches[:1], bs=None, shuffle=False))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(),
                    opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9))
    (alg,) = _algorithms(name, model)
    with learn.no_logging(), learn.no_bar():
        learn.fit(EPOCHS, lr=LR, cbs=SparseTrainingCallback(alg))
    return model


def _lightning(name: str, batches):
    import lightning.pytorch as pl
    from fastsparse.integrations.lightning import SparseLightningCallback

    class Module(pl.LightningModule):
        """The MLP's layers as its own children, so that parameter names (which seed random masks) match."""

        def __init__(self, net):
            super().__init__()
            for child_name, child in net.named_children():
                self.add_module(child_name, child)

        def forward(self, x):
            for child in self.children():
                x = child(x)
            return x

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return _sgd(self)

    net = _model()
    module = Module(net)
    (alg,) = _algorithms(name, module)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         callbacks=[SparseLightningCallback(alg, seed=0, data=batches[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return net


# --- the runner, against the plain loop over the runner's own batches --------------------------
def _runner_config(name: str) -> dict:
    return {"seed": 0, "data": {"name": "digits", "batch_size": 256}, "model": {"name": "mlp", "sizes": [64, 32, 10]},
            "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.9}, "lr_schedule": {"name": "constant"},
            "epochs": EPOCHS, "sparsity": _block(name)}


def _runner(name: str, tmp_path):
    from fastsparse.experiments.runner import run

    summary = run(_runner_config(name), tmp_path, progress=False)
    state = torch.load(f"{summary['run_dir']}/model.pt", weights_only=True)
    return {k[: -len("_mask")]: v for k, v in state.items() if k.endswith("_mask")}


def _runner_reference(name: str):
    """The plain loop (or the search driver) over the batches the runner draws, epoch by epoch."""
    data = load_dataset("digits")
    n, bs = len(data.x_train), 256
    order = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=order)
        epochs.append([(data.inputs(data.x_train[perm[i:i + bs]]), data.y_train[perm[i:i + bs]])
                       for i in range(0, n, bs)])
    torch.manual_seed(0)
    model = create_model("mlp", data.input_shape, 10, sizes=[64, 32, 10])
    spe = len(epochs[0])
    if _own_loop(name):
        (alg,) = _algorithms(name, model)
        flat = [b for e in epochs for b in e]
        loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

        class Epochs:   # the search sees each epoch's batches in the runner's order
            def __init__(self):
                self.i = 0

            def __len__(self):
                return spe

            def __iter__(self):
                e, self.i = epochs[self.i], self.i + 1
                return iter(e)

        search(model, alg, Epochs(), loss, EPOCHS, lr=LR, momentum=0.9, seed=0, lr_schedule=sparse.Constant(1.0))
        return _masks(model), flat
    opt = _sgd(model)
    first = (data.inputs(data.x_train[:bs]), data.y_train[:bs])
    engine = sparse.Sparsifier(model, opt, _algorithms(name, model), total_steps=EPOCHS * spe, steps_per_epoch=spe,
                               data=first)
    for batches in epochs:
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return _masks(model), None


# --- the matrix --------------------------------------------------------------------------------------
def _reference(name: str, batches):
    if name == "imp":   # find_ticket: level 0, then 4 levels, each a training of T_0 = 5 steps from step 0
        model = _model()
        used = iter(b for _ in range(EPOCHS) for b in batches)

        def train_fn(m, opt, sched, start):
            for _ in range(start, SPE):
                x, y = next(used)
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()

        (alg,) = _algorithms(name, model)
        ticket = sparse.find_ticket(model, train_fn, _sgd, sparsity=alg.sparsity, prune_fraction=alg.prune_fraction,
                                    scope=alg.scope, total_steps=SPE)
        return ticket.masks
    model, _ = _plain(name, batches, **_engine_kwargs(batches))
    return _masks(model)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", NAMES)
def test_each_method_through_each_entry_point(name, entry, tmp_path):
    if entry == "runner":
        got = _runner(name, tmp_path)
        expected, _ = _runner_reference(name)
    else:
        batches = _batches()
        run = {"from_config": _from_config, "fastai": _fastai, "lightning": _lightning}[entry]
        if _own_loop(name):
            with pytest.raises(Exception) as info:
                run(name, batches)
            refused = info.value
            while not isinstance(refused, sparse.EntryPointRefused) and refused.__cause__ is not None:
                refused = refused.__cause__
            assert isinstance(refused, sparse.EntryPointRefused), repr(info.value)
            assert "`fastsparse train`" in str(refused) and "search(" in str(refused)
            return
        got = _masks(run(name, batches))
        expected = _reference(name, batches)
    assert got.keys() == expected.keys() and got, (name, entry)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (name, entry, k, int((got[k] != expected[k]).sum()))


def test_the_plain_loop_of_a_score_search_is_refused_before_anything_changes():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sparse.EntryPointRefused, match=r"gem trains scores"):
        sparse.Sparsifier(model, _sgd(model), sparse.create("gem"))
    assert not sparse_params(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
