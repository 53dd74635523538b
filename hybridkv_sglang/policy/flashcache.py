"""FlashCache-style baseline: keep the outlier KV, scored from keys and values alone.

Revisiting Multimodal KV Cache Compression: A Frequency-Domain-Guided Outlier-KV-Aware Approach
(FlashCache; Yang et al., 2025, arXiv:2511.16786). Its observation: along the token axis the
energy of the K and V matrices sits in the low frequencies, and the tokens that deviate most from
that low-pass "base KV" matter most. The score needs no attention weights, so it would run beside
a fused attention kernel that never exposes them.

What is implemented here is our reading of the outlier criterion, not the paper's code (none is
public): per kv head, the DCT-II of K and of V over the tokens is cut to its lowest
``lowpass_fraction`` of frequencies; a token's score is its key's L2 distance from the low-pass
key plus its value's distance from the low-pass value, each divided by the head's mean distance
so neither dominates by scale. The paper's dynamic layer-wise budgets are not implemented: every
head gets the uniform budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation
from hybridkv_sglang.policy.baselines import SinkWindowTopPolicy
from hybridkv_sglang.policy.compressor import Geometry, LayerObservation
from hybridkv_sglang.policy.hyperparameters import hyperparameter
from hybridkv_sglang.policy.registry import register_policy


def dct_lowpass(x: Tensor, keep: int) -> Tensor:
    """Low-pass of ``x`` along dim 0: its DCT-II cut to the first ``keep`` coefficients, inverted.

    Computed with one FFT of the half-sample-symmetric extension ``[x, flip(x)]`` (whose DFT
    bins ``k < N`` are the DCT-II coefficients up to a phase), so it costs ``O(N log N)``.

    Args:
        x: ``[N, ...]`` float.
        keep: coefficients kept, ``1 <= keep``; ``keep >= N`` returns ``x``.

    Returns:
        ``[N, ...]`` float32.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    n = x.shape[0]
    y = torch.cat([x.float(), x.float().flip(0)], dim=0)
    spectrum = torch.fft.rfft(y, dim=0)  # [N + 1, ...]
    spectrum[keep:] = 0
    return torch.fft.irfft(spectrum, n=2 * n, dim=0)[:n]


def outlier_scores(keys: Tensor, values: Tensor, lowpass_fraction: float) -> Tensor:
    """Per-token outlier score of each kv head (see the module docstring).

    Args:
        keys, values: ``[N, H_kv, D]`` float.
        lowpass_fraction: share of the ``N`` DCT frequencies in the base KV, in ``(0, 1]``.

    Returns:
        ``[H_kv, N]`` float32, ``>= 0``.
    """
    if keys.shape != values.shape or keys.dim() != 3:
        raise ValueError(
            f"expected keys and values [N, H_kv, D] of one shape, got {tuple(keys.shape)} and "
            f"{tuple(values.shape)}"
        )
    keep = max(1, math.ceil(lowpass_fraction * keys.shape[0]))
    score = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.float32, device=keys.device)
    for x in (keys, values):
        distance = (x.float() - dct_lowpass(x, keep)).norm(dim=-1).T  # [H, N]
        score += distance / distance.mean(dim=-1, keepdim=True).clamp(min=1e-12)
    return score


@register_policy
@dataclass(frozen=True)
class FlashCachePolicy(SinkWindowTopPolicy):
    """Every head static with ``max(b_mean, sink + w)`` entries: sink + window, then the tokens
    whose K and V deviate most from their low-pass base (:func:`outlier_scores`). No attention
    scores and no text prior; ``theta`` and ``pool_kernel`` are unused (``focus_size`` is 0).
    """

    name: ClassVar[str] = "flashcache"
    needs_values: ClassVar[bool] = True
    lowpass_fraction: float = hyperparameter(
        0.1, gt=0, le=1, doc="share of the prompt's DCT frequencies in the low-pass base KV"
    )

    def observe_layer(
        self,
        layer_id: int,
        q_window: Tensor,
        keys: Tensor,
        sm_scale: float,
        values: Tensor | None = None,
    ) -> LayerObservation:
        """Score the layer's tokens from ``keys`` and ``values`` (``[N, H_kv, D]``); the window
        queries are not read."""
        if layer_id < 0:
            raise ValueError(f"layer_id must be >= 0, got {layer_id}")
        if values is None:
            raise ValueError(f"policy {self.name!r} scores tokens by their values; got none")
        scores = outlier_scores(keys, values, self.lowpass_fraction)
        return LayerObservation(
            layer_id=layer_id,
            prompt_len=int(keys.shape[0]),
            focus_size=torch.zeros(keys.shape[1], dtype=torch.int64, device=keys.device),
            scores=scores,
            costs=self.costs(int(keys.shape[2]), keys.dtype),
        )

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        per_head = min(geo.prompt_len, max(geo.head_budget, geo.floor))
        return BudgetAllocation(
            is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
            budgets=torch.full_like(focus, per_head, dtype=torch.int64),
            total=geo.head_budget * focus.numel(),
        )
