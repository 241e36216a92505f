"""masks.py: exact top-k selection, its tie-break, parameter selection, mask buffers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastsparse as fs
from fastsparse.core.masks import apply_masks, attach_mask, detach_masks, n_keep, sparsity_of
from helpers import AttnNet, ConvNet, mlp


# --- topk_mask ------------------------------------------------------------------------------

def test_topk_mask_keeps_largest_scores():
    scores = torch.tensor([[0.3, 0.9, 0.1], [0.7, 0.2, 0.8]])
    # sorted descending: 0.9 (1), 0.8 (5), 0.7 (3), 0.3 (0), 0.2 (4), 0.1 (2)
    assert fs.topk_mask(scores, 3).tolist() == [[False, True, False], [True, False, True]]
    assert fs.topk_mask(scores, 1).tolist() == [[False, True, False], [False, False, False]]
    assert fs.topk_mask(scores, 0).sum() == 0
    assert fs.topk_mask(scores, 6).all()
    assert fs.topk_mask(scores, 3).dtype == torch.bool


def test_topk_mask_ties_go_to_lowest_flat_index_kthvalue_path():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    # k=2 of 6 uses kthvalue; threshold 2.0 is shared by flat 1, 2, 3, 5 -> keep 1 and 2
    assert fs.topk_mask(scores, 2).tolist() == [False, True, True, False, False, False]
    # one value above a tie: 3.0 at flat 4, then the first tied 1.0 (flat 0)
    scores = torch.tensor([1.0, 1.0, 0.5, 1.0, 3.0])
    assert fs.topk_mask(scores, 2).tolist() == [True, False, False, False, True]
    # all equal, 2-D: the first k in row-major order
    assert fs.topk_mask(torch.ones(3, 3), 4).tolist() == [[True, True, True], [True, False, False],
                                                           [False, False, False]]


def test_topk_mask_ties_go_to_lowest_flat_index_topk_path():
    # n=256, k=3 <= 256 // 64 takes the unsorted-topk branch
    scores = torch.zeros(256)
    scores[[10, 50, 200, 250]] = 5.0
    mask = fs.topk_mask(scores, 3)
    assert mask.nonzero().flatten().tolist() == [10, 50, 200]
    mask = fs.topk_mask(torch.zeros(256), 2)
    assert mask.nonzero().flatten().tolist() == [0, 1]


def test_topk_mask_handles_infinities_and_rejects_nan():
    inf = float("inf")
    scores = torch.tensor([-inf, 0.5, inf, -inf, 0.1])
    assert fs.topk_mask(scores, 2).tolist() == [False, True, True, False, False]
    # ties at -inf: lowest index first
    assert fs.topk_mask(scores, 4).tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="NaN"):
        fs.topk_mask(torch.tensor([0.1, float("nan"), 0.3]), 1)
    with pytest.raises(ValueError, match="cannot keep"):
        fs.topk_mask(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="cannot keep"):
        fs.topk_mask(torch.zeros(4), -1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), frac=st.floats(0, 1), levels=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_topk_mask_exact_count_and_order_property(n, frac, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float()  # many ties
    k = int(frac * n)
    mask = fs.topk_mask(scores, k)
    assert int(mask.sum()) == k
    if 0 < k < n:
        # every kept score >= every dropped score
        assert scores[mask].min() >= scores[~mask].max()
        # among ties at the threshold, kept ones come before dropped ones
        t = scores[mask].min()
        tied = (scores == t).nonzero().flatten()
        kept_tied = mask[tied]
        assert kept_tied.tolist() == sorted(kept_tied.tolist(), reverse=True)


def test_topk_mask_matches_sorting_reference_on_distinct_values():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(7, 9, generator=g)
    for k in (0, 1, 5, 31, 62, 63):
        expected = torch.zeros(63, dtype=torch.bool)
        expected[scores.flatten().argsort(descending=True)[:k]] = True
        assert torch.equal(fs.topk_mask(scores, k), expected.view(7, 9))


# --- global_topk_masks ----------------------------------------------------------------------

def test_global_topk_masks_one_threshold_over_tensors():
    a = torch.tensor([0.1, 0.9])
    b = torch.tensor([[0.5, 0.3], [0.95, 0.0]])
    ma, mb = fs.global_topk_masks([a, b], 3)  # keeps 0.95, 0.9, 0.5
    assert ma.tolist() == [False, True]
    assert mb.tolist() == [[True, False], [True, False]]
    assert ma.shape == a.shape and mb.shape == b.shape


def test_global_topk_masks_exact_with_ties_across_tensors():
    a, b = torch.ones(3), torch.ones(2, 2)
    ma, mb = fs.global_topk_masks([a, b], 4)
    # ties: lowest position in the concatenation first (all of a, then b's first)
    assert ma.tolist() == [True, True, True]
    assert mb.tolist() == [[True, False], [False, False]]
    ma, mb = fs.global_topk_masks([a, b], 0)
    assert int(ma.sum() + mb.sum()) == 0


# --- n_keep ------------------------------------------------------------------------------------

def test_n_keep_is_round_of_density_times_n():
    assert n_keep(10, 0.25) == 8     # round(7.5) -> 8 (banker's rounding of 7.5 is 8)
    assert n_keep(10, 0.35) == 6     # round(6.5) -> 6 (banker's rounding)
    assert n_keep(100, 0.9) == 10
    assert n_keep(7, 0.0) == 7
    assert n_keep(3, 0.99) == 0
    assert sparsity_of(torch.tensor([True, False, False, False])) == 0.75


# --- parameter selection ------------------------------------------------------------------

def _names(sps):
    return [sp.name for sp in sps]


def test_select_params_defaults():
    assert _names(fs.select_params(ConvNet())) == ["conv.weight", "fc.weight"]
    assert _names(fs.select_params(mlp())) == ["0.weight", "2.weight", "4.weight"]
    # MultiheadAttention projections are sparsified; embedding, norm and biases are not
    assert _names(fs.select_params(AttnNet())) == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]


def test_default_param_filter_excludes_embeddings_norms_lm_head_and_1d():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_proj = nn.Linear(4, 4)
            self.norm_in = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 4)
            self.body = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4, 4))  # not a Linear/Conv weight
            self.bn = nn.BatchNorm1d(4)

    assert _names(fs.select_params(Net())) == ["body.weight"]


def test_select_params_include_and_exclude_globs():
    model = mlp()
    assert _names(fs.select_params(model, include="0.*")) == ["0.weight"]  # bias is 1-D
    assert _names(fs.select_params(model, include=["0.*", "4.weight"])) == ["0.weight", "4.weight"]
    assert _names(fs.select_params(model, exclude="2.*")) == ["0.weight", "4.weight"]
    assert _names(fs.select_params(model, include="*.weight", exclude=["0.*", "4.*"])) == ["2.weight"]
    # include globs can select any >=2-D parameter, even ones the default filter leaves dense
    attn = AttnNet()
    assert _names(fs.select_params(attn, include="embedding.*")) == ["embedding.weight"]


def test_select_params_custom_predicate():
    model = mlp()
    chosen = fs.select_params(model, param_filter=lambda name, p, m: name.endswith("weight") and p.shape[0] == 12)
    assert _names(chosen) == ["2.weight"]
    assert chosen[0].module is model[2] and chosen[0].attr == "weight"
    assert chosen[0].param is model[2].weight


# --- mask buffers ----------------------------------------------------------------------------

def test_attach_mask_registers_buffer_and_zeros_weights():
    lin = nn.Linear(3, 2)
    sp = fs.select_params(lin)[0]
    mask = torch.tensor([[True, False, True], [False, False, True]])
    attach_mask(sp, mask)
    assert torch.equal(lin.weight_mask, mask)
    assert lin.weight_mask.dtype == torch.bool
    assert (lin.weight[~mask] == 0).all() and (lin.weight[mask] != 0).all()
    assert "weight_mask" in lin.state_dict()
    # overwrite in place: the same buffer object
    buf = lin.weight_mask
    attach_mask(sp, torch.ones(2, 3, dtype=torch.bool))
    assert lin.weight_mask is buf and buf.all()


def test_attach_mask_wrong_shape_changes_nothing():
    lin = nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        attach_mask(fs.select_params(lin)[0], torch.ones(3, 2, dtype=torch.bool))
    assert "weight_mask" not in lin._buffers
    assert torch.equal(lin.weight, before)


def test_apply_masks_in_place():
    a, b = torch.ones(2, 2), torch.full((3,), 2.0)
    ma, mb = torch.tensor([[True, False], [False, True]]), torch.tensor([False, True, True])
    apply_masks([a, b], [ma, mb])
    assert a.tolist() == [[1.0, 0.0], [0.0, 1.0]] and b.tolist() == [0.0, 2.0, 2.0]
    apply_masks([], [])


def test_sparse_params_found_again_after_state_dict_round_trip():
    torch.manual_seed(0)
    src = ConvNet()
    fs.sparsify_model(src, 0.7, seed=1)
    sd = src.state_dict()
    dst = ConvNet()
    fs.sparsify_model(dst, 0.5, seed=2)  # different masks, same buffers
    assert not torch.equal(dst.fc.weight_mask, src.fc.weight_mask)
    dst.load_state_dict(sd)
    found = fs.sparse_params(dst)
    assert _names(found) == ["conv.weight", "fc.weight"]
    for sp in found:
        assert torch.equal(sp.mask, sd[sp.mask_name])
        assert torch.equal(sp.param, sd[sp.name])
    assert found[0].mask_name == "conv.weight_mask"


def test_sparse_params_ignores_unrelated_buffers_and_detach_removes():
    model = mlp()
    model[0].register_buffer("running_mask", torch.ones(2))  # "running" is no parameter
    assert fs.sparse_params(model) == []
    fs.sparsify_model(model, 0.5, enforce_masks=False)
    assert _names(fs.sparse_params(model)) == ["0.weight", "2.weight", "4.weight"]
    detach_masks(model)
    assert fs.sparse_params(model) == []
    assert "running_mask" in model[0]._buffers
