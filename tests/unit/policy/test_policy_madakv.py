"""MadaKV: each head's text/visual split follows its preference; unspent quota moves deeper."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_sglang.policy import LayerObservation, uniform_head_budget
from hybridkv_sglang.policy.madakv import MadaKVPolicy, modality_quotas
from hybridkv_sglang.policy.selection import sink_window_mask

L, HKV, N = 3, 4, 400


def _request(seed: int, n_text: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[L, H, N]`` scores with ``n_text`` text tokens spread over the prompt; head 0 of
    every layer puts its mass on text, head 1 on visual tokens, heads 2 and 3 are random."""
    gen = torch.Generator().manual_seed(seed)
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[torch.randperm(N, generator=gen)[:n_text]] = True
    scores = torch.rand(L, HKV, N, generator=gen)
    scores[:, 0, ~is_text] *= 0.01
    scores[:, 1, is_text] *= 0.01
    return scores, is_text


def _finalize(scores: torch.Tensor, is_text: torch.Tensor, **kw: object):
    policy = MadaKVPolicy(**kw)  # type: ignore[arg-type]
    focus = torch.full((HKV,), N, dtype=torch.int64)
    costs = policy.costs(64, torch.float32)
    obs = [LayerObservation(layer, N, focus, s, costs) for layer, s in enumerate(scores)]
    return policy.finalize(obs, is_text)


def _kept_text(plan, layer: int, head: int, is_text: torch.Tensor, floor: torch.Tensor) -> int:
    kept = torch.zeros(N, dtype=torch.bool)
    kept[plan.kept_positions_of(layer, head).long()] = True
    return int((kept & is_text & ~floor).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [0.15, 0.3])
def test_a_text_preferring_head_keeps_more_text(seed: int, budget: float) -> None:
    scores, is_text = _request(seed)
    plan = _finalize(scores, is_text, budget=budget, sink=4, window=32)
    floor = sink_window_mask(N, 4, 32, "cpu")
    b_mean = uniform_head_budget(N, budget, None)
    assert not plan.has_dynamic and int(plan.budgets.sum()) == L * HKV * b_mean
    for layer in range(L):
        text_head = _kept_text(plan, layer, 0, is_text, floor)
        visual_head = _kept_text(plan, layer, 1, is_text, floor)
        assert text_head > visual_head
        # the visual head keeps (almost) only visual tokens above its floor
        assert visual_head <= 0.05 * (int(plan.budgets[layer, 1]) - 36) + 1


@pytest.mark.parametrize("seed", [3, 4])
def test_each_modality_keeps_its_top_scores(seed: int) -> None:
    scores, is_text = _request(seed)
    plan = _finalize(scores, is_text, budget=0.25, sink=4, window=32)
    floor = sink_window_mask(N, 4, 32, "cpu")
    for layer in range(L):
        for head in range(HKV):
            kept = torch.zeros(N, dtype=torch.bool)
            kept[plan.kept_positions_of(layer, head).long()] = True
            assert kept[floor].all()
            s = scores[layer, head]
            for modality in (is_text, ~is_text):
                cand = modality & ~floor
                if (kept & cand).any() and (~kept & cand).any():
                    assert s[kept & cand].min() >= s[~kept & cand].max()


def test_quota_a_modality_cannot_use_moves_to_the_next_layer() -> None:
    """Every head prefers text but only 10 text tokens exist: layer 0 keeps 10 text and its
    visual share; the rest goes to layer 1, and so on; the last layer fills visual."""
    preference = torch.full((3, 2), 0.8)
    text, visual = modality_quotas(preference, extra=50, num_text=10, num_visual=500)
    assert text.tolist() == [[10, 10], [10, 10], [10, 10]]
    assert visual.tolist() == [[10, 10], [16, 16], [94, 94]]
    assert int(text.sum() + visual.sum()) == 3 * 2 * 50


@settings(max_examples=80, deadline=None)
@given(
    layers=st.integers(1, 5),
    heads=st.integers(1, 6),
    extra=st.integers(0, 120),
    num_text=st.integers(0, 200),
    num_visual=st.integers(0, 400),
    seed=st.integers(0, 2**16),
)
def test_quotas_stay_within_each_modality_and_sum_to_b(
    layers: int, heads: int, extra: int, num_text: int, num_visual: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    preference = torch.rand(layers, heads, generator=gen)
    text, visual = modality_quotas(preference, extra, num_text, num_visual)
    assert int(text.min()) >= 0 and int(visual.min()) >= 0
    assert int(text.max()) <= num_text and int(visual.max()) <= num_visual
    # B is kept, unless every head keeps its whole prompt
    assert int(text.sum() + visual.sum()) == layers * heads * min(extra, num_text + num_visual)


def test_a_prompt_without_visual_tokens_keeps_text_only() -> None:
    scores, _ = _request(5)
    is_text = torch.ones(N, dtype=torch.bool)
    plan = _finalize(scores, is_text, budget=0.2, sink=4, window=32)
    assert torch.all(plan.budgets == uniform_head_budget(N, 0.2, None))
