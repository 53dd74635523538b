"""Focus sets and pooled scores on constructed attention, against hand counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_testlib import smallest_set_size

from hybridkv_sglang.policy import HeadStatsReducer, focus_set, focus_size, pooled_scores

# (rows of one head's window attention [w, N], theta, expected focus set U)
FOCUS_CASES = [
    pytest.param([[0.02, 0.02, 0.92, 0.02, 0.02]] * 3, 0.9, {2}, id="one-key-every-row"),
    pytest.param(
        [[0.95, 0.05, 0, 0, 0, 0], [0, 0, 0, 0.03, 0.94, 0.03]], 0.9, {0, 4}, id="focus-moves"
    ),
    pytest.param([[0.5, 0.3, 0.15, 0.05]], 0.9, {0, 1, 2}, id="three-to-reach-0.9"),
    pytest.param([[0.5, 0.3, 0.15, 0.05]], 0.6, {0, 1}, id="two-to-reach-0.6"),
    pytest.param([[0.5, 0.3, 0.15, 0.05]], 1.0, {0, 1, 2, 3}, id="theta-1-needs-all"),
    pytest.param([[1 / 6] * 6], 0.9, {0, 1, 2, 3, 4, 5}, id="uniform-needs-all"),
    pytest.param([[0.25] * 4 + [0] * 4], 0.7, {0, 1, 2}, id="ties-broken-by-position"),
    pytest.param(
        [[0.6, 0.4, 0, 0], [0.1, 0.1, 0.8, 0], [0.0, 0.05, 0.05, 0.9]],
        0.9,
        {0, 1, 2, 3},
        id="union-over-rows",
    ),
]


@pytest.mark.parametrize("rows,theta,expected", FOCUS_CASES)
def test_focus_set_matches_hand_count(rows: list, theta: float, expected: set[int]) -> None:
    attn = torch.tensor([rows], dtype=torch.float32)
    members = focus_set(attn, theta)[0].nonzero().flatten().tolist()
    assert set(members) == expected
    assert focus_size(attn, theta).tolist() == [len(expected)]


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 3),
    w=st.integers(1, 5),
    n=st.integers(1, 40),
    theta=st.floats(0.05, 0.99),
    seed=st.integers(0, 2**16),
)
def test_each_row_contributes_its_smallest_set(
    heads: int, w: int, n: int, theta: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    attn = torch.softmax(3 * torch.randn(heads, w, n, generator=gen), dim=-1)
    member = focus_set(attn, theta)
    for h in range(heads):
        for i in range(w):
            row = attn[h, i].tolist()
            need = smallest_set_size(row, theta)
            top = sorted(range(n), key=lambda j, row=row: -row[j])[:need]
            assert member[h, top].all()  # S_i is inside U
        # ... and U holds nothing but members of some S_i.
        union = set()
        for i in range(w):
            row = attn[h, i].tolist()
            union |= set(
                sorted(range(n), key=lambda j, row=row: -row[j])[: smallest_set_size(row, theta)]
            )
        assert set(member[h].nonzero().flatten().tolist()) == union


def test_masked_future_keys_are_never_in_focus() -> None:
    attn = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.4, 0.0]]])
    assert focus_set(attn, 1.0)[0].tolist() == [True, True, True, False]


def test_pooled_scores_spread_a_spike_over_the_kernel() -> None:
    attn = torch.zeros(1, 2, 20)
    attn[0, 0, 10] = 0.7
    attn[0, 1, 10] = 0.2
    attn[0, 0, 0] = 0.3
    attn[0, 1, 19] = 0.8
    scores = pooled_scores(attn, 7)
    expected = torch.zeros(20)
    expected[7:14] = 0.9
    expected[0:4] = 0.3
    expected[16:20] = 0.8
    torch.testing.assert_close(scores[0], expected)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooled_scores_equal_windowed_max_of_column_sums(kernel: int) -> None:
    gen = torch.Generator().manual_seed(kernel)
    attn = torch.softmax(torch.randn(3, 4, 33, generator=gen), dim=-1)
    col = attn.sum(1)
    half = kernel // 2
    expected = torch.stack(
        [col[:, max(0, j - half) : j + half + 1].amax(-1) for j in range(33)], dim=-1
    )
    torch.testing.assert_close(pooled_scores(attn, kernel), expected)


@pytest.mark.parametrize("kernel", [0, 2, -1])
def test_even_or_empty_pool_kernel_rejected(kernel: int) -> None:
    with pytest.raises(ValueError, match="pool_kernel"):
        pooled_scores(torch.rand(1, 1, 5), kernel)
    with pytest.raises(ValueError, match="pool_kernel"):
        HeadStatsReducer(pool_kernel=kernel)


@pytest.mark.parametrize("theta", [0.0, 1.5, -0.1])
def test_theta_out_of_range_rejected(theta: float) -> None:
    with pytest.raises(ValueError, match="theta"):
        focus_size(torch.rand(1, 1, 5), theta)


def test_reducer_returns_both_stats() -> None:
    attn = torch.tensor([FOCUS_CASES[1].values[0]], dtype=torch.float32)
    stats = HeadStatsReducer(theta=0.9, pool_kernel=1).reduce(attn)
    assert stats.focus_size.tolist() == [2]
    assert stats.focus_size.dtype == torch.int64
    torch.testing.assert_close(stats.scores, attn.sum(1))
