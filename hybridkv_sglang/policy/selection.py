"""Shared selection logic: keep the top ``b[r]`` positions of each row by (tier, score).

Every pruning policy (text-prior, SnapKV, StreamingLLM) is "rank the positions, keep a prefix";
they differ only in the ranking. Ranking is lexicographic: a higher tier always wins, the score
orders positions within a tier, and ties go to the lower position. Results are CSR over rows with
ascending positions, the layout the page-table builder consumes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_top_by_priority(tier: Tensor, scores: Tensor, budgets: Tensor) -> Tensor:
    """Mask of the ``budgets[r]`` best positions of each row.

    Args:
        tier: ``[R, N]`` or ``[N]`` int (broadcast over rows), higher = kept first.
        scores: ``[R, N]`` float, orders positions within a tier (higher first).
        budgets: ``[R]`` int, positions to keep per row; values above ``N`` keep the whole row.

    Returns:
        ``[R, N]`` bool, exactly ``min(budgets[r], N)`` ``True`` per row.
    """
    if scores.dim() != 2:
        raise ValueError(f"expected scores [R, N], got {tuple(scores.shape)}")
    rows, n = scores.shape
    if budgets.shape != (rows,):
        raise ValueError(f"expected budgets [{rows}], got {tuple(budgets.shape)}")
    if budgets.numel() and int(budgets.min()) < 0:
        raise ValueError("budgets must be >= 0")
    tier = tier.expand(rows, n)
    # Two stable sorts give the lexicographic order: by score, then by tier.
    by_score = torch.argsort(scores, dim=-1, descending=True, stable=True)
    by_tier = torch.argsort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True)
    order = by_score.gather(-1, by_tier)  # [R, N], best first
    rank_kept = torch.arange(n, device=scores.device).unsqueeze(0) < budgets.unsqueeze(1)
    kept = torch.zeros(rows, n, dtype=torch.bool, device=scores.device)
    kept.scatter_(-1, order, rank_kept)
    return kept


def mask_to_csr(kept: Tensor) -> tuple[Tensor, Tensor]:
    """``[R, N]`` bool -> ``indptr [R + 1]`` int64, ``positions [nnz]`` int32 ascending per row."""
    if kept.dim() != 2 or kept.dtype != torch.bool:
        raise ValueError(f"expected kept [R, N] bool, got {tuple(kept.shape)} {kept.dtype}")
    counts = kept.sum(dim=-1)
    indptr = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=kept.device)
    torch.cumsum(counts, dim=0, out=indptr[1:])
    positions = kept.nonzero()[:, 1].to(torch.int32)  # row-major: ascending within a row
    return indptr, positions


def sink_window_mask(prompt_len: int, sink: int, window: int, device: torch.device) -> Tensor:
    """``[N]`` bool, ``True`` on the first ``sink`` and the last ``window`` positions."""
    pos = torch.arange(prompt_len, device=device)
    return (pos < sink) | (pos >= prompt_len - window)


def keep_sink_window_then_top(scores: Tensor, budgets: Tensor, sink: int, window: int) -> Tensor:
    """Mask keeping sink and window first, then the highest ``scores`` (no text prior).

    Args:
        scores: ``[R, N]`` float, any per-position criterion (higher is kept first).
        budgets: ``[R]`` int, positions per row (``>= sink + window`` keeps both whole).

    Returns:
        ``[R, N]`` bool, ``min(budgets[r], N)`` ``True`` per row.
    """
    n = scores.shape[-1]
    tier = sink_window_mask(n, sink, window, scores.device).to(torch.int64)
    return keep_top_by_priority(tier, scores, budgets)
