"""distributions.py: uniform, ER, ERK (with dense capping), first_layer_dense_uniform, custom.

The expected densities are worked out by hand below; the tests never call the formula
they check to produce the expected numbers.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsparse as fs
from fastsparse.core.distributions import DISTRIBUTIONS, resolve_sparsities
from helpers import ConvNet, mlp

# tests/helpers.ConvNet: conv (c_out=4, c_in=1, 3, 3), N = 36; fc (10, 64), N = 640
CONV_FC = [(4, 1, 3, 3), (10, 64)]


def _kept(model):
    return {sp.name: int(sp.mask.sum()) for sp in fs.sparse_params(model)}


def test_erk_conv_and_linear_by_hand():
    # raw_conv = (4 + 1 + 3 + 3) / (4 * 1 * 3 * 3) = 11 / 36
    # raw_fc   = (10 + 64) / (10 * 64)            = 74 / 640
    # kept budget (1 - 0.9) * (36 + 640) = 67.6
    # eps = 67.6 / (11/36 * 36 + 74/640 * 640) = 67.6 / 85 = 0.795294117647...
    # d_conv = eps * 11/36 = 8.748235294 / 36  = 0.243006535948  -> sparsity 0.756993464052
    # d_fc   = eps * 74/640 = 58.851764706 / 640 = 0.091955882353 -> sparsity 0.908044117647
    got = fs.erdos_renyi_sparsity(CONV_FC, 0.9)
    assert got == pytest.approx([0.756993464052, 0.908044117647], abs=1e-9)
    # the same from tensors instead of shapes
    tensors = [torch.empty(4, 1, 3, 3), torch.empty(10, 64)]
    assert fs.erdos_renyi_sparsity(tensors, 0.9) == pytest.approx(got, abs=0)


def test_erk_exact_counts_through_sparsify_model():
    model = ConvNet()
    fs.sparsify_model(model, 0.9, sparse_f=fs.erdos_renyi_sparsity)
    # conv keeps round(8.748235) = 9 of 36; fc keeps round(58.851765) = 59 of 640
    assert _kept(model) == {"conv.weight": 9, "fc.weight": 59}


def test_erk_layer_made_dense_and_rest_resolved():
    # S = 0.5: budget 0.5 * 676 = 338; eps = 338 / 85 = 3.976470588
    # d_conv = 3.976470588 * 11/36 = 1.215 > 1 -> conv is made dense (36 kept).
    # Re-solve for fc alone: eps * 74 = (1 - 0.5) * 640 - 0.5 * 36 = 320 - 18 = 302
    # d_fc = 302 / 640 = 0.471875 -> sparsity 0.528125; kept 36 + 302 = 338 = 0.5 * 676.
    assert fs.erdos_renyi_sparsity(CONV_FC, 0.5) == pytest.approx([0.0, 0.528125], abs=1e-12)
    model = ConvNet()
    fs.sparsify_model(model, 0.5, sparse_f="erk")
    assert _kept(model) == {"conv.weight": 36, "fc.weight": 302}


def test_erk_ties_at_the_maximum_all_go_dense():
    # shapes (2,2), (2,2), (100,100): raw 4/4 = 1, 1, 200/10000 = 0.02; N 4, 4, 10000
    # budget 0.5 * 10008 = 5004; eps = 5004 / (4 + 4 + 200) = 24.0577 -> both small layers > 1
    # re-solve: eps * 200 = 0.5 * 10000 - 0.5 * 8 = 4996 -> d = 0.4996, sparsity 0.5004
    assert fs.erdos_renyi_sparsity([(2, 2), (2, 2), (100, 100)], 0.5) == pytest.approx(
        [0.0, 0.0, 0.5004], abs=1e-12)


def test_erk_dense_capping_iterates():
    # shapes (2,2), (4,4), (100,100): raw 1, 8/16 = 0.5, 0.02; N 4, 16, 10000; budget 5010
    # round 1: eps = 5010 / (4 + 8 + 200) = 23.63 -> 23.63 * 1 > 1: (2,2) dense
    # round 2: eps = (0.5 * 10016 - 0.5 * 4) / (8 + 200) = 5006 / 208 = 24.07 -> 24.07 * 0.5 > 1: (4,4) dense
    # round 3: eps = (0.5 * 10000 - 0.5 * 20) / 200 = 4990 / 200 = 24.95 -> d = 0.499, sparsity 0.501
    assert fs.erdos_renyi_sparsity([(2, 2), (4, 4), (100, 100)], 0.5) == pytest.approx(
        [0.0, 0.0, 0.501], abs=1e-12)


def test_er_ignores_kernel_dims():
    # ER: raw = (n_out + n_in) / (n_out * n_in): conv (4 + 1) / 4 = 1.25; fc 74 / 640 = 0.115625
    # eps = 67.6 / (1.25 * 36 + 74) = 67.6 / 119 = 0.568067226891
    # d_conv = 1.25 * 0.568067226891 = 0.710084033613 -> sparsity 0.289915966387
    # d_fc = 0.115625 * 0.568067226891 = 0.065682773109 -> sparsity 0.934317226891
    got = fs.erdos_renyi_sparsity(CONV_FC, 0.9, include_kernel=False)
    assert got == pytest.approx([0.289915966387, 0.934317226891], abs=1e-9)
    assert resolve_sparsities("ER", CONV_FC, 0.9) == pytest.approx(got, abs=0)


def test_er_equals_erk_for_linear_layers():
    # for 2-D weights (a + b) / (a * b) is both formulas
    shapes = [(16, 8), (12, 16), (4, 12)]
    assert fs.erdos_renyi_sparsity(shapes, 0.8, include_kernel=False) == pytest.approx(
        fs.erdos_renyi_sparsity(shapes, 0.8), abs=1e-12)
    # by hand: raw 24/128, 28/192, 16/48; N 128, 192, 48; budget 0.2 * 368 = 73.6
    # eps = 73.6 / (24 + 28 + 16) = 1.082352941; d = 0.202941176, 0.157843137, 0.360784314
    assert fs.erdos_renyi_sparsity(shapes, 0.8) == pytest.approx(
        [0.797058824, 0.842156863, 0.639215686], abs=1e-8)


def test_erk_power_scale_zero_is_uniform():
    shapes = [(4, 1, 3, 3), (10, 64), (3, 3)]
    assert fs.erdos_renyi_sparsity(shapes, 0.9, erk_power_scale=0) == pytest.approx([0.9, 0.9, 0.9], abs=1e-12)
    assert fs.erdos_renyi_sparsity(shapes, 0.3, erk_power_scale=0.0) == pytest.approx([0.3, 0.3, 0.3], abs=1e-12)


def test_erk_power_scale_half_by_hand():
    # p = 0.5: raw_conv = sqrt(11/36) = 0.552770798, raw_fc = sqrt(74/640) = 0.340036763
    # eps = 67.6 / (0.552770798 * 36 + 0.340036763 * 640) = 67.6 / (19.899749 + 217.623528)
    #     = 67.6 / 237.523277 = 0.2846037
    # d_conv = 0.2846037 * 0.552770798 = 0.1573206, d_fc = 0.2846037 * 0.340036763 = 0.0967757
    got = fs.erdos_renyi_sparsity(CONV_FC, 0.9, erk_power_scale=0.5)
    assert got == pytest.approx([1 - 0.1573206, 1 - 0.0967757], abs=2e-7)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.one_of(st.tuples(st.integers(1, 30), st.integers(1, 30)),
                              st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3))),
                    min_size=1, max_size=5),
    s=st.floats(0, 1, exclude_max=True),
    power=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_erk_total_kept_equals_budget_property(shapes, s, power):
    sizes = [1] * len(shapes)
    for i, shp in enumerate(shapes):
        for d in shp:
            sizes[i] *= d
    got = fs.erdos_renyi_sparsity(shapes, s, erk_power_scale=power)
    assert len(got) == len(shapes)
    assert all(0.0 <= x <= 1.0 for x in got)
    kept = sum((1 - x) * n for x, n in zip(got, sizes))
    assert kept == pytest.approx((1 - s) * sum(sizes), rel=1e-9, abs=1e-9)


def test_uniform_and_first_layer_dense_uniform():
    shapes = [(4, 2), (8, 4), (3, 8)]
    assert fs.uniform_sparsity(shapes, 0.7) == [0.7, 0.7, 0.7]
    assert fs.first_layer_dense_uniform(shapes, 0.7) == [0.0, 0.7, 0.7]
    assert resolve_sparsities("first_layer_dense", shapes, 0.7) == [0.0, 0.7, 0.7]
    assert resolve_sparsities("UNIFORM", shapes, 0.7) == [0.7, 0.7, 0.7]


def test_first_layer_dense_uniform_through_sparsify_model():
    model = mlp()  # 0.weight (16, 8) = 128, 2.weight (12, 16) = 192, 4.weight (4, 12) = 48
    fs.sparsify_model(model, 0.75, sparse_f=fs.first_layer_dense_uniform)
    # dense, round(0.25 * 192) = 48, round(0.25 * 48) = 12
    assert _kept(model) == {"0.weight": 128, "2.weight": 48, "4.weight": 12}


def test_custom_distribution_and_tensor_values_accepted():
    def halves(params, model_sparsity):
        assert [tuple(p) for p in params] == CONV_FC
        return [torch.tensor(0.25), 0.75]

    assert resolve_sparsities(halves, CONV_FC, 0.5) == [0.25, 0.75]
    model = ConvNet()
    fs.Sparsifier(model, None, fs.Static(sparsity=0.5, distribution=halves))
    # round(0.75 * 36) = 27, round(0.25 * 640) = 160
    assert _kept(model) == {"conv.weight": 27, "fc.weight": 160}


def test_distribution_registry_names():
    assert {"uniform", "erk", "er", "first_layer_dense"} <= set(DISTRIBUTIONS)
