"""PyramidKV baseline: layer budgets shrinking linearly with depth, SnapKV selection per head.

PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024,
arXiv:2406.02069).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation, water_fill
from hybridkv_sglang.policy.baselines import SinkWindowTopPolicy
from hybridkv_sglang.policy.compressor import Geometry
from hybridkv_sglang.policy.hyperparameters import hyperparameter
from hybridkv_sglang.policy.registry import register_policy


def pyramid_budgets(
    num_layers: int, num_heads: int, head_budget: int, floor: int, prompt_len: int, beta: float
) -> Tensor:
    """Per-head budgets decreasing linearly from the first layer to the last (PyramidKV).

    Above the floor, the last layer gets ``e / beta`` and the first ``2e - e / beta`` (``e =
    b_mean - floor``, the mean share), layers in between on the line joining them, so the mean is
    ``e``; heads of one layer share alike. Caps at ``N`` hand their surplus to the other layers
    in proportion (:func:`water_fill`), so the total stays ``L × H × b_mean`` whenever
    ``floor <= b_mean <= N``; below the floor every head keeps the floor alone.

    Returns:
        ``[L, H]`` int64 budgets in ``[floor, N]``.
    """
    if beta < 1:
        raise ValueError(f"beta must be >= 1 (the last layer's share is 1/beta), got {beta}")
    extra = head_budget - floor
    if extra <= 0:
        return torch.full((num_layers, num_heads), floor, dtype=torch.int64)
    top, bottom = extra / beta, 2 * extra - extra / beta
    depth = torch.arange(num_layers, dtype=torch.float64) / max(1, num_layers - 1)
    weights = (bottom - (bottom - top) * depth).repeat_interleave(num_heads)
    shares = water_fill(weights, num_layers * num_heads * extra, 0, prompt_len - floor)
    return shares.view(num_layers, num_heads) + floor


@register_policy
@dataclass(frozen=True)
class PyramidKVPolicy(SinkWindowTopPolicy):
    """Every head static; layer ``l`` keeps a budget falling linearly with ``l``, same total ``B``
    as uniform budgets; within a head, sink + window, then the top keys by pooled window-attention
    score (SnapKV). No text prior.
    """

    name: ClassVar[str] = "pyramidkv"
    pyramid_beta: float = hyperparameter(
        20.0,
        ge=1,
        doc="the last layer's share of the mean per-head budget above the floor is 1/beta, the "
        "first layer's 2 - 1/beta (20: the paper's setting)",
    )

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        num_layers, num_heads = focus.shape
        budgets = pyramid_budgets(
            num_layers, num_heads, geo.head_budget, geo.floor, geo.prompt_len, self.pyramid_beta
        )
        return BudgetAllocation(
            is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
            budgets=budgets.to(focus.device),
            total=geo.head_budget * focus.numel(),
        )
