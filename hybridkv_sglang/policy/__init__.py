"""Stages 1-3 of HybridKV in pure torch (never imports sglang).

Entry points for the runtime: :func:`build_policy` -> a policy with ``observe_layer`` (per layer,
end of prefill) and ``finalize`` (-> :class:`CompressionPlan`). Importing the package imports
every module in it, so every ``@register_policy`` class is in :data:`POLICIES`.
"""

from hybridkv_sglang.policy.adakv import AdaKVPolicy, flattened_top_budgets
from hybridkv_sglang.policy.allocate import (
    BudgetAllocation,
    TopDownAllocator,
    uniform_head_budget,
    water_fill,
)
from hybridkv_sglang.policy.baselines import (
    AllDynamicPolicy,
    AllStaticPolicy,
    SnapKVPolicy,
    StreamingPolicy,
)
from hybridkv_sglang.policy.chunk_retrieval import (
    ChunkRetriever,
    budget_top_k,
    chunk_bounds,
    dynamic_head_budget,
    resident_bounds,
    resident_mask,
    retrievable_chunk_range,
    retrieved_mask,
    select_chunks,
)
from hybridkv_sglang.policy.classify import FocusClassifier
from hybridkv_sglang.policy.compressor import (
    CompressionPolicy,
    Geometry,
    HybridKVPolicy,
    LayerObservation,
)
from hybridkv_sglang.policy.flashcache import FlashCachePolicy, dct_lowpass, outlier_scores
from hybridkv_sglang.policy.head_stats import (
    HeadStats,
    HeadStatsReducer,
    focus_set,
    focus_size,
    pooled_scores,
)
from hybridkv_sglang.policy.hyperparameters import Hyperparameter, hyperparameter
from hybridkv_sglang.policy.lookm import LookMPolicy, average_merge
from hybridkv_sglang.policy.plan import CompressionPlan
from hybridkv_sglang.policy.pyramidkv import PyramidKVPolicy, pyramid_budgets
from hybridkv_sglang.policy.registry import (
    POLICIES,
    build_policy,
    discover_policies,
    register_policy,
)
from hybridkv_sglang.policy.text_prior import TextPriorSelector
from hybridkv_sglang.policy.window_attention import window_attention

__all__ = [
    "POLICIES",
    "AdaKVPolicy",
    "AllDynamicPolicy",
    "AllStaticPolicy",
    "BudgetAllocation",
    "ChunkRetriever",
    "CompressionPlan",
    "CompressionPolicy",
    "FlashCachePolicy",
    "FocusClassifier",
    "Geometry",
    "HeadStats",
    "HeadStatsReducer",
    "HybridKVPolicy",
    "Hyperparameter",
    "LayerObservation",
    "LookMPolicy",
    "PyramidKVPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TextPriorSelector",
    "TopDownAllocator",
    "average_merge",
    "budget_top_k",
    "build_policy",
    "chunk_bounds",
    "dct_lowpass",
    "dynamic_head_budget",
    "flattened_top_budgets",
    "focus_set",
    "focus_size",
    "hyperparameter",
    "outlier_scores",
    "pooled_scores",
    "pyramid_budgets",
    "register_policy",
    "resident_bounds",
    "resident_mask",
    "retrievable_chunk_range",
    "retrieved_mask",
    "select_chunks",
    "uniform_head_budget",
    "water_fill",
    "window_attention",
]

discover_policies()
