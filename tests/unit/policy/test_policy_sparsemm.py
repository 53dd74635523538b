"""SparseMM: budgets follow per-request visual scores, sum to B, SnapKV selection within a head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.policy import LayerObservation, build_policy, uniform_head_budget
from hybridkv_sglang.policy.selection import sink_window_mask
from hybridkv_sglang.policy.sparsemm import SparseMMPolicy, sparsemm_budgets

L, HKV, N = 3, 4, 300


def _request(seed: int, visual_heads: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[L, H, N]`` scores and an ``[N]`` text mask (text: the first 40 and last 40
    tokens); the heads in ``visual_heads`` put most of their mass on visual tokens, the others
    on text."""
    gen = torch.Generator().manual_seed(seed)
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[:40] = True
    is_text[-40:] = True
    scores = torch.rand(L, HKV, N, generator=gen)
    scores[..., ~is_text] *= 0.05
    for layer, head in visual_heads:
        scores[layer, head, ~is_text] *= 200.0
    return scores, is_text


def _finalize(scores: torch.Tensor, is_text: torch.Tensor, **kw: object):
    policy = SparseMMPolicy(**kw)  # type: ignore[arg-type]
    focus = torch.full((HKV,), N, dtype=torch.int64)
    costs = policy.costs(64, torch.float32)
    obs = [LayerObservation(layer, N, focus, s, costs) for layer, s in enumerate(scores)]
    return policy.finalize(obs, is_text)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_heads_with_more_visual_attention_get_more_budget(seed: int, budget: float) -> None:
    visual = [(0, 1), (2, 3)]
    scores, is_text = _request(seed, visual)
    plan = _finalize(scores, is_text, budget=budget, sink=4, window=32)
    b_mean = uniform_head_budget(N, budget, None)
    assert not plan.has_dynamic
    assert int(plan.budgets.sum()) == L * HKV * b_mean
    textual = [
        int(plan.budgets[layer, head])
        for layer in range(L)
        for head in range(HKV)
        if (layer, head) not in visual
    ]
    assert min(int(plan.budgets[lh]) for lh in visual) > max(textual)
    # the uniform share is a floor: every head keeps at least 10 % of what is above sink + window
    assert int(plan.budgets.min()) >= 36 + int(0.1 * (b_mean - 36))


@pytest.mark.parametrize("seed", [3, 4])
def test_selection_is_sink_window_then_top_scores(seed: int) -> None:
    scores, is_text = _request(seed, [(1, 0)])
    plan = _finalize(scores, is_text, budget=0.3, sink=4, window=32)
    floor = sink_window_mask(N, 4, 32, "cpu")
    for layer in range(L):
        for head in range(HKV):
            kept = torch.zeros(N, dtype=torch.bool)
            kept[plan.kept_positions_of(layer, head).long()] = True
            assert kept[floor].all()
            s = scores[layer, head]
            assert s[kept & ~floor].min() >= s[~kept].max()


def test_uniform_share_one_or_no_visual_tokens_gives_uniform_budgets() -> None:
    scores, is_text = _request(5, [(0, 0)])
    b_mean = uniform_head_budget(N, 0.2, None)
    uniform = _finalize(scores, is_text, budget=0.2, sparsemm_uniform_share=1.0)
    assert torch.all(uniform.budgets == b_mean)
    text_only = _finalize(scores, torch.ones(N, dtype=torch.bool), budget=0.2)
    assert torch.all(text_only.budgets == b_mean)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 5),
    heads=st.integers(1, 6),
    n=st.integers(40, 500),
    ratio=st.floats(0.05, 1.0),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_budgets_sum_to_b_within_floor_and_n(
    layers: int, heads: int, n: int, ratio: float, share: float, seed: int
) -> None:
    floor = 20
    b_mean = max(floor, uniform_head_budget(n, ratio, None))
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(layers, heads, generator=gen) ** 4
    got = sparsemm_budgets(score, b_mean, floor, n, share)
    assert got.shape == (layers, heads) and int(got.min()) >= floor and int(got.max()) <= n
    assert int(got.sum()) == layers * heads * b_mean


def test_config_field_reaches_the_policy_and_only_it() -> None:
    config = HybridKVConfig(policy="sparsemm", sparsemm_uniform_share=0.5)
    assert config.policy_values()["sparsemm_uniform_share"] == 0.5
    assert build_policy("sparsemm", **config.policy_values()).sparsemm_uniform_share == 0.5
    assert (
        "sparsemm_uniform_share"
        not in config.model_copy(update={"policy": "snapkv"}).policy_values()
    )
    with pytest.raises(ValueError, match=r"sparsemm_uniform_share must be in \[0, 1\], got 1.5"):
        build_policy("sparsemm", sparsemm_uniform_share=1.5)
