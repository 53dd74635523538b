"""A compressed request's ``in_place`` layout: its plan as positions in its own row.

Per layer: the kept positions of its static heads (fixed for the rest of the request) and, for
its dynamic heads, the key bounds of the retrievable chunks over their bounded channels, with
each channel's id and affine map (scored against each step's query).
``compact`` storage lays the same plan out over compact entries
(:mod:`hybridkv_sglang.storage.compact_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.policy.plan import CompressionPlan
from hybridkv_sglang.storage.page_tables import DynamicRowLayout, PositionsCSR


@dataclass(frozen=True)
class LayerLayout:
    """One layer of one compressed request.

    Attributes:
        static_heads: ``[n_s]`` int64 CPU, kv heads that read a fixed kept set.
        static_kept: CSR over those heads, positions in the request's row.
        dynamic_heads: ``[n_d]`` int64 CPU, kv heads served by chunk retrieval.
        chunk_kmin: ``[n_d, n_chunks, r]`` bounds of the retrievable chunks (chunk ``j`` here is
            chunk ``first_chunk + j`` of the prompt), uint8 codes or key-dtype values.
        chunk_kmax: same, maxima.
        bound_channels: ``[n_d, r]`` int32, the key channel of each bound column.
        bound_offset, bound_scale: ``[n_d, r]`` float32, a bound column's value is
            ``offset + scale * stored``.
        All five are ``None`` when the layer has no dynamic head.
    """

    static_heads: Tensor
    static_kept: PositionsCSR
    dynamic_heads: Tensor
    chunk_kmin: Tensor | None
    chunk_kmax: Tensor | None
    bound_channels: Tensor | None
    bound_offset: Tensor | None
    bound_scale: Tensor | None


@dataclass(frozen=True)
class CompressedLayout:
    """Everything decode needs of one compressed request, derived once from its plan."""

    prompt_len: int
    num_kv_heads: int
    top_k_chunks: int
    dynamic_rows: DynamicRowLayout
    layers: tuple[LayerLayout, ...]
    read_entries_per_step: int
    merge_evicted: bool = False
    """The plan asks for its evicted KV merged into the kept KV (done in compact storage)."""

    @classmethod
    def from_plan(cls, plan: CompressionPlan, device: torch.device | str) -> CompressedLayout:
        dyn_rows = DynamicRowLayout.for_prompt(
            plan.prompt_len, plan.sink, plan.window, plan.chunk_size
        )
        first, end = dyn_rows.first_chunk, dyn_rows.end_chunk
        # One read of the head types and row offsets for the whole plan: the loop below reads
        # no device value (a sync per layer or head would stall prefill end L x H_kv times).
        is_dynamic = plan.is_dynamic.cpu().tolist()
        indptr = plan.kept_indptr.cpu().tolist()
        heads = plan.num_kv_heads
        layers = []
        read = 0
        for layer, dyn_mask in enumerate(is_dynamic):
            static = [h for h, dyn in enumerate(dyn_mask) if not dyn]
            static_heads = torch.tensor(static, dtype=torch.int64)
            dynamic_heads = torch.tensor(
                [h for h, dyn in enumerate(dyn_mask) if dyn], dtype=torch.int64
            )
            bounds = [(indptr[layer * heads + h], indptr[layer * heads + h + 1]) for h in static]
            static_kept = _static_csr(plan.kept_positions, bounds, device)
            read += static_kept.nnz
            kmin = kmax = channels = offset = scale = None
            if dynamic_heads.numel():
                assert plan.chunk_kmin is not None and plan.chunk_kmax is not None
                assert plan.bound_channels is not None and plan.bound_offset is not None
                assert plan.bound_scale is not None
                dyn = dynamic_heads.to(plan.chunk_kmin.device, non_blocking=True)
                kmin = plan.chunk_kmin[layer, dyn, first:end].to(device)
                kmax = plan.chunk_kmax[layer, dyn, first:end].to(device)
                channels = plan.bound_channels[layer, dyn].to(device)
                offset = plan.bound_offset[layer, dyn].to(device)
                scale = plan.bound_scale[layer, dyn].to(device)
                per_row = dyn_rows.row_length(plan.prompt_len, plan.top_k_chunks)
                read += int(dynamic_heads.numel()) * per_row
            layers.append(
                LayerLayout(
                    static_heads, static_kept, dynamic_heads, kmin, kmax, channels, offset, scale
                )
            )
        return cls(
            prompt_len=plan.prompt_len,
            num_kv_heads=plan.num_kv_heads,
            top_k_chunks=plan.top_k_chunks,
            dynamic_rows=dyn_rows,
            layers=tuple(layers),
            read_entries_per_step=read,
            merge_evicted=plan.merge_evicted,
        )

    @property
    def read_fraction(self) -> float:
        """Prompt entries read per decode step over the dense prompt entries."""
        dense = len(self.layers) * self.num_kv_heads * self.prompt_len
        return self.read_entries_per_step / dense


def _static_csr(
    positions: Tensor, bounds: list[tuple[int, int]], device: torch.device | str
) -> PositionsCSR:
    """The static heads' kept positions of one layer (``bounds``: each head's ``[lo, hi)`` in
    ``positions``, host ints), sliced and joined on the device without reading it back."""
    lengths = [hi - lo for lo, hi in bounds]
    indptr_host = torch.zeros(len(bounds) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=indptr_host[1:])
    parts = [positions[lo:hi] for lo, hi in bounds]
    joined = torch.cat(parts) if parts else positions[:0]
    return PositionsCSR(
        indptr_host,
        indptr_host.to(device=device, dtype=torch.int32, non_blocking=True),
        joined.to(device=device, dtype=torch.int32, non_blocking=True),
    )
