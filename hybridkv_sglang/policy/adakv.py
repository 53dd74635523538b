"""Ada-KV baseline: one budget per layer, shared by its heads through a joint top-k.

Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference
(Feng et al., 2024, arXiv:2407.11550).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation
from hybridkv_sglang.policy.baselines import SinkWindowTopPolicy
from hybridkv_sglang.policy.compressor import Geometry
from hybridkv_sglang.policy.registry import register_policy
from hybridkv_sglang.policy.selection import sink_window_mask


def flattened_top_budgets(scores: Tensor, floor: Tensor, per_head: int) -> Tensor:
    """Per-head budgets from one joint top-k over each layer's heads (Ada-KV's allocation).

    Every head keeps its ``floor`` positions; the rest of the layer's ``H × per_head`` entries go
    to the highest scores among all its heads' other positions taken together, so a head whose
    score mass sits on few keys ends with fewer entries and a head with spread scores with more.
    Ties go to the lower (head, position).

    Args:
        scores: ``[L, H, N]`` float, scores comparable across the heads of a layer (each head's
            window-attention rows sum to one).
        floor: ``[N]`` bool, positions every head keeps.
        per_head: the mean per-head budget, ``>= floor.sum()``; at most ``N``.

    Returns:
        ``[L, H]`` int64 budgets in ``[floor.sum(), N]``, each layer's summing to ``H × per_head``.
    """
    num_layers, num_heads, n = scores.shape
    n_floor = int(floor.sum())
    if not n_floor <= per_head <= n:
        raise ValueError(f"expected floor {n_floor} <= per_head <= N={n}, got {per_head}")
    free = torch.where(floor, float("-inf"), scores.float()).reshape(num_layers, -1)  # [L, H*N]
    order = torch.argsort(free, dim=-1, descending=True, stable=True)
    picked = order[:, : num_heads * (per_head - n_floor)] // n  # head of each picked entry
    counts = torch.zeros(num_layers, num_heads, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(1, picked, torch.ones_like(picked))
    return counts + n_floor


@register_policy
@dataclass(frozen=True)
class AdaKVPolicy(SinkWindowTopPolicy):
    """Every head static; each layer keeps ``H_kv × b_mean`` entries, split among its heads by a
    joint top-k of their pooled window-attention scores (SnapKV scores, Ada-KV allocation).

    Each head keeps sink + window (the floor Ada-KV's safeguard plays), then the layer's best
    remaining (head, key) pairs. No text prior; with ``b_mean`` below the floor every head keeps
    the floor alone.
    """

    name: ClassVar[str] = "adakv"

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        floor = sink_window_mask(geo.prompt_len, geo.sink, geo.window, scores.device)
        budgets = flattened_top_budgets(scores, floor, max(geo.head_budget, geo.floor))
        return BudgetAllocation(
            is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
            budgets=budgets,
            total=geo.head_budget * focus.numel(),
        )
