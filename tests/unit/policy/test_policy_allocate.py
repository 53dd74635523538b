"""Stage 2: totals, floors, caps, proportionality and the pinned small-budget behaviour."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_sglang.policy import (
    TopDownAllocator,
    build_policy,
    dynamic_head_budget,
    uniform_head_budget,
    water_fill,
)


@pytest.mark.parametrize(
    "n,budget,tokens,expected",
    [
        (1000, 0.1, None, 100),
        (100, 0.29, None, 29),  # 0.29 * 100 = 28.999999999999996 in floats
        (10, 0.3, None, 3),
        (30, 0.01, None, 1),  # never below one token
        (500, 1.0, None, 500),
        (500, 0.1, 64, 64),  # absolute budget wins
        (50, 0.1, 64, 50),  # ... and is capped at N
    ],
)
def test_uniform_head_budget(n: int, budget: float, tokens: int | None, expected: int) -> None:
    assert uniform_head_budget(n, budget, tokens) == expected


@pytest.mark.parametrize("budget,tokens", [(0.0, None), (1.5, None), (0.1, 0)])
def test_uniform_head_budget_rejects_out_of_range(budget: float, tokens: int | None) -> None:
    with pytest.raises(ValueError, match="budget"):
        uniform_head_budget(100, budget, tokens)


@pytest.mark.parametrize(
    "weights,total,lo,hi,expected",
    [
        pytest.param([1, 1, 2], 8, 0, 10, [2, 2, 4], id="proportional"),
        pytest.param([1, 1, 10], 12, 0, 5, [4, 3, 5], id="cap-surplus-redistributed"),
        pytest.param([1, 100], 20, 5, 100, [5, 15], id="floor-taken-from-the-rest"),
        pytest.param([1, 2, 3], 5, 2, 9, [2, 2, 2], id="below-floors-all-floor"),
        pytest.param([1, 2, 3], 40, 2, 9, [9, 9, 9], id="above-caps-all-cap"),
        pytest.param([5, 1, 1, 1], 20, 3, 8, [8, 4, 4, 4], id="cap-then-floor"),
    ],
)
def test_water_fill_table(weights: list, total: int, lo: int, hi: int, expected: list) -> None:
    got = water_fill(torch.tensor(weights, dtype=torch.float64), total, lo, hi)
    assert got.tolist() == expected


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=64),
    lo=st.integers(0, 50),
    span=st.integers(0, 5000),
    fill=st.floats(0.0, 1.0),
)
def test_water_fill_properties(weights: list[int], lo: int, span: int, fill: float) -> None:
    hi = lo + span
    n = len(weights)
    total = int(n * lo + fill * n * span)
    w = torch.tensor(weights, dtype=torch.float64)
    b = water_fill(w, total, lo, hi)
    assert b.dtype == torch.int64
    assert int(b.min()) >= lo and int(b.max()) <= hi
    assert int(b.sum()) == total  # n*lo <= total <= n*hi here: every entry is used
    for i in range(n):  # more focus never gets less budget
        for j in range(n):
            if weights[i] > weights[j]:
                assert b[i] >= b[j]


@settings(max_examples=120, deadline=None)
@given(
    layers=st.integers(1, 6),
    heads=st.integers(1, 8),
    n=st.integers(1, 4000),
    ratio=st.floats(0.01, 1.0),
    sink=st.integers(0, 8),
    window=st.integers(1, 64),
    topk=st.integers(1, 16),
    dyn_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_budgets_respect_total_floor_and_cap(
    layers: int,
    heads: int,
    n: int,
    ratio: float,
    sink: int,
    window: int,
    topk: int,
    dyn_fraction: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    focus = torch.randint(1, n + 1, (layers, heads), generator=gen)
    wanted = torch.rand(layers, heads, generator=gen) < dyn_fraction
    window = min(window, n)
    sink = min(sink, n - window)
    floor = sink + window
    b_mean = uniform_head_budget(n, ratio, None)
    b_dyn = dynamic_head_budget(n, sink, window, 16, topk)
    alloc = TopDownAllocator().allocate(
        focus, wanted, prompt_len=n, head_budget=b_mean, floor=floor, dynamic_budget=b_dyn
    )
    total = b_mean * layers * heads
    dyn, b = alloc.is_dynamic, alloc.budgets
    assert alloc.total == total
    assert torch.all(dyn <= wanted)  # allocation only ever demotes
    assert torch.all(b[dyn] == b_dyn)
    static = b[~dyn]
    assert torch.all(static >= floor) and torch.all(static <= n)
    if total >= layers * heads * floor:
        assert int(b.sum()) <= total
        if static.numel() and int(static.max()) < n:
            assert int(b.sum()) == total  # nothing left on the table
    else:  # pinned: the floors win, every head static at exactly sink + window
        assert not dyn.any()
        assert torch.all(b == floor)
    if dyn.any() and (wanted & ~dyn).any():  # demotion drops the narrowest dynamic heads
        assert focus[dyn].min() >= focus[wanted & ~dyn].max()


def test_static_budgets_proportional_to_focus() -> None:
    focus = torch.tensor([[100, 200], [300, 400]])
    alloc = TopDownAllocator().allocate(
        focus,
        torch.zeros(2, 2, dtype=torch.bool),
        prompt_len=10_000,
        head_budget=250,
        floor=36,
        dynamic_budget=164,
    )
    assert alloc.budgets.tolist() == [[100, 200], [300, 400]]


def test_dynamic_heads_paid_first_static_share_the_rest() -> None:
    focus = torch.tensor([[100, 900, 300]])
    dyn = torch.tensor([[False, True, False]])
    alloc = TopDownAllocator().allocate(
        focus, dyn, prompt_len=3000, head_budget=300, floor=36, dynamic_budget=164
    )
    # B = 900; dynamic 164; static share 736 in proportion 1:3.
    assert alloc.is_dynamic.tolist() == dyn.tolist()
    assert alloc.budgets.tolist() == [[184, 164, 552]]


def test_without_demotion_dynamic_heads_keep_b_dyn_over_budget() -> None:
    focus = torch.tensor([[50, 60]])
    dyn = torch.ones(1, 2, dtype=torch.bool)
    alloc = TopDownAllocator(demote_unaffordable=False).allocate(
        focus, dyn, prompt_len=300, head_budget=30, floor=36, dynamic_budget=164
    )
    assert alloc.is_dynamic.all() and alloc.budgets.tolist() == [[164, 164]]


@pytest.mark.parametrize("policy", ["hybridkv", "all_static", "snapkv", "streaming"])
def test_budget_one_keeps_every_position(policy: str) -> None:
    from policy_testlib import planted_layer

    n, w = 200, 16
    q, k = planted_layer(n, w, [[[i % 90 + 5, 150] for i in range(w)]], group=1)
    p = build_policy(policy, budget=1.0, window=w)
    obs = [p.observe_layer(layer, q, k, 1.0) for layer in range(2)]
    plan = p.finalize(obs, torch.zeros(n, dtype=torch.bool))
    assert not plan.is_dynamic.any()
    assert torch.all(plan.budgets == n)
    assert plan.kept_positions.tolist() == list(range(n)) * plan.num_rows
