"""Baselines and ablations, run by the same machinery as the method (see ``compressor.py``).

They share every hyper-parameter field with :class:`HybridKVPolicy` so the runtime can build any
of them from one config; a baseline ignores the fields its idea does not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation
from hybridkv_sglang.policy.chunk_retrieval import budget_top_k
from hybridkv_sglang.policy.compressor import CompressionPolicy, Geometry
from hybridkv_sglang.policy.registry import register_policy
from hybridkv_sglang.policy.selection import keep_sink_window_then_top, keep_top_by_priority


def uniform_allocation(focus: Tensor, per_head: int) -> BudgetAllocation:
    """Every head static with ``per_head`` entries."""
    return BudgetAllocation(
        is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
        budgets=torch.full_like(focus, per_head, dtype=torch.int64),
        total=per_head * focus.numel(),
    )


@dataclass(frozen=True)
class StaticOnlyPolicy(CompressionPolicy):
    """Base of the baselines that prune every head once: no stage-1 classification, no chunk
    bounds."""

    needs_chunk_bounds: ClassVar[bool] = False

    def classify(self, focus: Tensor, geo: Geometry) -> Tensor:
        return torch.zeros_like(focus, dtype=torch.bool)


@dataclass(frozen=True)
class SinkWindowTopPolicy(StaticOnlyPolicy):
    """Base of the static baselines that keep sink + window, then the top keys by their score."""

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        geo: Geometry,
        focus_sets: Tensor | None = None,
    ) -> Tensor:
        n = geo.prompt_len
        return keep_sink_window_then_top(
            scores.reshape(-1, n), budgets.reshape(-1), geo.sink, geo.window
        )


@register_policy
@dataclass(frozen=True)
class SnapKVPolicy(StaticOnlyPolicy):
    """Every head static with the uniform budget ``max(b_mean, w)``: the window plus the top
    keys by pooled window votes, no text prior.

    SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024,
    arXiv:2404.14469).
    """

    name: ClassVar[str] = "snapkv"

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        return uniform_allocation(focus, min(geo.prompt_len, max(geo.head_budget, geo.window)))

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        geo: Geometry,
        focus_sets: Tensor | None = None,
    ) -> Tensor:
        n = geo.prompt_len
        tier = (torch.arange(n, device=scores.device) >= n - geo.window).to(torch.int64)
        return keep_top_by_priority(tier, scores.reshape(-1, n), budgets.reshape(-1))


@register_policy
@dataclass(frozen=True)
class StreamingPolicy(StaticOnlyPolicy):
    """Every head static with ``max(b_mean, sink)`` entries: the sink plus the most recent tokens.

    StreamingLLM: Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023,
    arXiv:2309.17453).
    """

    name: ClassVar[str] = "streaming"

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        return uniform_allocation(focus, min(geo.prompt_len, max(geo.head_budget, geo.sink)))

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        geo: Geometry,
        focus_sets: Tensor | None = None,
    ) -> Tensor:
        n = geo.prompt_len
        pos = torch.arange(n, device=scores.device)
        tier = (pos < geo.sink).to(torch.int64)
        recency = pos.to(torch.float32).expand(scores.shape[0] * scores.shape[1], n)
        return keep_top_by_priority(tier, recency, budgets.reshape(-1))


@register_policy
@dataclass(frozen=True)
class AllStaticPolicy(StaticOnlyPolicy):
    """Ablation: the method with every head static (text-prior pruning, budgets ∝ ``|U|``)."""

    name: ClassVar[str] = "all_static"


@register_policy
@dataclass(frozen=True)
class AllDynamicPolicy(CompressionPolicy):
    """Ablation: every head dynamic (chunk retrieval everywhere; Quest-like, Tang et al., ICML
    2024) at the same budget as the others.

    Each request retrieves ``k = (b_mean - resident) // C`` chunks per step
    (:func:`budget_top_k`; ``top_k_chunks`` and ``dynamic_top_k`` are ignored), so a head reads
    at most ``b_mean`` entries. When not even one chunk fits (``b_mean`` below the sink and
    window rounded out to chunk borders) no head is dynamic and the request is pruned like
    ``all_static``.
    """

    name: ClassVar[str] = "all_dynamic"
    demote_unaffordable: ClassVar[bool] = False

    def classify(self, focus: Tensor, geo: Geometry) -> Tensor:
        return torch.ones_like(focus, dtype=torch.bool)

    def chunks_per_step(self, prompt_len: int, sink: int, window: int, head_budget: int) -> int:
        return budget_top_k(prompt_len, sink, window, self.chunk_size, head_budget)
