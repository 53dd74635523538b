"""Stage 3a: sink and window first, then text, then visual, each by pooled score."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.policy import TextPriorSelector
from hybridkv_sglang.policy.selection import keep_top_by_priority, mask_to_csr

N, SINK, WINDOW = 40, 2, 4
TEXT = list(range(2, 8)) + list(range(30, 36))  # 12 text tokens outside sink/window
VISUAL = [p for p in range(SINK, N - WINDOW) if p not in TEXT]
RESIDENT = [0, 1, *range(N - WINDOW, N)]


def _layout() -> tuple[torch.Tensor, torch.Tensor]:
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[TEXT] = True
    is_text[RESIDENT] = True  # the window is the text question
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 1, N, generator=gen) * 0.01
    scores[0, 0, VISUAL] += 1.0  # vision outscores text ...
    scores[0, 0, RESIDENT] = 0.0  # ... and the sink/window have no votes at all
    return scores, is_text


def _select(budget: int) -> list[int]:
    scores, is_text = _layout()
    indptr, pos = TextPriorSelector().select(
        scores, is_text, torch.tensor([[budget]]), SINK, WINDOW
    )
    assert indptr.tolist() == [0, budget]
    return pos.tolist()


@pytest.mark.parametrize("budget", [6, 10, 18, 21, N])
def test_priority_sink_window_then_text_then_visual(budget: int) -> None:
    scores, _ = _layout()
    kept = _select(budget)
    assert kept == sorted(kept) and len(kept) == budget
    text_by_score = sorted(TEXT, key=lambda p: -float(scores[0, 0, p]))
    visual_by_score = sorted(VISUAL, key=lambda p: -float(scores[0, 0, p]))
    expected = (RESIDENT + text_by_score + visual_by_score)[:budget]
    assert kept == sorted(expected)


def test_text_outranks_higher_scored_visual() -> None:
    kept = set(_select(len(RESIDENT) + 3))
    assert not kept & set(VISUAL)
    assert len(kept & set(TEXT)) == 3


def test_rows_are_independent_and_csr_is_layer_major() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, N, generator=gen)
    is_text = torch.rand(N, generator=gen) < 0.3
    budgets = torch.tensor([[6, 7, 8], [9, 10, 40]])
    indptr, pos = TextPriorSelector().select(scores, is_text, budgets, SINK, WINDOW)
    assert indptr.dtype == torch.int64 and pos.dtype == torch.int32
    assert torch.equal(indptr.diff(), budgets.flatten())
    for r in range(6):
        row = pos[indptr[r] : indptr[r + 1]]
        assert torch.all(row.diff() > 0)
        assert set(RESIDENT) <= set(row.tolist())
        one = TextPriorSelector().select(
            scores.view(6, 1, 1, N)[r], is_text, budgets.view(6, 1, 1)[r], SINK, WINDOW
        )[1]
        assert torch.equal(one, row)


def test_keep_top_by_priority_matches_python_sort() -> None:
    gen = torch.Generator().manual_seed(2)
    tier = torch.randint(0, 3, (5, 23), generator=gen)
    scores = torch.randint(0, 4, (5, 23), generator=gen).float()  # many ties
    budgets = torch.tensor([0, 1, 7, 22, 30])
    kept = keep_top_by_priority(tier, scores, budgets)
    for r in range(5):
        order = sorted(range(23), key=lambda j, r=r: (-int(tier[r, j]), -float(scores[r, j]), j))
        assert set(kept[r].nonzero().flatten().tolist()) == set(order[: int(budgets[r])])


def test_mask_to_csr_round_trip() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    indptr, pos = mask_to_csr(mask)
    assert indptr.tolist() == [0, 2, 2, 5]
    assert pos.tolist() == [0, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(is_text=torch.zeros(N - 1, dtype=torch.bool)), "is_text"),
        (dict(is_text=torch.zeros(N, dtype=torch.int64)), "is_text"),
        (dict(budgets=torch.tensor([5])), "budgets"),
        (dict(sink=30, window=20), "sink"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    args = dict(
        scores=torch.rand(1, 1, N),
        is_text=torch.zeros(N, dtype=torch.bool),
        budgets=torch.tensor([[8]]),
        sink=SINK,
        window=WINDOW,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TextPriorSelector().select(**args)


def test_focus_priority_ranks_the_heads_focus_set_before_text() -> None:
    """Opt-in ``priority="focus"``: a visual focus member outranks every text token."""
    scores, is_text = _layout()
    focus = torch.zeros(1, 1, N, dtype=torch.bool)
    low_visual = min(VISUAL, key=lambda p: float(scores[0, 0, p]))
    focus[0, 0, [low_visual, 0]] = True  # 0 is in the sink: stays in the top tier anyway
    budget = torch.tensor([[len(RESIDENT) + 1]])
    _, text_first = TextPriorSelector("text").select(scores, is_text, budget, SINK, WINDOW)
    _, focus_first = TextPriorSelector("focus").select(scores, is_text, budget, SINK, WINDOW, focus)
    assert low_visual not in text_first.tolist()
    assert focus_first.tolist() == sorted([*RESIDENT, low_visual])


def test_focus_priority_needs_focus_sets() -> None:
    scores, is_text = _layout()
    with pytest.raises(ValueError, match="focus"):
        TextPriorSelector("focus").select(scores, is_text, torch.tensor([[8]]), SINK, WINDOW)
    with pytest.raises(ValueError, match="priority"):
        TextPriorSelector("visual")
