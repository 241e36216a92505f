"""The two speed-ups behind benchmarks/overhead.py keep their answers exact.

* ``topk_mask`` on a tensor of 2**20 elements or more bounds its threshold with a sample
  before selecting exactly: it must still equal a sort (exact count; ties at the threshold
  to the lowest flat index), whatever the data, including data that defeats the sample.
* The engine's hot path multiplies CPU weights by mask copies in the weights' dtype: after
  any in-place change of a mask (an update, ``load_state_dict``, a direct write), the next
  step must enforce the new mask, not the cached one.
"""
from __future__ import annotations

import pytest
import torch

import fastsparse as sparse
from fastsparse.core import masks as masks_mod
from helpers import mlp

N = (1 << 20) + 37  # above the size from which the bound is used


def reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties to the lowest flat index: a stable descending sort."""
    flat = scores.reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(scores.shape)


def _cases():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(N, generator=g)
    few_values = torch.randint(0, 7, (N,), generator=g).float()       # ties everywhere
    constant = torch.full((N,), 0.25)
    with_inf = normal.clone()
    with_inf[torch.rand(N, generator=g) < 0.9] = float("-inf")       # excluded positions, as masks make them
    ramp = torch.arange(N, dtype=torch.float32)                        # sorted: large values all at the end
    spikes = torch.zeros(N)
    spikes[::4096] = 1.0                                               # few large values on a stride
    return {"normal": normal, "few_values": few_values, "constant": constant, "with_inf": with_inf,
            "ramp": ramp, "ramp_reversed": ramp.flip(0), "spikes": spikes,
            "half": normal.to(torch.float16), "matrix": normal[: 1024 * 1024].view(1024, 1024)}


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fraction", [1e-5, 0.003, 0.03, 0.3, 0.5, 0.7, 0.97, 0.99999])
def test_topk_mask_large_equals_sort(name, fraction):
    scores = CASES[name]
    n = scores.numel()
    k = max(1, min(n - 1, round(fraction * n)))
    got = sparse.topk_mask(scores, k)
    assert got.shape == scores.shape and got.dtype == torch.bool
    assert int(got.count_nonzero()) == k
    assert torch.equal(got, reference_topk(scores, k))


def test_topk_mask_bound_that_misses_falls_back(monkeypatch):
    """A sample that sees none of the large values gives a bound that too few values reach:
    the full selection must run and the answer stay exact."""
    scores = CASES["spikes"]  # 257 ones on a stride of 4096, zeros elsewhere
    monkeypatch.setattr(masks_mod, "_SAMPLE", 64)
    k = 200
    assert torch.equal(sparse.topk_mask(scores, k), reference_topk(scores, k))
    k = 1000  # 257 ones then the lowest-index zeros
    got = sparse.topk_mask(scores, k)
    assert torch.equal(got, reference_topk(scores, k))
    assert bool(got[:4096 * 3].all()) is False and int(got.count_nonzero()) == k


def test_topk_mask_large_rejects_nan():
    scores = CASES["normal"].clone()
    scores[12345] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparse.topk_mask(scores, 1000)


def _engine(model, dtype=torch.float32):
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sparse.Sparsifier(model, opt, sparse.create("static", sparsity=0.8))
    return model, opt, engine


def _step(model, opt, dtype=torch.float32):
    x = torch.randn(16, 8, dtype=dtype)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _exactly_sparse(model) -> None:
    for sp in sparse.sparse_params(model):
        assert int((sp.param.detach()[~sp.mask] != 0).sum()) == 0, sp.name
        assert int((sp.param.detach()[sp.mask] == 0).sum()) == 0, sp.name  # active weights stay nonzero here


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hot_path_follows_in_place_mask_changes(dtype):
    model, opt, engine = _engine(mlp(), dtype)
    for _ in range(3):
        _step(model, opt, dtype)
    _exactly_sparse(model)
    sp = sparse.sparse_params(model)[0]
    # a direct in-place write: move the mask to a different random set of positions
    new = sparse.topk_mask(torch.rand(sp.mask.shape), int(sp.mask.sum()))
    assert not torch.equal(new, sp.mask)
    with torch.no_grad():
        sp.param.add_(1.0)  # every position nonzero before the step
    sp.mask.copy_(new)
    _step(model, opt, dtype)
    _exactly_sparse(model)


def test_hot_path_follows_load_state_dict():
    model, opt, engine = _engine(mlp())
    _step(model, opt)
    other = mlp()
    sparse.Sparsifier(other, None, sparse.create("static", sparsity=0.5), seed=3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())  # copies the masks into the buffers in place
    _step(model, opt)
    _exactly_sparse(model)
    assert abs(engine.sparsity() - 0.5) < 0.01


def test_hot_path_follows_engine_updates():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alg = sparse.create("set", sparsity=0.8, update=sparse.UpdateSchedule(freq=2), drop_fraction=0.5)
    engine = sparse.Sparsifier(model, opt, alg, total_steps=100)
    for _ in range(10):
        _step(model, opt)
        for sp in sparse.sparse_params(model):
            assert int((sp.param.detach()[~sp.mask] != 0).sum()) == 0
    assert len(engine.history) == 5 and all(r["changed"] > 0 for r in engine.history)


def test_hot_path_follows_a_replaced_mask_buffer():
    """A new tensor in place of the (first) mask buffer, as ``model.to()`` or
    ``load_state_dict(assign=True)`` do it: the engine refreshes and drops its copies."""
    model, opt, engine = _engine(mlp())
    _step(model, opt)
    sp = sparse.sparse_params(model)[0]
    new = sparse.topk_mask(torch.rand(sp.mask.shape), int(sp.mask.sum()))
    assert not torch.equal(new, sp.mask)
    sp.module._buffers[sp.attr + "_mask"] = new
    with torch.no_grad():
        sp.param.add_(1.0)
    _step(model, opt)
    _exactly_sparse(model)
