"""The rank check's checksum as a pure function (issue 13): masks the old index-weighted sum
confused ({0, 3} and {1, 2}) differ, as do any two distinct masks of a small exhaustive family,
the same bits under another shape or name; the count is the active count. The collectives
themselves run in tests/test_distributed.py."""
from __future__ import annotations

import itertools

import torch

from fastsparse.engine.distributed import mask_checksums


def _mask(n, on, shape=None):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(on)] = True
    return m.view(shape) if shape else m


def test_the_issues_collision_is_gone():
    a, b = mask_checksums([_mask(4, [0, 3])]), mask_checksums([_mask(4, [1, 2])])
    assert a[0, -1] == b[0, -1] == 2          # the same count
    assert not torch.equal(a, b)


def test_every_mask_of_a_small_family_has_its_own_checksum():
    # all 252 masks of 10 positions with 5 active: every pair has the same count
    masks = [_mask(10, on) for on in itertools.combinations(range(10), 5)]
    rows = {tuple(r.tolist()) for r in mask_checksums(masks)}
    assert len(rows) == len(masks)


def test_one_moved_bit_in_a_large_mask_changes_the_checksum():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(300, 64, generator=g) < 0.1
    base = mask_checksums([m])
    flat = m.clone().view(-1)
    on, off = int(flat.nonzero()[-1]), int((~flat).nonzero()[0])
    flat[on], flat[off] = False, True
    moved = mask_checksums([flat.view(300, 64)])
    assert moved[0, -1] == base[0, -1] and not torch.equal(moved, base)


def test_shape_and_name_are_part_of_the_checksum():
    m = _mask(6, [0, 4])
    assert not torch.equal(mask_checksums([m.view(2, 3)]), mask_checksums([m.view(3, 2)]))
    assert not torch.equal(mask_checksums([m], ["a"]), mask_checksums([m], ["b"]))
    assert torch.equal(mask_checksums([m], ["a"]), mask_checksums([m.clone()], ["a"]))


def test_counts_and_empty_input():
    out = mask_checksums([_mask(9, [1, 2, 8]), _mask(16, [])])
    assert out.dtype == torch.int64 and out[:, -1].tolist() == [3, 0]
    assert mask_checksums([]).shape == (0, 5)
