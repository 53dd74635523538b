"""The chunk index a dynamic head scores every decode step, made cheap in bytes.

Quest bounds over all ``D`` key channels in the KV dtype cost ``2·D`` values per chunk of ``C``
tokens: ``1/C`` of the head's KV, read every step and held for the request's life (25 % at
``C`` = 4). Two knobs shrink them, and a budget in bytes pays for what is left
(:mod:`hybridkv_sglang.policy.byte_cost`):

* **channels**: bound only ``r`` of the ``D`` key channels, those with the largest
  query-weighted key range over the observation window, ``mean |q_d| · (max_n k_d - min_n k_d)``
  (the channels that move the score most; the idea of SparQ / Loki, on raw channels so the
  decode query needs a gather, not a projection). The score is then a bound of the partial
  logit over those channels, a ranking heuristic rather than a bound of the full logit.
* **precision**: ``"uint8"`` stores each bound as an 8-bit code of a per-(head, channel) affine
  map over the head's chunks, the minima rounded down and the maxima up, so the decoded values
  still bound every key.

Every index has the same four parts whatever the knobs, so one kernel serves all: bounds (codes
or values) ``[..., n_chunks, r]``, ``channels [..., r]`` int32, ``offset`` and ``scale
[..., r]`` float32; the bound of column ``i`` is ``offset[i] + scale[i] * bound[i]`` (the plain
index has every channel, offset 0 and scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BOUND_PRECISIONS = ("kv", "uint8")
CODE_MAX = 255
SCALE_MARGIN = 1e-5


@dataclass(frozen=True)
class ChunkIndex:
    """Chunk bounds of some dynamic heads.

    Attributes:
        kmin, kmax: ``[..., n_chunks, r]`` uint8 codes or key-dtype values.
        channels: ``[..., r]`` int32, the key channel of each column, ascending.
        offset, scale: ``[..., r]`` float32, the affine map from a stored bound to a key value.
    """

    kmin: Tensor
    kmax: Tensor
    channels: Tensor
    offset: Tensor
    scale: Tensor

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` float32 ``[..., n_chunks, r]``: the bounds as key values."""
        off, scale = self.offset.unsqueeze(-2), self.scale.unsqueeze(-2)
        return off + scale * self.kmin.float(), off + scale * self.kmax.float()

    def query_channels(self, q: Tensor) -> Tensor:
        """``q [R, G, D]`` -> ``[R, G, r]``, the query at each row's bounded channels
        (``channels`` of shape ``[R, r]``)."""
        index = self.channels.to(torch.int64).unsqueeze(1).expand(-1, q.shape[1], -1)
        return q.gather(2, index)

    def __getitem__(self, key: object) -> ChunkIndex:
        """The heads ``key`` selects on the leading dimensions (chunks and channels whole)."""
        return ChunkIndex(
            self.kmin[key], self.kmax[key], self.channels[key], self.offset[key], self.scale[key]
        )


def chunk_index(
    kmin: Tensor,
    kmax: Tensor,
    q_window: Tensor | None,
    channels: int | None,
    precision: str,
) -> ChunkIndex:
    """The index of one layer's heads from their full chunk bounds.

    Args:
        kmin, kmax: ``[H_kv, n_chunks, D]`` key-dtype chunk minima and maxima.
        q_window: ``[w, H_q, D]`` float, the observation window's queries (``H_q`` a multiple of
            ``H_kv``); picks the channels. ``None`` only when every channel is kept.
        channels: ``r``, the channels kept per head; ``None`` or ``>= D``: all of them.
        precision: ``"kv"`` (values in the key dtype) or ``"uint8"`` (codes rounded outward).
    """
    if kmin.dim() != 3 or kmax.shape != kmin.shape:
        raise ValueError(
            f"expected kmin and kmax [H_kv, n_chunks, D], got {tuple(kmin.shape)}, "
            f"{tuple(kmax.shape)}"
        )
    if precision not in BOUND_PRECISIONS:
        raise ValueError(f"precision must be one of {BOUND_PRECISIONS}, got {precision!r}")
    heads, _, dim = kmin.shape
    r = dim if channels is None else min(channels, dim)
    if r < 1:
        raise ValueError(f"channels must be >= 1 when set, got {channels}")
    if r == dim:
        picked = torch.arange(dim, device=kmin.device).expand(heads, dim)
    else:
        if q_window is None:
            raise ValueError("picking fewer channels than D needs the window's queries")
        picked = _widest_channels(kmin, kmax, q_window, r)
    gather = picked.unsqueeze(1).expand(-1, kmin.shape[1], -1)
    lo, hi = kmin.gather(2, gather), kmax.gather(2, gather)
    channel_ids = picked.to(torch.int32).contiguous()
    if precision == "kv":
        ones = torch.ones(heads, r, dtype=torch.float32, device=kmin.device)
        return ChunkIndex(lo.contiguous(), hi.contiguous(), channel_ids, ones * 0, ones)
    return _quantized(lo, hi, channel_ids)


def _widest_channels(kmin: Tensor, kmax: Tensor, q_window: Tensor, r: int) -> Tensor:
    """``[H_kv, r]`` int64: per head, the ``r`` channels of largest ``mean |q| · key range``."""
    heads, _, dim = kmin.shape
    if q_window.dim() != 3 or q_window.shape[2] != dim or q_window.shape[1] % heads:
        raise ValueError(
            f"expected q_window [w, H_q, {dim}] with H_q a multiple of {heads}, got "
            f"{tuple(q_window.shape)}"
        )
    q_mag = q_window.float().abs().reshape(q_window.shape[0], heads, -1, dim).mean(dim=(0, 2))
    spread = kmax.float().amax(dim=1) - kmin.float().amin(dim=1)
    top = torch.topk(q_mag * spread, r, dim=1).indices
    return top.sort(dim=1).values


def _quantized(lo: Tensor, hi: Tensor, channels: Tensor) -> ChunkIndex:
    """8-bit codes of ``lo``/``hi`` ``[H, n, r]`` over each (head, channel)'s range, the minima
    rounded down and the maxima up (then one code further out where float rounding of
    ``offset + scale * code`` would cross the true value), so they still bound the keys. The
    scale carries a relative margin of ``SCALE_MARGIN`` so that the top code clears the range."""
    lo32, hi32 = lo.float(), hi.float()
    offset = lo32.amin(dim=1)
    span = hi32.amax(dim=1) - offset
    scale = torch.where(span > 0, span * (1 + SCALE_MARGIN) / CODE_MAX, torch.ones_like(span))
    off, s = offset.unsqueeze(1), scale.unsqueeze(1)
    code_lo = torch.floor((lo32 - off) / s).clamp(0, CODE_MAX)
    code_hi = torch.ceil((hi32 - off) / s).clamp(0, CODE_MAX)
    code_lo = torch.where(off + s * code_lo > lo32, (code_lo - 1).clamp(min=0), code_lo)
    code_hi = torch.where(off + s * code_hi < hi32, (code_hi + 1).clamp(max=CODE_MAX), code_hi)
    return ChunkIndex(
        code_lo.to(torch.uint8).contiguous(),
        code_hi.to(torch.uint8).contiguous(),
        channels,
        offset.contiguous(),
        scale.contiguous(),
    )
