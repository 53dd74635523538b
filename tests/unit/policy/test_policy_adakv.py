"""Ada-KV: per-layer budgets shared by a joint top-k over heads; floors kept; sums exact."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.policy import (
    AdaKVPolicy,
    LayerObservation,
    flattened_top_budgets,
    uniform_head_budget,
)
from hybridkv_sglang.policy.selection import sink_window_mask

L, HKV, N = 3, 4, 200


def _scores(seed: int) -> torch.Tensor:
    """``[L, H, N]`` distinct positive scores; head 0 concentrated, head 3 spread."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(L, HKV, N, generator=gen)
    s[:, 0] = s[:, 0] ** 8  # a few large scores, most near zero
    s[:, 3] = 0.5 + 0.5 * s[:, 3]  # every key moderately scored
    return s


def _finalize(scores: torch.Tensor, **kw: object):
    policy = AdaKVPolicy(**kw)  # type: ignore[arg-type]
    n = scores.shape[-1]
    focus = torch.full((scores.shape[1],), n, dtype=torch.int64)
    costs = policy.costs(64, torch.float32)
    obs = [LayerObservation(layer, n, focus, s, costs) for layer, s in enumerate(scores)]
    return policy.finalize(obs, torch.ones(n, dtype=torch.bool))


def _reference_kept(scores: torch.Tensor, floor: torch.Tensor, per_head: int) -> set:
    """Naive Ada-KV: sort every (score, head, position) of a layer, take the best ones."""
    kept = set()
    for layer in range(scores.shape[0]):
        pairs = [
            (float(scores[layer, h, j]), h, j)
            for h in range(scores.shape[1])
            for j in range(scores.shape[2])
            if not floor[j]
        ]
        pairs.sort(key=lambda t: -t[0])
        extra = scores.shape[1] * (per_head - int(floor.sum()))
        kept |= {(layer, h, j) for _, h, j in pairs[:extra]}
        kept |= {(layer, h, j) for h in range(scores.shape[1]) for j in range(N) if floor[j]}
    return kept


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_kept_set_is_the_layer_joint_top(budget: float, seed: int) -> None:
    scores = _scores(seed)
    plan = _finalize(scores, budget=budget, sink=4, window=32)
    b_mean = uniform_head_budget(N, budget, None)
    floor = sink_window_mask(N, 4, 32, "cpu")
    assert not plan.has_dynamic
    assert torch.all(plan.budgets.sum(dim=1) == HKV * b_mean)  # each layer: H × b_mean
    assert int(plan.budgets.min()) >= 36 and int(plan.budgets.max()) <= N
    got = {
        (layer, h, int(j))
        for layer in range(L)
        for h in range(HKV)
        for j in plan.kept_positions_of(layer, h)
    }
    assert got == _reference_kept(scores, floor, b_mean)


def test_concentrated_heads_get_less_than_spread_heads() -> None:
    plan = _finalize(_scores(0), budget=0.3, sink=4, window=32)
    assert torch.all(plan.budgets[:, 0] < 60) and torch.all(plan.budgets[:, 3] > 60)


def test_budget_below_the_floor_scales_the_floor_down() -> None:
    plan = _finalize(_scores(0), budget=0.1, sink=4, window=32)  # b_mean 20 < 36
    assert torch.all(plan.budgets == 20)
    assert (plan.sink, plan.window) == (0, 20)
    for h in range(HKV):
        assert plan.kept_positions_of(1, h).tolist() == list(range(N - 20, N))


@pytest.mark.parametrize(
    "scores,floor,per_head,expected",
    [
        # layer of 2 heads, N = 4, floor at position 3; 2 × (3 - 1) = 4 free entries
        ([[[9, 8, 7, 0], [1, 2, 3, 0]]], [0, 0, 0, 1], 3, [[4, 2]]),
        ([[[9, 0, 0, 0], [5, 5, 5, 0]]], [0, 0, 0, 1], 2, [[2, 2]]),
        ([[[9, 0, 0, 0], [5, 5, 5, 0]]], [0, 0, 0, 1], 3, [[2, 4]]),
        ([[[1, 1, 1, 1], [1, 1, 1, 1]]], [0, 0, 0, 1], 2, [[3, 1]]),  # ties: lower head first
        ([[[1, 2, 3, 4], [4, 3, 2, 1]]], [0, 0, 0, 0], 4, [[4, 4]]),
    ],
)
def test_flattened_top_budgets_cases(
    scores: list, floor: list, per_head: int, expected: list
) -> None:
    got = flattened_top_budgets(
        torch.tensor(scores, dtype=torch.float32), torch.tensor(floor, dtype=torch.bool), per_head
    )
    assert got.tolist() == expected


def test_flattened_top_budgets_rejects_budgets_outside_floor_and_n() -> None:
    scores, floor = torch.rand(1, 2, 10), torch.zeros(10, dtype=torch.bool)
    floor[:4] = True
    with pytest.raises(ValueError, match="per_head"):
        flattened_top_budgets(scores, floor, 3)
    with pytest.raises(ValueError, match="per_head"):
        flattened_top_budgets(scores, floor, 11)
