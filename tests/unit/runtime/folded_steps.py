"""Decode steps through the device pipeline (metadata pools, table kernels, attention), for
tests that compare it with an independent statement of what each row reads."""

from __future__ import annotations

import torch
from torch import Tensor

from hybridkv_sglang.attention.folded_decode import FoldedDecode, FoldedShape
from hybridkv_sglang.storage.compact_layout import CompactLayout
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, request_rows
from hybridkv_sglang.storage.host_tier import HostTier


def folded_for(
    layouts: dict[int, CompressedLayout | CompactLayout],
    *,
    pool_rows: int,
    layers: int,
    heads: int,
    group: int,
    dim: int,
    chunk: int,
    use_triton: bool = False,
    host_tier: HostTier | None = None,
) -> FoldedDecode:
    """Pools holding ``layouts`` (pool row -> layout) and the step buffers over them (bounds
    arena of the layouts' bound width and dtype); compact layouts on ``host_tier`` stage their
    chunks from it."""
    bounds = [
        lay.chunk_kmin
        for layout in layouts.values()
        for lay in (layout.plan if isinstance(layout, CompactLayout) else layout).layers
        if lay.chunk_kmin is not None
    ]
    meta = DecodeMetadata(
        layers,
        heads,
        bounds[0].shape[-1] if bounds else dim,
        max_requests=8,
        pool_rows=pool_rows,
        fixed_capacity=1 << 16,
        bound_capacity=1 << 12,
        param_capacity=1 << 8,
        candidate_capacity=1 << 12,
        top_capacity=1 << 10,
        bound_dtype=bounds[0].dtype if bounds else torch.float32,
        device="cpu",
        stage_capacity=1 << 10,
        host_id_capacity=1 << 12,
    )
    stage_slots = 0
    for row, layout in layouts.items():
        compact = layout if isinstance(layout, CompactLayout) else None
        plan = layout if compact is None else compact.plan
        stage_slots = max(stage_slots, 0 if compact is None else compact.staging_slots)
        assert meta.add(row, request_rows(plan, compact))
    shape = FoldedShape(
        num_layers=layers,
        num_kv_heads=heads,
        group_size=group,
        head_dim=dim,
        v_head_dim=dim,
        max_rows=pool_rows * heads,
        max_kv_splits=4,
        chunk_size=chunk,
        max_chunks=64,
        max_selected=16,
        max_stage_slots=max(stage_slots, 1),
    )
    folded = FoldedDecode(meta, shape, use_triton=use_triton, target_programs=16, device="cpu")
    if host_tier is not None:
        folded.attach_host_tier(host_tier.k, host_tier.v)
    return folded


def decode_layer(
    folded: FoldedDecode,
    layer: int,
    q: Tensor,
    k_buffer: Tensor,
    v_buffer: Tensor,
    req_to_token: Tensor,
    sm_scale: float,
) -> Tensor:
    """One layer of a step whose :meth:`FoldedDecode.begin_step` already ran."""
    folded.retrieve(layer, q, k_buffer, v_buffer)
    return folded.attend(layer, q, k_buffer, v_buffer, req_to_token, sm_scale)


def row_entries(
    folded: FoldedDecode, layer: int, rows: int, req_to_token: Tensor
) -> list[list[int]]:
    """The entries each row of ``layer``'s table reads (after :meth:`FoldedDecode.retrieve`)."""
    indptr, indices = folded.row_entries(layer, req_to_token)
    bounds = indptr.tolist()
    return [indices[bounds[r] : bounds[r + 1]].tolist() for r in range(rows)]
