"""PyramidKV: layer budgets fall linearly with depth, total B kept, SnapKV selection per head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_sglang.policy import (
    LayerObservation,
    PyramidKVPolicy,
    pyramid_budgets,
    uniform_head_budget,
)
from hybridkv_sglang.policy.selection import sink_window_mask


@pytest.mark.parametrize(
    "layers,heads,b_mean,floor,n,expected_first_layer",
    [
        (4, 2, 100, 36, 400, [161, 161, 120, 120, 80, 80, 39, 39]),  # 64·(1.95, 1.3, .65, .05)
        (2, 1, 56, 36, 400, [75, 37]),  # extra 20: 39 and 1
        (1, 3, 100, 36, 400, [100, 100, 100]),  # one layer: uniform
        (3, 2, 30, 36, 400, [36] * 6),  # below the floor: the floor alone
        (3, 1, 400, 36, 400, [400, 400, 400]),  # full budget: everything
    ],
)
def test_pyramid_budgets_cases(
    layers: int, heads: int, b_mean: int, floor: int, n: int, expected_first_layer: list
) -> None:
    got = pyramid_budgets(layers, heads, b_mean, floor, n, 20.0)
    assert got.flatten().tolist() == expected_first_layer


@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 40),
    heads=st.integers(1, 8),
    n=st.integers(40, 3000),
    ratio=st.floats(0.0, 1.0),
    beta=st.floats(1.0, 50.0),
)
def test_pyramid_budgets_sum_to_b_and_shrink_with_depth(
    layers: int, heads: int, n: int, ratio: float, beta: float
) -> None:
    floor = 36
    b_mean = floor + int(ratio * (n - floor))
    got = pyramid_budgets(layers, heads, b_mean, floor, n, beta)
    assert got.shape == (layers, heads)
    assert int(got.min()) >= floor and int(got.max()) <= n
    assert int(got.sum()) == layers * heads * b_mean
    per_layer = got.double().mean(dim=1)
    assert torch.all(per_layer.diff() <= 1.0)  # non-increasing up to the rounding of one entry


def test_pyramid_budgets_reject_beta_below_one() -> None:
    with pytest.raises(ValueError, match="beta"):
        pyramid_budgets(2, 2, 100, 36, 400, 0.5)


@pytest.mark.parametrize("budget", [0.15, 0.25, 0.6])
def test_plan_keeps_sink_window_then_top_scores_per_head(budget: float) -> None:
    layers, heads, n = 4, 2, 300
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(layers, heads, n, generator=gen)
    focus = torch.full((heads,), n, dtype=torch.int64)
    policy = PyramidKVPolicy(budget=budget, sink=4, window=32)
    costs = policy.costs(64, torch.float32)
    obs = [LayerObservation(layer, n, focus, scores[layer], costs) for layer in range(layers)]
    plan = policy.finalize(obs, torch.ones(n, dtype=torch.bool))
    b_mean = uniform_head_budget(n, budget, None)
    assert not plan.has_dynamic
    assert int(plan.budgets.sum()) == layers * heads * b_mean
    assert torch.equal(
        plan.budgets, pyramid_budgets(layers, heads, b_mean, 36, n, policy.pyramid_beta)
    )
    assert int(plan.budgets[0, 0]) > int(plan.budgets[-1, 0])
    floor = sink_window_mask(n, 4, 32, "cpu")
    for layer in range(layers):
        for h in range(heads):
            kept = plan.kept_positions_of(layer, h).long()
            b = int(plan.budgets[layer, h])
            assert kept.numel() == b and floor[kept].sum() == 36
            rest = torch.where(floor, -1.0, scores[layer, h])
            assert set(kept.tolist()) == set(rest.topk(b - 36).indices.tolist()) | set(
                floor.nonzero().flatten().tolist()
            )
