"""Lottery tickets: IMP by levels with rewinding, and the in-fit sparsify scheduler (lth)."""
import copy
import math

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.core.masks import n_keep

from helpers import ConvNet, batch, mlp


def _conv_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class Recorder:
    """A train function: SGD steps on one batch, recording what the driver hands it."""

    def __init__(self, data, steps=12, record_at=None):
        self.data, self.steps, self.record_at = data, steps, record_at
        self.calls = []
        self.state_at_k = None

    def __call__(self, model, opt, sched, start_step):
        x, y = self.data
        self.calls.append({"start": start_step, "opt": opt, "fresh": len(opt.state) == 0,
                           "lr": opt.param_groups[0]["lr"], "state": {k: v.clone() for k, v in model.state_dict().items()}})
        for step in range(start_step, self.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()
            if self.record_at is not None and step + 1 == self.record_at and start_step == 0:
                self.state_at_k = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            return {"loss": float(nn.functional.cross_entropy(model(x), y))}


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_imp_levels_nested_and_at_08_power(scope):
    torch.manual_seed(0)
    model = mlp((8, 40, 30, 4))
    train = Recorder(batch(), steps=5)
    masks_by_level = []

    def recording(model, opt, sched, start):
        masks_by_level.append([b.clone() for n, b in model.named_buffers() if n.endswith("_mask")])
        return train(model, opt, sched, start)

    ticket = sparse.find_ticket(model, recording, _sgd, levels=4, scope=scope)
    assert [r["level"] for r in ticket.levels] == [0, 1, 2, 3, 4]
    for earlier, later in zip(masks_by_level, masks_by_level[1:]):
        assert all(not (b & ~a).any() for a, b in zip(earlier, later))
    for r in ticket.levels:
        L = r["level"]
        if scope == "local":   # within one weight per layer (in fact round((1 - p)^L · N))
            for name, m in ticket.masks.items():
                assert abs(r["active"][name] - 0.8 ** L * m.numel()) <= 0.5 + 1e-9
        else:
            total = sum(m.numel() for m in ticket.masks.values())
            assert abs(sum(r["active"].values()) - 0.8 ** L * total) <= 0.5 + 1e-9
    assert ticket.density == pytest.approx(0.8 ** 4, abs=1 / 400)


def test_imp_prunes_the_smallest_surviving_weights():
    torch.manual_seed(1)
    model = mlp((8, 40, 30, 4))
    engine = sparse.Sparsifier(model, _sgd(model), sparse.IMP(0.9, scope="global"), total_steps=1000)
    params = engine.groups[0].params
    alg = engine.groups[0].algorithm
    new = alg.level_masks(params, 1)
    w = [sp.param.detach().abs() for sp in params]
    assert torch.cat([a[~m] for a, m in zip(w, new)]).max() <= torch.cat([a[m] for a, m in zip(w, new)]).min()
    total = sum(m.numel() for m in new)
    assert sum(int(m.sum()) for m in new) == n_keep(total, 0.2)
    assert alg.levels == math.ceil(math.log(0.1) / math.log(0.8))


def test_imp_with_target_lands_on_it():
    torch.manual_seed(0)
    model = mlp((8, 40, 30, 4))
    ticket = sparse.find_ticket(model, Recorder(batch(), steps=3), _sgd, sparsity=0.9, scope="local")
    assert len(ticket.levels) == 1 + 11
    for name, m in ticket.masks.items():
        assert int(m.sum()) == n_keep(m.numel(), 0.9)


def test_rewinding_restores_weights_and_bn_buffers_bit_for_bit():
    torch.manual_seed(0)
    model = ConvNet()
    train = Recorder(_conv_data(), steps=12, record_at=4)
    ticket = sparse.find_ticket(model, train, _sgd, levels=2, rewind_step=4, make_scheduler=_cosine, total_steps=12)
    ref = train.state_at_k
    assert train.calls[0]["start"] == 0 and [c["start"] for c in train.calls[1:]] == [4, 4]
    lr_at_4 = 0.1 * (1 + math.cos(math.pi * 4 / 12)) / 2
    for call in train.calls[1:]:
        assert call["fresh"]
        assert call["lr"] == pytest.approx(lr_at_4, rel=1e-9)
        state = call["state"]
        for k, v in ref.items():
            if k.endswith("_mask"):
                continue
            mask = state.get(k + "_mask")
            expected = v * mask if mask is not None else v
            assert torch.equal(state[k], expected), k
    assert "bn.running_mean" in ref and not torch.equal(ref["bn.running_mean"], torch.zeros(4))
    assert len({id(c["opt"]) for c in train.calls}) == 3
    # the ticket replays onto a fresh model
    other = ConvNet()
    ticket.apply(other)
    for k, v in ticket.rewind_state.items():
        mask = ticket.masks.get(k)
        assert torch.equal(other.state_dict()[k], v * mask if mask is not None else v)


def test_imp_bad_input():
    model = mlp()
    called = []

    def train(model, opt, sched, start):
        called.append(start)
        for _ in range(3):
            opt.step()

    for p in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"prune_fraction .* in \(0, 1\)"):
            sparse.find_ticket(model, train, _sgd, levels=2, prune_fraction=p)
    with pytest.raises(ValueError, match="after the end of training"):
        sparse.find_ticket(model, train, _sgd, levels=2, rewind_step=10, total_steps=5)
    assert called == [] and not sparse.sparse_params(model)
    with pytest.raises(ValueError, match="after the end of training: level 0 made 3 optimizer steps"):
        sparse.find_ticket(model, train, _sgd, levels=2, rewind_step=10)
    with pytest.raises(ValueError, match="levels"):
        sparse.find_ticket(model, train, _sgd)
    with pytest.raises(ValueError, match="prune_fraction"):
        sparse.IMP(0.9, prune_fraction=1.0)


def _global_batches(n=14, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_imp_in_one_run_is_find_ticket_with_the_same_batches():
    # levels spread over 14 steps: T_0 = ⌈(14 + 2 · 2) / 3⌉ = 6, boundaries 6 and 10, rewinding to step 2
    batches = _global_batches()
    torch.manual_seed(0)
    init = mlp((8, 40, 30, 4))
    ref, run = copy.deepcopy(init), copy.deepcopy(init)
    used = iter(batches)

    def train_fn(model, opt, sched, start):
        for _ in range(start, 6):
            x, y = next(used)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

    ticket = sparse.find_ticket(ref, train_fn, _sgd, sparsity=0.75, prune_fraction=0.5, rewind_step=2,
                                make_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 6),
                                scope="local", total_steps=6)
    opt = _sgd(run)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6)   # the user's schedule, over one level
    engine = sparse.Sparsifier(run, opt, sparse.IMP(0.75, prune_fraction=0.5, rewind_step=2, scope="local"),
                               total_steps=14)
    assert engine.schedule_steps() == 6 and engine.groups[0].algorithm.plan(engine.clock()).boundaries == (6, 10)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
        sched.step()
    assert [r["step"] for r in engine.history] == [6, 10]
    for name, mask in ticket.masks.items():
        assert torch.equal(dict(run.named_buffers())[name + "_mask"], mask)
        assert int(mask.sum()) == round(0.25 * mask.numel())
    for (n, a), b in zip(ref.state_dict().items(), run.state_dict().values()):
        assert torch.equal(a, b), n


def test_imp_refuses_what_cannot_reach_its_target():
    model = mlp()
    with pytest.raises(TypeError, match="update"):
        sparse.IMP(0.9, update=sparse.UpdateSchedule(steps=[3, 6]))
    with pytest.raises(ValueError, match="pass total_steps"):
        sparse.Sparsifier(model, _sgd(model), sparse.IMP(0.9))
    with pytest.raises(ValueError, match=r"11 levels .* 20 training steps are too few"):
        sparse.Sparsifier(model, _sgd(model), sparse.IMP(0.9), total_steps=20)
    assert not sparse.sparse_params(model)


# --- in-fit lottery tickets (fasterai's lth=True) ---------------------------------------------------
def _fit(sched, model, opt, epochs=10, steps_per_epoch=4, seed=0):
    x, y = batch(seed=seed)
    total = epochs * steps_per_epoch
    events = []
    for epoch in range(epochs):
        sched.before_epoch(epoch)
        for i in range(steps_per_epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step = epoch * steps_per_epoch + i + 1
            if sched.step(step / total):
                events.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
    sched.end()
    return events


def test_lth_resets_weights_after_each_pruning_event():
    torch.manual_seed(0)
    model = mlp((8, 40, 30, 4))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _sgd(model)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.5, granularity="weight", context="global",
                                     criteria="large_final", schedule="iterative", lth=True)
    events = _fit(sched, model, opt)
    assert len(events) == 3                          # fasterai's iterative: 3 pruning rounds
    sparsities = [e["sparsity"] for e in sched.events]
    assert sparsities == pytest.approx([0.5 / 3, 1 / 3, 0.5], abs=1 / 1000)
    for _, state in events:
        for k, v in init.items():
            mask = state.get(k + "_mask")
            assert torch.equal(state[k], v * mask if mask is not None else v), k


def test_lth_rewind_epoch_and_reset_end():
    torch.manual_seed(0)
    model = mlp((8, 40, 30, 4))
    opt = _sgd(model)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.6, context="local", schedule="one_shot", start=0.5,
                                     lth=True, rewind_epoch=2, reset_end=True, reset_optimizer=True)
    x, y = batch()
    snapshots = {}
    for epoch in range(6):
        sched.before_epoch(epoch)
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            changed = sched.step((epoch * 4 + i + 1) / 24)
            if changed:
                assert len(opt.state) == 0
    sched.end()
    assert len(sched.events) == 1 and sched.sparsity() == pytest.approx(0.6, abs=1 / 300)
    for k, v in snapshots[2].items():
        if k.endswith("_mask"):
            continue
        mask = model.state_dict().get(k + "_mask")
        assert torch.equal(model.state_dict()[k], v * mask if mask is not None else v), k


def test_lth_without_the_rewind_epoch_is_refused():
    model = mlp()
    opt = _sgd(model)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.5, schedule="one_shot", start=0.0, lth=True,
                                     rewind_epoch=1)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="rewind_epoch 1"):
        sched.step(0.1)
    with pytest.raises(ValueError, match="rewind_epoch"):
        sparse.SparsifyScheduler(mlp(), None, rewind_epoch=-1)


@pytest.mark.parametrize("granularity, context", [("row", "local"), ("column", "global"), ("2:4", "local")])
def test_sparsify_structured_and_nm(granularity, context):
    torch.manual_seed(0)
    model = mlp((8, 40, 32, 4))
    opt = _sgd(model)
    sparsity = 0.5
    sched = sparse.SparsifyScheduler(model, opt, sparsity=sparsity, granularity=granularity, context=context,
                                     schedule="agp", start=0.0, end=0.5)
    _fit(sched, model, opt)
    for sp in sched.engine.groups[0].params:
        m = sp.mask
        if granularity == "row":
            assert torch.equal(m.all(1), m.any(1)) and int(m.all(1).sum()) == n_keep(m.shape[0], 0.5)
        elif granularity == "column":
            assert torch.equal(m.all(0), m.any(0))
        else:
            assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all()
        assert (sp.param[~m] == 0).all()


def test_sparsify_bad_input():
    with pytest.raises(ValueError, match=r"'2:4' means sparsity 0.5"):
        sparse.Sparsify(0.9, granularity="2:4")
    with pytest.raises(ValueError, match="does not divide"):
        sparse.SparsifyScheduler(mlp((8, 10, 4)), None, sparsity=0.5, granularity="2:4")
    with pytest.raises(ValueError, match="starts after it ends"):
        sparse.Sparsify(0.5, schedule="lin", start=0.8, end=0.2)
    with pytest.raises(ValueError, match="unknown criterion"):
        sparse.Sparsify(0.5, criteria="biggest")


def test_dsd_schedule_returns_to_dense():
    torch.manual_seed(0)
    model = mlp((8, 40, 30, 4))
    opt = _sgd(model)
    sched = sparse.SparsifyScheduler(model, opt, sparsity=0.5, schedule="dsd")
    _fit(sched, model, opt)
    peak = max(e["sparsity"] for e in sched.events)
    assert peak == pytest.approx(0.5, abs=0.02) and sched.sparsity() == 0.0
