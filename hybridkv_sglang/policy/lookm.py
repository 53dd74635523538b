"""LOOK-M baseline: text-prior eviction, then the evicted KV merged into the kept KV.

LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference (Wan et
al., 2024, arXiv:2406.18139). Every head is pruned once, after prefill, to the uniform budget:
sink and window, then text tokens, then visual tokens by pooled window attention (the text prior
the method's static heads use). Instead of dropping what it evicts, LOOK-M's averaged merging
folds each evicted token into the kept token whose key is most similar (cosine), so a kept entry
becomes the mean of itself and the tokens it absorbed, keys and values alike.

Merged KV differs from the prompt's KV, so it can only live in compact entries (storage
``compact``), never in the prefix slots the radix tree shares: the policy marks its plans
``merge_evicted`` and the runtime merges when it fills the compact entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation
from hybridkv_sglang.policy.baselines import StaticOnlyPolicy, uniform_allocation
from hybridkv_sglang.policy.compressor import Geometry
from hybridkv_sglang.policy.registry import register_policy

_SIMILARITY_BLOCK = 4096
"""Evicted tokens compared at once, bounding the ``[block, kept]`` similarity matrix."""


@register_policy
@dataclass(frozen=True)
class LookMPolicy(StaticOnlyPolicy):
    """Every head static with ``max(b_mean, sink + window)`` entries, text-prior selection
    (LOOK-M's own, whatever ``static_priority`` says), and the evicted KV averaged into its most
    similar kept KV (see :func:`average_merge`)."""

    name: ClassVar[str] = "lookm"
    merges_evicted: ClassVar[bool] = True
    benchmarked: ClassVar[bool] = False  # needs compact storage; run with --policies lookm

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        return uniform_allocation(focus, min(geo.prompt_len, max(geo.head_budget, geo.floor)))

    @property
    def selection_priority(self) -> str:
        return "text"


def average_merge(
    kept_k: Tensor, kept_v: Tensor, evicted_k: Tensor, evicted_v: Tensor
) -> tuple[Tensor, Tensor]:
    """LOOK-M's averaged merging for one head.

    Each evicted token goes to the kept token of highest key cosine similarity; a kept entry
    becomes the mean of itself and the evicted entries it received (ties: the first kept token).

    Args:
        kept_k: ``[b, D]``, kept_v: ``[b, D_v]``, the kept KV in kept order.
        evicted_k: ``[e, D]``, evicted_v: ``[e, D_v]``, the evicted KV.

    Returns:
        The merged ``(k, v)``, shaped and typed as ``kept_k`` and ``kept_v``.
    """
    if kept_k.shape[0] == 0 or evicted_k.shape[0] == 0:
        return kept_k, kept_v
    kept_unit = torch.nn.functional.normalize(kept_k.float(), dim=-1)
    targets = torch.cat(
        [
            (torch.nn.functional.normalize(block.float(), dim=-1) @ kept_unit.T).argmax(dim=1)
            for block in evicted_k.split(_SIMILARITY_BLOCK)
        ]
    )
    counts = torch.bincount(targets, minlength=kept_k.shape[0]).to(torch.float32) + 1
    k = kept_k.float().index_add(0, targets, evicted_k.float()) / counts[:, None]
    v = kept_v.float().index_add(0, targets, evicted_v.float()) / counts[:, None]
    return k.to(kept_k.dtype), v.to(kept_v.dtype)
