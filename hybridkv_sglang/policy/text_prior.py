"""Stage 3a: static heads keep sink and window, then text tokens, then visual tokens.

In a multimodal prompt the text carries the instruction and the few tokens the answer hinges on,
while thousands of visual patches are redundant; so within a static head's budget text outranks
vision, and each group is ordered by the head's pooled window-attention score (HybridKV, the text
prior of the pruning stage). Pruning is permanent for the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.policy.selection import keep_top_by_priority, mask_to_csr, sink_window_mask

TIER_SINK_WINDOW = 3
TIER_FOCUS = 2
TIER_TEXT = 1
TIER_VISUAL = 0

STATIC_PRIORITIES = ("text", "focus")


@dataclass(frozen=True)
class TextPriorSelector:
    """Static heads: keep sink + window, then text, then visual tokens by pooled score.

    ``priority="focus"`` (the policies' default, not DESIGN §2) ranks the head's own focus set
    ``U`` between sink/window and text: stage 2 sized the head's budget by ``|U|``, and with
    text-first a head whose focus is on visual tokens spends that budget on text instead
    (``docs/quality-diagnosis.md``).
    """

    priority: str = "text"

    def __post_init__(self) -> None:
        if self.priority not in STATIC_PRIORITIES:
            raise ValueError(
                f"static priority must be one of {STATIC_PRIORITIES}, got {self.priority!r}"
            )

    def priority_tiers(self, is_text: Tensor, sink: int, window: int) -> Tensor:
        """``[N]`` int64 tier per position: 3 sink/window, 1 text, 0 visual."""
        n = is_text.numel()
        tier = torch.where(is_text, TIER_TEXT, TIER_VISUAL).to(torch.int64)
        return torch.where(
            sink_window_mask(n, sink, window, is_text.device), TIER_SINK_WINDOW, tier
        )

    def select_mask(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        sink: int,
        window: int,
        focus: Tensor | None = None,
    ) -> Tensor:
        """Like :meth:`select`, as a ``[L * H_kv, N]`` bool mask (layer-major rows)."""
        if scores.dim() != 3:
            raise ValueError(f"expected scores [L, H_kv, N], got {tuple(scores.shape)}")
        num_layers, num_heads, n = scores.shape
        if is_text.shape != (n,) or is_text.dtype != torch.bool:
            raise ValueError(
                f"expected is_text [{n}] bool, got {tuple(is_text.shape)} {is_text.dtype}"
            )
        if budgets.shape != (num_layers, num_heads):
            raise ValueError(
                f"expected budgets [{num_layers}, {num_heads}], got {tuple(budgets.shape)}"
            )
        if sink < 0 or window < 0 or sink + window > n:
            raise ValueError(
                f"expected sink, window >= 0 with sink + window <= N={n}, got {sink}, {window}"
            )
        tier = self.priority_tiers(is_text.to(scores.device), sink, window)
        if self.priority == "focus":
            if focus is None or focus.shape != scores.shape or focus.dtype != torch.bool:
                raise ValueError(
                    f"priority='focus' expects focus [L, H_kv, N] bool like scores "
                    f"{tuple(scores.shape)}, got {None if focus is None else tuple(focus.shape)}"
                )
            promote = focus.to(scores.device) & (tier != TIER_SINK_WINDOW)
            tier = torch.where(promote, TIER_FOCUS, tier).reshape(num_layers * num_heads, n)
        return keep_top_by_priority(
            tier, scores.reshape(num_layers * num_heads, n), budgets.reshape(-1).to(scores.device)
        )

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        sink: int,
        window: int,
        focus: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Kept positions of every head, as CSR.

        Args:
            scores: ``[L, H_kv, N]`` float32 pooled scores (:func:`pooled_scores`).
            is_text: ``[N]`` bool, ``True`` for text tokens, ``False`` for visual ones.
            budgets: ``[L, H_kv]`` int64, positions to keep per head (``>= sink + window`` to
                keep the whole sink and window).
            sink, window: sizes of the always-kept prefix and suffix (``sink + window <= N``).
            focus: ``[L, H_kv, N]`` bool focus sets ``U``; needed only for ``priority="focus"``.

        Returns:
            ``indptr [L*H_kv + 1]`` int64 and ``positions [nnz]`` int32, ascending per row.
        """
        return mask_to_csr(self.select_mask(scores, is_text, budgets, sink, window, focus))
