"""Stage 1: classify each (layer, kv head) as static or dynamic from its cumulative focus.

A head whose whole focus over the observation window fits in the uniform per-head budget can be
pruned once and for all (static); a head whose attention is spread, or moves between window
queries, needs retrieval at every decode step (dynamic). HybridKV: Hybrid KV Cache Compression for
Efficient Multimodal LLM Inference (Zeng et al., 2026, arXiv:2604.05887).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CAP_REFERENCE_BUDGET = 0.1
"""The budget fraction at which a budget-scaled cap equals ``max_dynamic_fraction``."""
DYNAMIC_CAPS = ("fixed", "budget")


def dynamic_fraction_cap(max_dynamic_fraction: float, budget_fraction: float, mode: str) -> float:
    """The share of heads that may be dynamic in a request entitled to ``budget_fraction``.

    ``"fixed"``: ``max_dynamic_fraction`` at every budget (the design). ``"budget"``:
    ``max_dynamic_fraction`` at a 10 % budget, growing in inverse proportion as the budget
    tightens (at most every head): a static head keeps what the prefill window pointed at, and
    the smaller its budget the more of what later decode steps need it misses, while a dynamic
    head re-selects chunks at every step for the same read (``docs/quality-diagnosis.md``).
    """
    if mode not in DYNAMIC_CAPS:
        raise ValueError(f"dynamic_cap must be one of {DYNAMIC_CAPS}, got {mode!r}")
    if mode == "fixed" or budget_fraction <= 0:
        return max_dynamic_fraction
    return min(1.0, max_dynamic_fraction * CAP_REFERENCE_BUDGET / budget_fraction)


@dataclass(frozen=True)
class FocusClassifier:
    """Static iff ``|U| <= b_mean``; at most ``max_dynamic_fraction`` of all heads are dynamic.

    When more heads exceed ``b_mean`` than the cap allows, the ones with the largest ``|U| / N``
    stay dynamic (ties broken towards lower (layer, head) index) and the rest become static.
    """

    max_dynamic_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_dynamic_fraction <= 1.0:
            raise ValueError(
                f"max_dynamic_fraction must be in [0, 1], got {self.max_dynamic_fraction}"
            )

    def max_dynamic_heads(self, num_heads: int) -> int:
        """The cap in heads: ``floor(max_dynamic_fraction * num_heads)``."""
        return int(self.max_dynamic_fraction * num_heads + 1e-9)

    def classify(self, focus: Tensor, head_budget: float) -> Tensor:
        """Stage 1 for one request.

        Args:
            focus: ``[L, H_kv]`` int64, ``|U|`` per head (one request, so one ``N``: ranking by
                ``|U|`` is ranking by ``|U| / N``).
            head_budget: ``b_mean``, the uniform per-head budget in tokens.

        Returns:
            ``[L, H_kv]`` bool, ``True`` = dynamic.
        """
        if focus.dim() != 2:
            raise ValueError(f"expected focus [L, H_kv], got {tuple(focus.shape)}")
        dynamic = focus > head_budget
        cap = self.max_dynamic_heads(focus.numel())
        if int(dynamic.sum()) <= cap:
            return dynamic
        # Rank candidates by focus, largest first; non-candidates rank last.
        key = torch.where(dynamic, focus.to(torch.float64), -1.0)
        order = torch.argsort(key.flatten(), descending=True, stable=True)
        capped = torch.zeros(focus.numel(), dtype=torch.bool, device=focus.device)
        capped[order[:cap]] = True
        return capped.view_as(dynamic) & dynamic
