"""Per-layer reduction of the window attention to what stages 1-3 need.

The runtime observes one layer at a time inside the forward. Keeping ``A`` (``[H_kv, w, N]``) for
every layer until the last one would cost ``L`` times that memory, so each layer is reduced at
once to its focus-set sizes (stage 1) and its pooled key scores (stage 3a).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def focus_set(attn: Tensor, theta: float) -> Tensor:
    """Cumulative focus ``U = union_i S_i`` of each head, as a membership mask.

    ``S_i`` is the smallest set of keys whose attention mass in window row ``i`` reaches
    ``theta`` (the top keys of the row, taken until their mass reaches ``theta``). Ties between
    equal weights are broken by position, so the size is exact and the members deterministic.

    Args:
        attn: ``[H, w, N]`` float, rows summing to 1 (from :func:`window_attention`).
        theta: mass each ``S_i`` must reach, in ``(0, 1]``.

    Returns:
        ``[H, N]`` bool, ``True`` where the key is in the head's focus set.
    """
    if attn.dim() != 3:
        raise ValueError(f"expected attn [H, w, N], got {tuple(attn.shape)}")
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    vals, order = attn.float().sort(dim=-1, descending=True, stable=True)
    csum = vals.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(csum[..., :1]), csum[..., :-1]], dim=-1)
    total = csum[..., -1:]
    # A key is needed while the keys ranked above it have not yet reached theta; keys with no
    # mass (masked future positions) are never needed.
    needed = (before < theta * total) & (vals > 0)
    member = torch.zeros_like(needed)
    member.scatter_(-1, order, needed)
    return member.any(dim=1)


def focus_size(attn: Tensor, theta: float) -> Tensor:
    """``|U|`` per head: ``[H, w, N]`` float attention -> ``[H]`` int64."""
    return focus_set(attn, theta).sum(dim=-1)


def pooled_scores(attn: Tensor, pool_kernel: int) -> Tensor:
    """Key scores of static heads: column sums of ``A`` smoothed by a centred 1-D max-pool.

    The max-pool keeps a key's neighbours with it (a word is several tokens, an object several
    patches), as in SnapKV's clustering step.

    Args:
        attn: ``[H, w, N]`` float.
        pool_kernel: odd pool width (1 = no smoothing); stride 1, output length ``N``.

    Returns:
        ``[H, N]`` float32.
    """
    if attn.dim() != 3:
        raise ValueError(f"expected attn [H, w, N], got {tuple(attn.shape)}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")
    scores = attn.float().sum(dim=1)  # [H, N]
    if pool_kernel == 1:
        return scores
    return F.max_pool1d(
        scores.unsqueeze(1), kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2
    ).squeeze(1)


@dataclass(frozen=True)
class HeadStats:
    """What one layer contributes to the request's plan.

    Attributes:
        focus_size: ``[H_kv]`` int64, ``|U|`` per kv head.
        scores: ``[H_kv, N]`` float32, pooled window-attention scores per key.
        focus_set: ``[H_kv, N]`` bool, the members of ``U``.
    """

    focus_size: Tensor
    scores: Tensor
    focus_set: Tensor


@dataclass(frozen=True)
class HeadStatsReducer:
    """Reduce one layer's window attention to focus sizes and pooled scores (DESIGN §2)."""

    theta: float = 0.9
    pool_kernel: int = 7

    def __post_init__(self) -> None:
        if not 0.0 < self.theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {self.theta}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")

    def reduce(self, attn: Tensor) -> HeadStats:
        """``attn [H_kv, w, N]`` float32 -> :class:`HeadStats`."""
        members = focus_set(attn, self.theta)
        return HeadStats(
            focus_size=members.sum(dim=-1),
            scores=pooled_scores(attn, self.pool_kernel),
            focus_set=members,
        )
