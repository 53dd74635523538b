"""One decode step's per-layer folded page tables over dense, ``in_place`` and ``compact`` requests.

A decode step's table for layer ``l`` has one row per (request, kv head), request-major: dense
requests read ``[0, seq_len)``. An ``in_place`` request's static heads read their kept positions
plus the decode tail ``[N, seq_len)``; its dynamic heads the resident prefix, the top-k chunks of
this step and ``[tail_start, seq_len)`` (see :class:`DynamicRowLayout`). A ``compact`` request
reads the same KV from its compact entries (listed directly, before the row's positions) and
only the decode tail ``[N, seq_len)`` from its row. Every row length is known on the host before
any device work, so the host ``indptr`` never needs a device read; only host-tier staging reads
this step's chunk ids back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.chunk_topk import chunk_topk_auto
from hybridkv_sglang.storage.compact_layout import (
    CompactLayerLayout,
    CompactLayout,
    dynamic_row_locals,
)
from hybridkv_sglang.storage.compressed_layout import CompressedLayout, LayerLayout
from hybridkv_sglang.storage.host_tier import ChunkStager
from hybridkv_sglang.storage.page_tables import (
    FoldedPageTable,
    FoldedRowSpecs,
    PositionsCSR,
    append_ranges,
    assemble_rows,
    build_folded_page_table,
    chunk_selection_positions,
    prepend_entries,
    take_from_regions,
)

RequestLayout = CompressedLayout | CompactLayout


@dataclass(frozen=True)
class DynamicGroup:
    """The dynamic rows of one request in one layer."""

    request: int
    """Index of the request in the batch."""
    rows: Tensor
    """``[n_d]`` int64 CPU, the rows in the step's table (``request * H_kv + head``)."""
    plan: CompressedLayout
    layer: LayerLayout
    compact: CompactLayerLayout | None


@dataclass(frozen=True)
class DecodeBatchLayout:
    """One decode step's batch: per request its pool row, dense length and layout (or dense)."""

    req_pool_indices: Sequence[int]
    seq_lens: Sequence[int]
    layouts: Sequence[RequestLayout | None]
    num_kv_heads: int

    @property
    def has_compressed(self) -> bool:
        return any(layout is not None for layout in self.layouts)

    def dynamic_groups(self, layer: int) -> list[DynamicGroup]:
        """The dynamic rows of ``layer``, per compressed request in batch order."""
        heads = self.num_kv_heads
        groups = []
        for b, layout in enumerate(self.layouts):
            if layout is None:
                continue
            compact = layout.layers[layer] if isinstance(layout, CompactLayout) else None
            plan = layout.plan if isinstance(layout, CompactLayout) else layout
            lay = plan.layers[layer]
            if lay.dynamic_heads.numel():
                groups.append(DynamicGroup(b, b * heads + lay.dynamic_heads, plan, lay, compact))
        return groups

    def layer_table(
        self,
        layer: int,
        q: Tensor | None,
        req_to_token: Tensor,
        stager: ChunkStager | None = None,
        *,
        top: Tensor | None = None,
    ) -> FoldedPageTable:
        """The folded page table of ``layer`` for this step.

        Args:
            layer: layer index.
            q: ``[B * H_kv, G, D]`` this layer's queries, rows request-major then kv head (the
                dynamic rows' chunk scores need them); unused when ``top`` is given.
            req_to_token: ``[P, ctx]`` int32 SGLang's request-to-slot map.
            stager: moves host-tier chunks into staging slots; needed when a compact request
                keeps its dynamic heads on the host.
            top: ``[R_dyn, k]`` int64 absolute chunk ids of the dynamic rows in
                :meth:`dynamic_groups` order, instead of scoring ``q`` (the CUDA-graph path
                reserves the chunks' places with stand-in ids and fills them in the graph).
        """
        heads = self.num_kv_heads
        num_rows = len(self.req_pool_indices) * heads
        device = req_to_token.device
        tail_start = torch.zeros(num_rows, dtype=torch.int64)
        tail_end = torch.tensor(self.seq_lens, dtype=torch.int64).repeat_interleave(heads)
        by_position: list[tuple[PositionsCSR, Tensor]] = []
        direct: list[tuple[PositionsCSR, Tensor]] = []
        for b, layout in enumerate(self.layouts):
            if layout is None:
                continue
            base = b * heads
            if isinstance(layout, CompactLayout):
                plan = layout.plan
                lay = plan.layers[layer]
                tail_start[base : base + heads] = plan.prompt_len
                if lay.static_heads.numel():
                    direct.append((layout.layers[layer].static_entries, base + lay.static_heads))
            else:
                plan, lay = layout, layout.layers[layer]
                if lay.static_heads.numel():
                    rows = base + lay.static_heads
                    by_position.append((lay.static_kept, rows))
                    tail_start[rows] = plan.prompt_len
                tail_start[base + lay.dynamic_heads] = plan.dynamic_rows.tail_start
        groups = self.dynamic_groups(layer)
        if groups:
            if top is None:
                if q is None:
                    raise ValueError(
                        "layer_table: expected q (or top) for a batch with dynamic rows"
                    )
                top = _top_chunks(q, groups)
            offset = 0
            in_place_rows, in_place_top, in_place_groups = [], [], []
            for group in groups:
                n = group.rows.numel()
                group_top = top[offset : offset + n]
                offset += n
                if group.compact is None:
                    in_place_rows.append(group.rows)
                    in_place_top.append(group_top)
                    in_place_groups.append(group)
                else:
                    entries = _compact_dynamic_entries(layer, group, group_top, stager)
                    direct.append((entries, group.rows))
            if in_place_groups:
                by_position.append(
                    (
                        _in_place_dynamic_positions(torch.cat(in_place_top), in_place_groups),
                        torch.cat(in_place_rows),
                    )
                )
        specs = FoldedRowSpecs.create(
            torch.tensor(self.req_pool_indices, dtype=torch.int64).repeat_interleave(heads),
            torch.arange(heads, dtype=torch.int64).repeat(len(self.req_pool_indices)),
            assemble_rows(num_rows, by_position, device),
            tail_start,
            tail_end,
        )
        table = build_folded_page_table(req_to_token, specs, heads)
        if not direct:
            return table
        return prepend_entries(assemble_rows(num_rows, direct, device), table)


def _top_chunks(q: Tensor, groups: Sequence[DynamicGroup]) -> Tensor:
    """``[R, k]`` absolute chunk ids of every dynamic row by descending score, ``-1`` padded."""
    kmins, kmaxs, num_chunks, firsts = [], [], [], []
    k = max(g.plan.top_k_chunks for g in groups)
    for g in groups:
        assert g.layer.chunk_kmin is not None and g.layer.chunk_kmax is not None
        n = g.rows.numel()
        kmins.append(g.layer.chunk_kmin)
        kmaxs.append(g.layer.chunk_kmax)
        num_chunks += [g.plan.dynamic_rows.num_chunks] * n
        firsts += [g.plan.dynamic_rows.first_chunk] * n
    rows = torch.cat([g.rows for g in groups])
    width = max(t.shape[1] for t in kmins)
    kmin = torch.cat([_pad_chunks(t, width) for t in kmins])
    kmax = torch.cat([_pad_chunks(t, width) for t in kmaxs])
    device = kmin.device
    if width == 0:
        return torch.full((rows.numel(), k), -1, dtype=torch.int64, device=device)
    counts = torch.tensor(num_chunks, dtype=torch.int32, device=device)
    _, top = chunk_topk_auto(q[rows.to(q.device)].to(kmin.dtype), kmin, kmax, counts, k)
    top = top.to(torch.int64)
    shift = torch.tensor(firsts, dtype=torch.int64, device=device).unsqueeze(1)
    return torch.where(top >= 0, top + shift, top)


def _in_place_dynamic_positions(top: Tensor, groups: Sequence[DynamicGroup]) -> PositionsCSR:
    """In-place dynamic rows' selections: resident prefix + this step's chunks, as positions."""
    num_selected, prefixes = [], []
    for g in groups:
        n = g.rows.numel()
        dyn = g.plan.dynamic_rows
        num_selected += [dyn.num_selected(g.plan.top_k_chunks)] * n
        prefixes += [dyn.prefix_end] * n
    return chunk_selection_positions(
        top, num_selected, groups[0].plan.dynamic_rows.chunk_size, prefixes
    )


def _compact_dynamic_entries(
    layer: int, group: DynamicGroup, top: Tensor, stager: ChunkStager | None
) -> PositionsCSR:
    """A compact request's dynamic rows as folded entries: prefix, chunks, window."""
    compact = group.compact
    assert compact is not None
    dyn = group.plan.dynamic_rows
    k = group.plan.top_k_chunks
    on_host = compact.host_chunks is not None
    n, n_sel = group.rows.numel(), dyn.num_selected(k)
    chunks = top[:, :n_sel]
    if on_host:
        if stager is None:
            raise RuntimeError("a host-tier compact request needs a chunk stager at decode")
        chunks = stager.stage(layer, compact, dyn, chunks)
    prefix, window_start, window_end = dynamic_row_locals(dyn, k, on_host)
    local = chunk_selection_positions(chunks, [n_sel] * n, dyn.chunk_size, [prefix] * n)
    local = append_ranges(local, [window_start] * n, [window_end] * n)
    return take_from_regions(local, compact.dynamic_regions)


def _pad_chunks(bounds: Tensor, width: int) -> Tensor:
    missing = width - bounds.shape[1]
    if missing == 0:
        return bounds
    pad = bounds.new_zeros(bounds.shape[0], missing, bounds.shape[2])
    return torch.cat([bounds, pad], dim=1)
