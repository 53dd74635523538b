"""SparseMM baseline: head budgets from visual-head scores, SnapKV selection within a head.

SparseMM: Head Sparsity Emerges from Visual Concept Responses in MLLMs (Wang et al., 2025,
arXiv:2506.05344). Few heads ("visual heads") attend to the visual tokens an answer needs, so
SparseMM gives every head its local window, a uniform share of the budget above it (the paper's
``ratio``, 0.1), and the rest of the request's budget in proportion to each head's visual score;
within a head it keeps the window and the top keys by pooled window attention (SnapKV).

Adapted here: the paper scores heads once, offline, on OCR data (how often a head's top attention
falls on the image region of the word it outputs) and ships a score file per model. This policy
scores heads per request from what its observation exposes: a head's visual score is the share of
its pooled window-attention mass outside the sink and window (which every head keeps) that falls
on visual tokens. Scores are normalised over all (layer, kv head) pairs, as the paper's are; a kv
head stands for its GQA group (the paper sums its query heads' scores). Every head is static.
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
from hybridkv_sglang.policy.selection import sink_window_mask


def modality_mass(scores: Tensor, is_text: Tensor, floor: Tensor) -> tuple[Tensor, Tensor]:
    """Each head's score mass on text and on visual positions outside ``floor``.

    Args:
        scores: ``[L, H, N]`` float, non-negative (pooled window attention).
        is_text: ``[N]`` bool, ``True`` for text tokens.
        floor: ``[N]`` bool, positions every head keeps (not counted).

    Returns:
        ``(text, visual)``, each ``[L, H]`` float32.
    """
    mass = scores.float() * (~floor).to(scores.device)
    text = is_text.to(scores.device)
    return (mass * text).sum(-1), (mass * ~text).sum(-1)


def sparsemm_budgets(
    visual_score: Tensor, head_budget: int, floor: int, prompt_len: int, uniform_share: float
) -> Tensor:
    """Per-head budgets: ``floor``, plus ``uniform_share`` of ``e = b_mean - floor``, plus the
    rest of the request's ``L·H·e`` in proportion to the head's visual score (SparseMM).

    Caps at ``N`` hand their surplus to the other heads in proportion (:func:`water_fill`), so
    the budgets sum to ``L·H·b_mean`` whenever ``floor <= b_mean <= N``. With no visual score
    anywhere the scored share is uniform too.

    Args:
        visual_score: ``[L, H]`` float, ``>= 0``.

    Returns:
        ``[L, H]`` int64 budgets in ``[floor, N]``.
    """
    num_layers, num_heads = visual_score.shape
    extra = head_budget - floor
    if extra <= 0:
        return torch.full((num_layers, num_heads), floor, dtype=torch.int64)
    score = visual_score.double().flatten().clamp(min=0)
    share = score / score.sum() if score.sum() > 0 else torch.full_like(score, 1 / score.numel())
    weights = uniform_share / score.numel() + (1 - uniform_share) * share
    extras = water_fill(weights, score.numel() * extra, 0, prompt_len - floor)
    return extras.view(num_layers, num_heads) + floor


@register_policy
@dataclass(frozen=True)
class SparseMMPolicy(SinkWindowTopPolicy):
    """Every head static; head budgets follow per-request visual scores (see the module
    docstring), same total ``B`` as uniform budgets; within a head, sink + window, then the top
    keys by pooled window-attention score. No text prior."""

    name: ClassVar[str] = "sparsemm"
    sparsemm_uniform_share: float = hyperparameter(
        0.1,
        ge=0,
        le=1,
        doc="share of the per-head budget above sink + window that every head gets whatever its "
        "visual score (the paper's ratio, 0.1); the rest follows the heads' visual scores",
    )

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        floor = sink_window_mask(geo.prompt_len, geo.sink, geo.window, scores.device)
        text, visual = modality_mass(scores, is_text, floor)
        score = torch.where(text + visual > 0, visual / (text + visual).clamp(min=1e-30), 0.0)
        budgets = sparsemm_budgets(
            score, geo.head_budget, geo.floor, geo.prompt_len, self.sparsemm_uniform_share
        )
        return BudgetAllocation(
            is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
            budgets=budgets.to(focus.device),
            total=geo.head_budget * focus.numel(),
        )
