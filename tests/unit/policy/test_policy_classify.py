"""Stage 1: concentrated heads are static and keep their keys; shifting heads are dynamic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_testlib import planted_layer

from hybridkv_sglang.policy import FocusClassifier, build_policy

# (focus [L, H], b_mean, max_dynamic_fraction, expected is_dynamic)
CASES = [
    pytest.param([[3, 40]], 25, 1.0, [[False, True]], id="threshold"),
    pytest.param([[25, 26]], 25, 1.0, [[False, True]], id="equal-to-budget-is-static"),
    pytest.param(
        [[30, 90], [60, 10]], 25, 0.5, [[False, True], [True, False]], id="cap-keeps-largest"
    ),
    pytest.param([[30, 90], [60, 10]], 25, 0.25, [[False, True], [False, False]], id="cap-one"),
    pytest.param([[30, 90], [60, 10]], 25, 0.0, [[False, False], [False, False]], id="cap-zero"),
    pytest.param([[50, 50, 50, 50]], 25, 0.5, [[True, True, False, False]], id="ties-by-index"),
]


@pytest.mark.parametrize("focus,b_mean,fraction,expected", CASES)
def test_classification_table(focus: list, b_mean: int, fraction: float, expected: list) -> None:
    got = FocusClassifier(fraction).classify(torch.tensor(focus), b_mean)
    assert got.tolist() == expected


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 6),
    heads=st.integers(1, 8),
    n=st.integers(1, 5000),
    b_mean=st.integers(1, 5000),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_cap_and_ranking_hold_for_any_shape(
    layers: int, heads: int, n: int, b_mean: int, fraction: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    focus = torch.randint(1, n + 1, (layers, heads), generator=gen)
    clf = FocusClassifier(fraction)
    dyn = clf.classify(focus, b_mean)
    assert int(dyn.sum()) <= int(fraction * layers * heads + 1e-9)
    assert torch.all(focus[dyn] > b_mean)  # only heads that do not fit may be dynamic
    left_out = (focus > b_mean) & ~dyn
    if dyn.any() and left_out.any():  # the cap keeps the widest heads
        assert focus[dyn].min() >= focus[left_out].max()
    if int((focus > b_mean).sum()) <= clf.max_dynamic_heads(focus.numel()):
        assert torch.equal(dyn, focus > b_mean)


def test_max_dynamic_fraction_out_of_range() -> None:
    with pytest.raises(ValueError, match="max_dynamic_fraction"):
        FocusClassifier(1.5)


def _planted_two_heads(n: int, w: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Head 0's window sits on 3 keys every row; head 1's focus moves to 7 new keys each row."""
    anchors = [10, 200, 333]
    shifting = [[40 + 50 * i + 7 * j for j in range(7)] for i in range(w)]
    q, k = planted_layer(n, w, [[anchors] * w, shifting], group=2)
    return q, k, anchors


def test_planted_heads_static_keeps_focus_dynamic_shifts() -> None:
    n, w = 512, 8
    q, k, anchors = _planted_two_heads(n, w)
    # b_mean = 50: head 0 (|U| = 3) fits, head 1 (|U| = 56) does not; B = 100 pays for one
    # dynamic head (b_dyn = 16 resident prefix + 2 * 16 chunks + 16 resident tail = 64, and its
    # chunk index: 30 chunks x 2 x 8 one-byte bounds + 8 x 12 bytes of channel parameters + 24
    # bytes of retrieval scratch = 600 bytes, 2 entries of 512) and 34 static entries: sink +
    # window + the anchors' max-pooled neighbourhoods (3 x 7 positions) and the best scores after
    # them.
    policy = build_policy(
        "hybridkv",
        budget_tokens=50,
        window=w,
        sink=2,
        top_k_chunks=2,
        dynamic_top_k="fixed",
        bound_channels=8,
        bound_precision="uint8",
    )
    obs = policy.observe_layer(0, q, k, sm_scale=1.0)
    assert obs.focus_size.tolist() == [3, 56]

    plan = policy.finalize([obs], torch.zeros(n, dtype=torch.bool))
    assert plan.is_dynamic.tolist() == [[False, True]]
    assert plan.budgets.tolist() == [[34, 64]]
    kept = set(plan.kept_positions_of(0, 0).tolist())
    assert set(anchors) <= kept
    assert {0, 1, *range(n - w, n)} <= kept
    # The dynamic head keeps only sink + window (rounded out to chunk borders) resident; its
    # shifting targets are retrieved at decode.
    assert plan.kept_positions_of(0, 1).tolist() == [*range(16), *range(n - 16, n)]
    assert plan.chunk_kmin is not None and plan.chunk_kmin.shape == (1, 2, n // 16, 8)
    stats = plan.stats()
    assert stats["read_bytes_per_step"] == (34 + 64) * 512 + 600
    assert stats["read_fraction"] <= 50 / n


def test_planted_dynamic_head_demoted_when_budget_cannot_pay_for_it() -> None:
    """Pinned: B = 50 < b_dyn + floor = 74, so the shifting head becomes static."""
    n, w = 512, 8
    q, k, _ = _planted_two_heads(n, w)
    policy = build_policy("hybridkv", budget_tokens=25, window=w, sink=2, top_k_chunks=2)
    plan = policy.finalize([policy.observe_layer(0, q, k, 1.0)], torch.zeros(n, dtype=torch.bool))
    assert plan.is_dynamic.tolist() == [[False, False]]
    assert int(plan.budgets.sum()) == 50
    assert plan.chunk_kmin is None
