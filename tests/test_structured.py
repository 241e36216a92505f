"""Structured selection: granularities, local/global group selection, N:M."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastsparse.core.masks import n_keep, select_params
from fastsparse.core.structured import (
    granularity_dims, group_scores, nm_keep_for, nm_mask, parse_nm, prune_masks, select_masks,
    valid_granularities,
)

from helpers import ConvNet, mlp


def _kept_vs_pruned(scores, masks):
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    pruned = torch.cat([s[~m] for s, m in zip(scores, masks)])
    return kept, pruned


# --- granularities ---------------------------------------------------------------------------
def test_granularity_dims_by_layer_type():
    lin, conv = nn.Linear(6, 4), nn.Conv2d(3, 5, 3)
    assert granularity_dims(lin, (4, 6), "row") == (1,)        # an output neuron: all its inputs
    assert granularity_dims(lin, (4, 6), "column") == (0,)     # an input feature: all outputs
    assert granularity_dims(conv, (5, 3, 3, 3), "filter") == (1, 2, 3)
    assert granularity_dims(conv, (5, 3, 3, 3), "kernel") == (2, 3)
    assert granularity_dims(conv, (5, 3, 3, 3), "channel") == (1,)
    assert granularity_dims(conv, (5, 3, 3, 3), "row") == (3,)
    assert granularity_dims(conv, (5, 3, 3, 3), "column") == (2,)
    convt = nn.ConvTranspose2d(3, 5, 3)  # weight (in, out, kh, kw)
    assert granularity_dims(convt, (3, 5, 3, 3), "filter") == (0, 2, 3)


def test_unknown_granularity_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'filter' does not exist for Linear; valid: \['weight', 'row', 'column', 'layer'\]"):
        granularity_dims(nn.Linear(3, 2), (2, 3), "filter")
    with pytest.raises(ValueError, match="kernel"):
        granularity_dims(nn.Conv2d(1, 2, 3), (2, 1, 3, 3), "neuron")
    assert "row" not in valid_granularities(nn.Conv1d(2, 2, 3), (2, 2, 3))


def test_group_score_is_the_mean():
    s = torch.arange(6.0).view(2, 3)
    assert group_scores(s, (1,)).flatten().tolist() == [1.0, 4.0]
    assert group_scores(s, (0,)).flatten().tolist() == [1.5, 2.5, 3.5]


# --- local and global selection ----------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.95))
def test_local_element_selection_exact_and_ordered(seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(7, 5, generator=g), torch.randn(3, 11, generator=g)]
    masks = select_masks(scores, None, sparsity, "local")
    for s, m in zip(scores, masks):
        assert m.dtype == torch.bool and m.shape == s.shape
        assert int(m.sum()) == n_keep(s.numel(), sparsity)
        if m.any() and (~m).any():
            assert s[~m].max() <= s[m].min()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.9))
def test_global_element_selection_one_threshold(seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(20, 10, generator=g), torch.randn(10, 5, generator=g) * 3]
    masks = select_masks(scores, None, sparsity, "global", reserve=False)
    assert sum(int(m.sum()) for m in masks) == n_keep(250, sparsity)
    kept, pruned = _kept_vs_pruned(scores, masks)
    if len(kept) and len(pruned):
        assert pruned.max() <= kept.min()


def test_global_never_empties_a_layer():
    scores = [torch.full((4, 4), 100.0) + torch.rand(4, 4), torch.rand(3, 3) * 1e-3]
    masks = select_masks(scores, None, 0.5, "global")
    assert int(masks[1].sum()) == 1 and int(masks[1].view(-1).float().argmax()) == int(scores[1].argmax())
    assert sum(int(m.sum()) for m in masks) == n_keep(25, 0.5)
    unreserved = select_masks(scores, None, 0.5, "global", reserve=False)
    assert int(unreserved[1].sum()) == 0


def test_ties_go_to_the_lowest_index():
    masks = select_masks([torch.ones(2, 5)], None, 0.7, "local")
    assert masks[0].view(-1).tolist() == [True, True, True] + [False] * 7


@pytest.mark.parametrize("granularity", ["row", "column"])
def test_linear_structured_local(granularity):
    torch.manual_seed(1)
    lin = nn.Linear(10, 8)
    sp = [p for p in select_params(nn.Sequential(lin))]
    scores = [lin.weight.detach().abs()]
    mask = prune_masks(sp, scores, 0.5, granularity, "local")[0]
    dim = 1 if granularity == "row" else 0
    groups = mask.all(dim=dim)
    assert torch.equal(groups, mask.any(dim=dim))          # every group all-or-nothing
    g = group_scores(scores[0], (dim,)).flatten()
    assert int(groups.sum()) == n_keep(g.numel(), 0.5)
    assert g[~groups].max() <= g[groups].min()


def test_conv_filter_pruning_zeroes_whole_filters_global():
    torch.manual_seed(0)
    model = ConvNet()
    model.conv2 = nn.Conv2d(4, 6, 3)
    sps = select_params(model)
    scores = [sp.param.detach().abs() for sp in sps]
    dims = [granularity_dims(sp.module, tuple(sp.param.shape), "filter" if sp.param.dim() == 4 else "row")
            for sp in sps]
    masks = select_masks(scores, dims, 0.5, "global")
    total = sum(s.numel() for s in scores)
    kept = sum(int(m.sum()) for m in masks)
    biggest_group = max(s.numel() // s.shape[0] for s in scores)
    assert abs(kept - n_keep(total, 0.5)) <= biggest_group
    for sp, m, d in zip(sps, masks, dims):
        per_filter = m.flatten(1)
        assert torch.equal(per_filter.all(1), per_filter.any(1))   # a pruned filter is zero in every element
    gs = [group_scores(s, d).flatten() for s, d in zip(scores, dims)]
    kg = torch.cat([g[m.flatten(1).any(1)] for g, m in zip(gs, masks)])
    pg = torch.cat([g[~m.flatten(1).any(1)] for g, m in zip(gs, masks)])
    reserved = torch.stack([g.max() for g in gs])
    ordinary_kept = kg[~torch.isin(kg, reserved)]
    if len(pg) and len(ordinary_kept):
        assert pg.max() <= ordinary_kept.min()


def test_selection_is_nested_when_masks_are_given():
    torch.manual_seed(0)
    s = torch.randn(10, 10)
    first = select_masks([s], None, 0.5, "local")[0]
    rescored = torch.randn(10, 10)  # new scores: the second mask must still lie inside the first
    second = select_masks([rescored], None, 0.8, "local", [first])[0]
    assert int(second.sum()) == 20 and not (second & ~first).any()
    grown = select_masks([rescored], None, 0.3, "local", [second])[0]
    assert int(grown.sum()) == 70 and not (second & ~grown).any()


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        select_masks([torch.tensor([1.0, float("nan")])], None, 0.5)


# --- N:M -------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]))
def test_nm_holds_in_every_group(seed, nm):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, 16, generator=g)
    mask = nm_mask(s, n, m)
    blocks = mask.view(6, 16 // m, m)
    assert (blocks.sum(-1) == n).all()
    sb = s.view(6, 16 // m, m)
    kept_min = torch.where(blocks, sb, torch.tensor(float("inf"))).amin(-1)
    pruned_max = torch.where(~blocks, sb, torch.tensor(float("-inf"))).amax(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_on_conv_runs_along_input_channels():
    s = torch.randn(2, 8, 3, 3)
    mask = nm_mask(s, 2, 4, dim=1)
    assert (mask.view(2, 2, 4, 3, 3).sum(2) == 2).all()


def test_nm_nested_from_a_denser_pattern():
    s = torch.randn(4, 8)
    m34 = nm_mask(s, 3, 4)
    m24 = nm_mask(-s, 2, 4, mask=m34)
    assert not (m24 & ~m34).any() and (m24.view(4, 2, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("n, m, size, match", [
    (4, 4, 8, "1 ≤ N < M"), (5, 4, 8, "1 ≤ N < M"), (0, 4, 8, "1 ≤ N < M"), (2, 4, 10, "does not divide"),
])
def test_bad_nm(n, m, size, match):
    with pytest.raises(ValueError, match=match):
        nm_mask(torch.randn(3, size), n, m)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm("filter") is None
    with pytest.raises(ValueError, match="1 ≤ N < M"):
        parse_nm("4:2")
    with pytest.raises(ValueError, match="two integers"):
        parse_nm("a:b")


def test_nm_schedule_steps_from_dense():
    assert [nm_keep_for(f, 2, 4) for f in (0.0, 0.3, 0.5, 1.0)] == [4, 3, 3, 2]


def test_local_sparsities_per_layer_and_errors():
    net = mlp()
    sps = select_params(net)
    scores = [sp.param.detach().abs() for sp in sps]
    masks = prune_masks(sps, scores, [0.1, 0.5, 0.9], "weight", "local")
    assert [int(m.sum()) for m in masks] == [n_keep(s.numel(), x) for s, x in zip(scores, [0.1, 0.5, 0.9])]
    with pytest.raises(ValueError, match="one model sparsity"):
        prune_masks(sps, scores, [0.1, 0.5, 0.9], "weight", "global")
    with pytest.raises(ValueError, match="scope"):
        prune_masks(sps, scores, 0.5, "weight", "layer")
