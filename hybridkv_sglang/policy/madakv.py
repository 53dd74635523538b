"""MadaKV baseline: each head splits its budget between text and visual tokens by its preference.

MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-Context
Inference (Li et al., 2025, arXiv:2506.15724). Heads differ in which modality they attend, and a
fixed modality priority (LOOK-M's text first) ignores that. MadaKV's two parts, as implemented
here (our reading of the paper's description; no code is public):

* **Modality preference adaptation.** A head's text preference ``p`` is the share of its pooled
  window-attention mass outside the sink and window (kept by every head) that falls on text
  tokens. Its budget above that floor is split: ``round(p · x)`` entries go to the top-scored
  text tokens, the rest to the top-scored visual tokens.
* **Hierarchical compression compensation.** Layers are compressed in order. A head cannot keep
  more tokens of a modality than the prompt holds; what the heads of a layer cannot spend on the
  modality they prefer is not moved to the modality they do not prefer but handed to the next
  layer, whose heads share it evenly. The last layer spends what it still holds on either
  modality (and hands back what it cannot hold), so a request keeps ``B`` entries unless every
  head keeps its whole prompt.

Assumed where the description is silent: per-head budgets start uniform (``b_mean``); preference
comes from the same observation window every policy here scores with; a prompt without mass
outside the floor splits by the two modalities' token counts. Every head is static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation
from hybridkv_sglang.policy.baselines import StaticOnlyPolicy
from hybridkv_sglang.policy.compressor import Geometry
from hybridkv_sglang.policy.registry import register_policy
from hybridkv_sglang.policy.selection import keep_top_by_priority, sink_window_mask
from hybridkv_sglang.policy.sparsemm import modality_mass


def modality_quotas(
    preference: Tensor, extra: int, num_text: int, num_visual: int
) -> tuple[Tensor, Tensor]:
    """Text and visual entries each head keeps above its floor, layer by layer (see the module
    docstring).

    Layer ``l`` holds ``H · extra`` plus what earlier layers carried, split evenly over its heads
    (``x``, at most ``num_text + num_visual``). A head wants ``round(p · x)`` text entries and the
    rest visual, each capped at that modality's tokens; the rest is carried to layer ``l + 1``.
    The last layer fills either modality, and what it cannot hold goes back to the heads with
    room left, from the last one up, so the quotas sum to ``L·H·extra`` unless every head keeps
    all its candidates.

    Args:
        preference: ``[L, H]`` float in ``[0, 1]``, each head's text preference ``p``.
        extra: entries per head above the floor (``b_mean - floor >= 0``).
        num_text, num_visual: text and visual positions outside the floor.

    Returns:
        ``(text, visual)``, each ``[L, H]`` int64; ``text <= num_text``, ``visual <= num_visual``.
    """
    num_layers, num_heads = preference.shape
    text = torch.zeros(num_layers, num_heads, dtype=torch.int64)
    visual = torch.zeros_like(text)
    carry = 0
    for layer in range(num_layers):
        total = num_heads * extra + carry
        x = torch.full((num_heads,), total // num_heads, dtype=torch.int64)
        x[: total % num_heads] += 1
        x = x.clamp(max=num_text + num_visual)
        wanted = (preference[layer].double().cpu() * x).round().to(torch.int64)
        if layer < num_layers - 1:
            text[layer] = wanted.clamp(max=num_text)
            visual[layer] = (x - wanted).clamp(max=num_visual)
        else:
            text[layer] = torch.maximum(wanted, x - num_visual).clamp(max=num_text)
            visual[layer] = x - text[layer]
        carry = total - int(text[layer].sum() + visual[layer].sum())
    for row in reversed(range(num_layers * num_heads)):  # what not even the last layer can hold
        layer, head = divmod(row, num_heads)
        for quota, tokens in ((visual, num_visual), (text, num_text)):
            more = min(carry, tokens - int(quota[layer, head]))
            quota[layer, head] += more
            carry -= more
    return text, visual


@register_policy
@dataclass(frozen=True)
class MadaKVPolicy(StaticOnlyPolicy):
    """Every head static: sink + window, then its text and visual quotas
    (:func:`modality_quotas`) of each modality's top keys by pooled window-attention score."""

    name: ClassVar[str] = "madakv"

    def quotas(self, scores: Tensor, is_text: Tensor, geo: Geometry) -> tuple[Tensor, Tensor]:
        """``[L, H]`` int64 text and visual entries above each head's floor for one request."""
        floor = sink_window_mask(geo.prompt_len, geo.sink, geo.window, scores.device)
        text_mass, visual_mass = modality_mass(scores, is_text, floor)
        num_text = int((is_text.to(floor.device) & ~floor).sum())
        num_visual = int((~is_text.to(floor.device) & ~floor).sum())
        by_count = num_text / max(1, num_text + num_visual)
        total = text_mass + visual_mass
        preference = torch.where(
            total > 0, text_mass / total.clamp(min=1e-30), torch.full_like(total, by_count)
        )
        return modality_quotas(preference, geo.head_budget - geo.floor, num_text, num_visual)

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        text, visual = self.quotas(scores, is_text, geo)
        return BudgetAllocation(
            is_dynamic=torch.zeros_like(focus, dtype=torch.bool),
            budgets=(geo.floor + text + visual).to(focus.device),
            total=geo.head_budget * focus.numel(),
        )

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        geo: Geometry,
        focus_sets: Tensor | None = None,
    ) -> Tensor:
        """Sink and window, then the top ``text`` text and ``visual`` visual keys of each head
        (the quotas :meth:`allocate` summed into ``budgets``)."""
        n = geo.prompt_len
        floor = sink_window_mask(n, geo.sink, geo.window, scores.device)
        text, visual = self.quotas(scores, is_text, geo)
        flat = scores.reshape(-1, n)
        kept = floor.expand(flat.shape[0], n).clone()
        for modality, quota in ((is_text, text), (~is_text, visual)):
            candidates = modality.to(scores.device) & ~floor
            top = keep_top_by_priority(candidates.to(torch.int64), flat, quota.reshape(-1))
            kept |= top
        return kept
