"""Compressed layouts written by hand (no policy run): chosen heads keep given positions, the
others are dynamic, with plain chunk bounds (every channel, offset 0, scale 1) taken from the
keys themselves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hybridkv_sglang.policy import chunk_bounds
from hybridkv_sglang.storage.compressed_layout import CompressedLayout, LayerLayout
from hybridkv_sglang.storage.page_tables import DynamicRowLayout, PositionsCSR


def hand_layout(
    prompt_keys: Tensor,
    *,
    static: Mapping[int, Sequence[int] | Tensor],
    sink: int,
    window: int,
    chunk: int,
    top_k: int,
) -> CompressedLayout:
    """One layer over ``prompt_keys [N, H_kv, D]``: head ``h`` in ``static`` reads
    ``static[h]`` (prompt positions, in that order), every other head is dynamic."""
    prompt_len, heads, _ = prompt_keys.shape
    rows = DynamicRowLayout.for_prompt(prompt_len, sink, window, chunk)
    static_heads = torch.tensor(sorted(static), dtype=torch.int64)
    dynamic_heads = torch.tensor([h for h in range(heads) if h not in static], dtype=torch.int64)
    kept = PositionsCSR.from_lists([static[int(h)] for h in static_heads], "cpu")
    kmin = kmax = channels = offset = scale = None
    if dynamic_heads.numel():
        lo, hi = chunk_bounds(prompt_keys, chunk)  # [H, ceil(N / C), D]
        kmin = lo[dynamic_heads, rows.first_chunk : rows.end_chunk]
        kmax = hi[dynamic_heads, rows.first_chunk : rows.end_chunk]
        n_dyn, dim = int(dynamic_heads.numel()), prompt_keys.shape[2]
        channels = torch.arange(dim, dtype=torch.int32).expand(n_dyn, dim)
        offset, scale = torch.zeros(n_dyn, dim), torch.ones(n_dyn, dim)
    layer = LayerLayout(static_heads, kept, dynamic_heads, kmin, kmax, channels, offset, scale)
    dynamic_read = int(dynamic_heads.numel()) * rows.row_length(prompt_len, top_k)
    return CompressedLayout(
        prompt_len=prompt_len,
        num_kv_heads=heads,
        top_k_chunks=top_k,
        dynamic_rows=rows,
        layers=(layer,),
        read_entries_per_step=kept.nnz + dynamic_read,
    )
