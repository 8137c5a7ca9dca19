"""N:M masks and packed offsets: the invariants every sparse weight relies on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import reference_nm_mask
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.masks import nm_mask, nm_positions
from slope_lightning.sparse.packing import bits_per_offset, pack_positions, unpack_positions

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 3), (5, 16)]


@st.composite
def weights_and_patterns(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    rows = draw(st.integers(1, 9))
    groups = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    # Few distinct values: lots of ties, which must be broken deterministically.
    distinct = draw(st.sampled_from([3, 1000]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-distinct, distinct + 1, (rows, groups * m), generator=g).double()
    return w, n, m


@settings(max_examples=60, deadline=None)
@given(weights_and_patterns())
def test_row_mask_keeps_exactly_n_of_every_m(case):
    w, n, m = case
    mask = nm_mask(w, n, m)
    assert mask.view(w.shape[0], -1, m).sum(-1).eq(n).all()


@settings(max_examples=60, deadline=None)
@given(weights_and_patterns())
def test_kept_entries_are_the_largest_with_lower_offset_winning_ties(case):
    w, n, m = case
    assert torch.equal(nm_mask(w, n, m), reference_nm_mask(w, n, m))


@settings(max_examples=60, deadline=None)
@given(weights_and_patterns())
def test_double_pruned_weight_has_at_most_n_per_column_group(case):
    w, n, m = case
    if w.shape[0] % m:
        w = w[: w.shape[0] - w.shape[0] % m] if w.shape[0] >= m else w.repeat(m, 1)
    w_r = w * nm_mask(w, n, m, dim=-1)
    w_rc = w_r * nm_mask(w_r, n, m, dim=0)
    nonzero_per_col_group = (w_rc != 0).view(-1, m, w.shape[1]).sum(1)
    assert nonzero_per_col_group.le(n).all()
    # Every entry of W_RC comes from W_R: double pruning only removes.
    assert torch.equal(w_rc[w_rc != 0], w_r[w_rc != 0])


def test_mask_along_dim0_is_the_transposed_row_mask():
    w = torch.randn(8, 12)
    assert torch.equal(nm_mask(w, 2, 4, dim=0), nm_mask(w.t(), 2, 4).t())


def test_random_masks_are_reproducible_by_seed_and_keep_n():
    w = torch.randn(6, 16)
    a = nm_mask(w, 2, 4, method="random", generator=torch.Generator().manual_seed(1))
    b = nm_mask(w, 2, 4, method="random", generator=torch.Generator().manual_seed(1))
    c = nm_mask(w, 2, 4, method="random", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.view(6, -1, 4).sum(-1).eq(2).all()


def test_nan_weights_are_kept_not_silently_pruned():
    w = torch.tensor([[0.1, float("nan"), 0.3, 0.2]])
    assert nm_mask(w, 1, 4)[0, 1]


@pytest.mark.parametrize(
    ("m", "bits"), [(2, 1), (3, 2), (4, 2), (8, 4), (16, 4), (17, 8), (256, 8)]
)
def test_offsets_use_a_power_of_two_number_of_bits(m, bits):
    assert bits_per_offset(m) == bits


@settings(max_examples=60, deadline=None)
@given(weights_and_patterns())
def test_packing_round_trips(case):
    w, n, m = case
    positions = nm_positions(w, n, m)
    packed = pack_positions(positions, m)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_positions(packed, m, w.shape[1] // m, n), positions)


def test_two_to_four_costs_two_bits_per_kept_value():
    layout = NMLayout(rows=64, cols=128, n=2, m=4)
    values, index = layout.prune(torch.randn(64, 128))
    assert values.shape == (64, 64)
    assert index.shape == (64, 16)  # 64 kept values x 2 bits = 16 bytes per row
    assert index.dtype == torch.uint8


def test_layout_round_trip_to_dense_is_the_masked_weight():
    w = torch.randn(5, 24, dtype=torch.float64)
    layout = NMLayout(5, 24, 2, 8)
    values, index = layout.prune(w)
    assert torch.equal(layout.to_dense(values, index), w * reference_nm_mask(w, 2, 8))
    assert torch.equal(layout.mask(index), reference_nm_mask(w, 2, 8))


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4), (1, 1), (2, 512)])
def test_invalid_patterns_are_rejected_with_the_fix(n, m):
    with pytest.raises(ValueError, match="n < m|m <= 256"):
        nm_mask(torch.randn(4, 8), n, m)


def test_dimension_not_divisible_by_m_is_rejected():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nm_positions(torch.randn(3, 10), 2, 4)
