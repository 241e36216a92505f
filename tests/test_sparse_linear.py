"""Sparse execution kernels: forward, input gradient, value gradient and bias gradient equal a
Linear with the masked dense weight; relocation keeps the state of kept weights and zeroes grown
ones; the block-wise top-k equals the dense reference, ties included."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsparse.core.csr import (
    block_rows_for_budget, build_sparse, dense_grad_rows, random_flat, relocate, structure_from_flat, topk_exact,
    topk_inactive_by_grad, topk_inactive_reference,
)
from fastsparse.core.sparse_linear import SparseLinear, SparseLinearFn

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
RTOL = 1e-5


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        assert a.numel() == 0
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def make_mask(out, inp, density, gen, empty_rows=(), dense_rows=()):
    M = torch.rand(out, inp, generator=gen) < density
    for r in empty_rows:
        M[r] = False
    for r in dense_rows:
        M[r] = True
    return M


# (out, in, leading batch dims, density, empty rows, dense rows)
CASES = [
    (7, 5, (3,), 0.4, (0, 4), (2,)),
    (1, 1, (4,), 1.0, (), ()),
    (1, 1, (1,), 1.0, (), ()),
    (16, 32, (2, 3), 0.2, (1,), (5,)),
    (64, 48, (1,), 0.1, (3, 7, 63), (10,)),
    (33, 17, (8,), 0.5, (), (32,)),
    (40, 70, (2, 1, 5), 0.05, (0,), ()),
    (8, 8, (4,), 0.0, (), ()),                 # nnz == 0
    (9, 6, (5,), 1.0, (), ()),                 # fully dense
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-d{c[3]}")
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_matches_masked_dense(case, index_dtype, bias):
    out, inp, lead, density, empty_rows, dense_rows = case
    gen = torch.Generator().manual_seed(hash((out, inp, lead)) % 2**31)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(out, generator=gen))
    M = make_mask(out, inp, density, gen, empty_rows, dense_rows)
    with torch.no_grad():
        lin.weight.mul_(M)
    sp = SparseLinear.from_dense(lin, M, index_dtype=index_dtype)
    assert sp.col.dtype == index_dtype and sp.crow.dtype == index_dtype
    assert sp.perm.dtype == index_dtype
    assert sp.nnz == int(M.sum())
    assert torch.equal(sp.mask(), M)
    assert torch.equal(sp.to_dense(), lin.weight.detach())

    x = torch.randn(*lead, inp, generator=gen)
    gy = torch.randn(*lead, out, generator=gen)
    x_ref = x.clone().requires_grad_(True)
    x_sp = x.clone().requires_grad_(True)
    y_ref = lin(x_ref)
    y_sp = sp(x_sp)
    assert y_sp.shape == y_ref.shape
    assert rel_err(y_sp, y_ref) <= RTOL
    y_ref.backward(gy)
    y_sp.backward(gy)
    assert x_sp.grad.shape == x_ref.grad.shape
    assert rel_err(x_sp.grad, x_ref.grad) <= RTOL
    # grad of the values == dense grad_W at the active positions, CSR (row-major) order
    assert sp.values.grad.shape == (sp.nnz,)
    assert rel_err(sp.values.grad, lin.weight.grad[M]) <= RTOL
    if bias:
        assert rel_err(sp.bias.grad, lin.bias.grad) <= RTOL


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_structure_transpose_and_perm(index_dtype):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(13, 21, generator=gen)
    M = make_mask(13, 21, 0.3, gen, empty_rows=(2,), dense_rows=(5,))
    vals, st = build_sparse(W, M, index_dtype)
    ref = (W * M).to_sparse_csr()
    assert torch.equal(st.crow.long(), ref.crow_indices())
    assert torch.equal(st.col.long(), ref.col_indices())
    assert torch.equal(vals, ref.values())
    refT = (W * M).t().contiguous().to_sparse_csr()
    assert torch.equal(st.crow_t.long(), refT.crow_indices())
    assert torch.equal(st.col_t.long(), refT.col_indices())
    assert torch.equal(vals[st.perm.long()], refT.values())


def test_only_needed_grads_and_no_grad_input():
    gen = torch.Generator().manual_seed(2)
    lin = nn.Linear(20, 12)
    M = make_mask(12, 20, 0.3, gen)
    sp = SparseLinear.from_dense(lin, M)
    x = torch.randn(6, 20, generator=gen)             # does not require grad
    sp(x).pow(2).sum().backward()
    assert sp.values.grad is not None and sp.bias.grad is not None
    # values frozen, only x needs grad
    sp.values.requires_grad_(False)
    sp.bias.requires_grad_(False)
    xr = x.clone().requires_grad_(True)
    sp(xr).sum().backward()
    ref = torch.ones(6, 12) @ sp.to_dense()
    assert rel_err(xr.grad, ref) <= RTOL


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    M = make_mask(6, 5, 0.5, gen, empty_rows=(1,), dense_rows=(3,))
    vals, st = build_sparse(W, M)
    vals.requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: SparseLinearFn.apply(x, v, b, st), (x, vals, b))


def test_training_matches_masked_sgd_momentum():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    dense = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 10))
    masks = [make_mask(40, 30, 0.3, gen), make_mask(10, 40, 0.5, gen)]
    with torch.no_grad():
        dense[0].weight.mul_(masks[0])
        dense[2].weight.mul_(masks[1])
    twin = copy.deepcopy(dense)   # from_dense keeps the layer's own bias Parameter
    sparse = nn.Sequential(SparseLinear.from_dense(twin[0], masks[0]), nn.ReLU(),
                           SparseLinear.from_dense(twin[2], masks[1]))
    od = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    osp = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(5):
        x = torch.randn(16, 30, generator=gen)
        t = torch.randint(0, 10, (16,), generator=gen)
        for model, opt in ((dense, od), (sparse, osp)):
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            opt.step()
        with torch.no_grad():
            dense[0].weight.mul_(masks[0])
            dense[2].weight.mul_(masks[1])
    assert rel_err(sparse[0].to_dense(), dense[0].weight) <= 1e-5
    assert rel_err(sparse[2].to_dense(), dense[2].weight) <= 1e-5
    assert rel_err(sparse[2].bias, dense[2].bias) <= 1e-5


# --------------------------------------------------------------------------- #
# relocate
# --------------------------------------------------------------------------- #
def _dense_of(st, v, shape):
    D = torch.zeros(shape[0] * shape[1], dtype=v.dtype)
    D[st.flat()] = v
    return D.view(shape)


@pytest.mark.parametrize("form", ["mask", "flat_sorted", "flat_unsorted", "structure"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_relocate_keeps_state_and_zeros_grown(form, index_dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (23, 31)
    M_old = make_mask(*shape, 0.2, gen, empty_rows=(0,), dense_rows=(7,))
    W = torch.randn(shape, generator=gen)
    vals, st = build_sparse(W, M_old, index_dtype)
    mom = torch.randn(st.nnz, generator=gen)
    ea = torch.randn(st.nnz, generator=gen)
    eas = torch.rand(st.nnz, generator=gen)
    # new mask: drop ~half of the old, grow some new
    drop = torch.rand(shape, generator=gen) < 0.5
    grow = (torch.rand(shape, generator=gen) < 0.1) & ~M_old
    M_new = (M_old & ~drop) | grow
    M_new[0] = True                                   # grow a full previously-empty row
    flat = M_new.reshape(-1).nonzero().squeeze(1)
    if form == "mask":
        new = M_new
    elif form == "flat_sorted":
        new = flat
    elif form == "flat_unsorted":
        new = torch.cat([flat[torch.randperm(flat.numel(), generator=gen)], flat[:3]])  # + duplicates
    else:
        new = structure_from_flat(flat, shape, index_dtype)
    new_st, nv, nm, nea, none, neas = relocate(st, new, vals, mom, ea, None, eas)
    assert none is None
    assert new_st.nnz == int(M_new.sum())
    assert new_st.col.dtype == index_dtype
    kept = M_old & M_new
    grown = M_new & ~M_old
    for old_t, new_t in ((vals, nv), (mom, nm), (ea, nea), (eas, neas)):
        Do, Dn = _dense_of(st, old_t, shape), _dense_of(new_st, new_t, shape)
        assert torch.equal(Dn[kept], Do[kept])
        assert torch.all(Dn[grown] == 0)
        assert torch.all(Dn[~M_new] == 0)
    # the new structure is consistent
    ref_vals, ref_st = build_sparse(_dense_of(new_st, nv, shape), M_new, index_dtype)
    for name in ("crow", "col", "crow_t", "col_t", "perm"):
        assert torch.equal(getattr(new_st, name), getattr(ref_st, name)), name


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_update_structure_moves_optimizer_state(opt_name):
    gen = torch.Generator().manual_seed(6)
    lin = nn.Linear(12, 9)
    M = make_mask(9, 12, 0.4, gen)
    sp = SparseLinear.from_dense(lin, M)
    opt = (torch.optim.SGD(sp.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(sp.parameters(), lr=0.1))
    x = torch.randn(5, 12, generator=gen)
    for _ in range(2):
        opt.zero_grad()
        sp(x).pow(2).sum().backward()
        opt.step()
    keys = ["momentum_buffer"] if opt_name == "sgd" else ["exp_avg", "exp_avg_sq"]
    before = {k: _dense_of(sp.structure, opt.state[sp.values][k], (9, 12)) for k in keys}
    W_before = sp.to_dense()
    M_new = (M & (torch.rand(9, 12, generator=gen) < 0.6)) | (torch.rand(9, 12, generator=gen) < 0.2)
    sp.update_structure(M_new, opt)
    assert torch.equal(sp.mask(), M_new)
    kept, grown = M & M_new, M_new & ~M
    assert torch.equal(sp.to_dense()[kept], W_before[kept])
    assert torch.all(sp.to_dense()[grown] == 0)
    for k in keys:
        after = _dense_of(sp.structure, opt.state[sp.values][k], (9, 12))
        assert opt.state[sp.values][k].shape == sp.values.shape
        assert torch.equal(after[kept], before[k][kept])
        assert torch.all(after[grown] == 0)
    # training continues
    opt.zero_grad()
    sp(x).pow(2).sum().backward()
    opt.step()


# --------------------------------------------------------------------------- #
# RigL growth scoring
# --------------------------------------------------------------------------- #
def test_dense_grad_rows():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 10, generator=gen)
    gy = torch.randn(3, 4, 8, generator=gen)
    full = gy.reshape(-1, 8).t() @ x.reshape(-1, 10)
    assert rel_err(dense_grad_rows(x, gy, 2, 6), full[2:6]) <= RTOL
    assert block_rows_for_budget(4096) == 1024


@pytest.mark.parametrize("shape,batch,density,k", [
    ((50, 40), 16, 0.1, 30), ((64, 33), 8, 0.5, 100), ((7, 5), 3, 0.3, 1000),
    ((128, 96), 32, 0.02, 257), ((1, 1), 2, 0.0, 1), ((10, 10), 4, 1.0, 5)])
@pytest.mark.parametrize("block_rows", [1, 3, 16, None])
def test_topk_inactive_matches_dense_reference_random(shape, batch, density, k, block_rows):
    gen = torch.Generator().manual_seed(8)
    out, inp = shape
    M = make_mask(out, inp, density, gen)
    W = torch.randn(out, inp, generator=gen)
    _, st = build_sparse(W, M)
    x = torch.randn(batch, inp, generator=gen)
    gy = torch.randn(batch, out, generator=gen)
    got = topk_inactive_by_grad(x, gy, st, k, block_rows=block_rows)
    ref = topk_inactive_reference(x, gy, M, k)
    assert torch.equal(got, ref)
    assert not M.reshape(-1)[got].any()


@pytest.mark.parametrize("block_rows", [1, 2, 5, 64])
def test_topk_inactive_ties(block_rows):
    gen = torch.Generator().manual_seed(9)
    out, inp = 24, 18
    M = make_mask(out, inp, 0.3, gen)
    _, st = build_sparse(torch.ones(out, inp), M)
    # small integers -> exact products, many exact ties in |grad| (incl. many zeros)
    x = torch.randint(-1, 2, (4, inp), generator=gen).float()
    gy = torch.randint(-1, 2, (4, out), generator=gen).float()
    for k in (1, 7, 50, 200, 10_000):
        got = topk_inactive_by_grad(x, gy, st, k, block_rows=block_rows)
        ref = topk_inactive_reference(x, gy, M, k)
        assert torch.equal(got, ref), k
    # all-equal gradients: must pick the lowest inactive flat indices
    x1, g1 = torch.ones(2, inp), torch.ones(2, out)
    got = topk_inactive_by_grad(x1, g1, st, 10, block_rows=block_rows)
    assert torch.equal(got, (~M).reshape(-1).nonzero().squeeze(1)[:10])


def _ref_topk(scores, k):
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values


@pytest.mark.parametrize("n,k", [(100_000, 5_000), (200_000, 150_000), (50_000, 2_048), (10, 3)])
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros_mass", "sorted"])
def test_topk_exact(n, k, kind):
    gen = torch.Generator().manual_seed(10)
    if kind == "randn":
        s = torch.randn(n, generator=gen).abs()
    elif kind == "ties":
        s = torch.randint(0, 7, (n,), generator=gen).float()
    elif kind == "zeros_mass":
        s = torch.where(torch.rand(n, generator=gen) < 0.97, torch.zeros(n), torch.rand(n, generator=gen))
    else:
        s = torch.arange(n, dtype=torch.float32)          # adversarial for strided sampling
    s[:: max(1, n // 97)] = -math.inf                      # "active" positions
    assert torch.equal(topk_exact(s, k), _ref_topk(s, k))


@pytest.mark.parametrize("block_rows", [7, 64, 1000])
@pytest.mark.parametrize("kind", ["random", "ties", "dead_units"])
def test_topk_inactive_large_k(block_rows, kind):
    """Large k exercises the sampled-threshold path and the pool pruning."""
    gen = torch.Generator().manual_seed(11)
    out, inp, batch = 300, 400, 16
    M = make_mask(out, inp, 0.1, gen)
    _, st = build_sparse(torch.ones(out, inp), M)
    if kind == "ties":
        x = torch.randint(-2, 3, (batch, inp), generator=gen).float()
        gy = torch.randint(-2, 3, (batch, out), generator=gen).float()
    else:
        x = torch.randn(batch, inp, generator=gen)
        gy = torch.randn(batch, out, generator=gen)
    if kind == "dead_units":                               # many exactly-zero gradient rows/cols
        gy[:, ::3] = 0
        x[:, ::2] = 0
    for k in (3_000, 20_000, 60_000):
        got = topk_inactive_by_grad(x, gy, st, k, block_rows=block_rows)
        ref = topk_inactive_reference(x, gy, M, k)
        assert torch.equal(got, ref), k


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 5, (1 << 18) - 1, (1 << 18) + 7])
def test_gather_split_over_threads_equals_index_select(n, threads):
    from fastsparse.core.sparse_linear import PARALLEL_GATHER, gather

    assert PARALLEL_GATHER == 1 << 18   # the sizes above straddle it
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n + 11, generator=g)
    index = torch.randperm(n + 11, generator=g)[:n].to(torch.int32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gather(values, index)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == values.dtype and torch.equal(out, values.index_select(0, index))
