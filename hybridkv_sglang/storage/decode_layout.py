"""Turn compression plans into one decode step's per-layer folded page tables (``in_place`` mode).

A compressed request keeps, per layer: the kept positions of its static heads (fixed for the rest
of the request) and, for its dynamic heads, the key bounds of the retrievable chunks (scored
against each step's query). A decode step's table for layer ``l`` has one row per (request, kv
head), request-major: dense requests read ``[0, seq_len)``; static heads their kept positions plus
the decode tail ``[N, seq_len)``; dynamic heads the resident prefix, the top-k chunks of this
step and ``[tail_start, seq_len)`` (see :class:`DynamicRowLayout`). Every row length is known on
the host before any device work, so the host ``indptr`` never needs a device read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.chunk_topk import chunk_topk_auto
from hybridkv_sglang.policy.plan import CompressionPlan
from hybridkv_sglang.storage.page_tables import (
    DynamicRowLayout,
    FoldedPageTable,
    FoldedRowSpecs,
    PositionsCSR,
    assemble_rows,
    build_folded_page_table,
    chunk_selection_positions,
)


@dataclass(frozen=True)
class LayerLayout:
    """One layer of one compressed request.

    Attributes:
        static_heads: ``[n_s]`` int64 CPU, kv heads that read a fixed kept set.
        static_kept: CSR over those heads, positions in the request's row.
        dynamic_heads: ``[n_d]`` int64 CPU, kv heads served by chunk retrieval.
        chunk_kmin: ``[n_d, n_chunks, D]`` bounds of the retrievable chunks (chunk ``j`` here is
            chunk ``first_chunk + j`` of the prompt).
        chunk_kmax: same, maxima.
    """

    static_heads: Tensor
    static_kept: PositionsCSR
    dynamic_heads: Tensor
    chunk_kmin: Tensor | None
    chunk_kmax: Tensor | None


@dataclass(frozen=True)
class CompressedLayout:
    """Everything decode needs of one compressed request, derived once from its plan."""

    prompt_len: int
    num_kv_heads: int
    top_k_chunks: int
    dynamic_rows: DynamicRowLayout
    layers: tuple[LayerLayout, ...]
    read_entries_per_step: int

    @classmethod
    def from_plan(cls, plan: CompressionPlan, device: torch.device | str) -> CompressedLayout:
        dyn_rows = DynamicRowLayout.for_prompt(
            plan.prompt_len, plan.sink, plan.window, plan.chunk_size
        )
        first, end = dyn_rows.first_chunk, dyn_rows.end_chunk
        is_dynamic = plan.is_dynamic.cpu()
        layers = []
        read = 0
        for layer in range(plan.num_layers):
            dyn_mask = is_dynamic[layer]
            static_heads = torch.nonzero(~dyn_mask).reshape(-1)
            dynamic_heads = torch.nonzero(dyn_mask).reshape(-1)
            rows = [plan.kept_positions_of(layer, int(h)) for h in static_heads]
            static_kept = PositionsCSR.from_lists(rows, device)
            read += static_kept.nnz
            kmin = kmax = None
            if dynamic_heads.numel():
                assert plan.chunk_kmin is not None and plan.chunk_kmax is not None
                heads = dynamic_heads.to(plan.chunk_kmin.device)
                kmin = plan.chunk_kmin[layer, heads, first:end].to(device)
                kmax = plan.chunk_kmax[layer, heads, first:end].to(device)
                per_row = dyn_rows.row_length(plan.prompt_len, plan.top_k_chunks)
                read += int(dynamic_heads.numel()) * per_row
            layers.append(LayerLayout(static_heads, static_kept, dynamic_heads, kmin, kmax))
        return cls(
            prompt_len=plan.prompt_len,
            num_kv_heads=plan.num_kv_heads,
            top_k_chunks=plan.top_k_chunks,
            dynamic_rows=dyn_rows,
            layers=tuple(layers),
            read_entries_per_step=read,
        )

    @property
    def read_fraction(self) -> float:
        """Prompt entries read per decode step over the dense prompt entries."""
        dense = len(self.layers) * self.num_kv_heads * self.prompt_len
        return self.read_entries_per_step / dense


@dataclass(frozen=True)
class DecodeBatchLayout:
    """One decode step's batch: per request its pool row, dense length and layout (or dense)."""

    req_pool_indices: Sequence[int]
    seq_lens: Sequence[int]
    layouts: Sequence[CompressedLayout | None]
    num_kv_heads: int

    @property
    def has_compressed(self) -> bool:
        return any(layout is not None for layout in self.layouts)

    def layer_table(self, layer: int, q: Tensor, req_to_token: Tensor) -> FoldedPageTable:
        """The folded page table of ``layer`` for this step.

        Args:
            layer: layer index.
            q: ``[B * H_kv, G, D]`` this layer's queries, rows request-major then kv head (the
                dynamic rows' chunk scores need them).
            req_to_token: ``[P, ctx]`` int32 SGLang's request-to-slot map.
        """
        heads = self.num_kv_heads
        num_rows = len(self.req_pool_indices) * heads
        device = req_to_token.device
        tail_start = torch.zeros(num_rows, dtype=torch.int64)
        tail_end = torch.tensor(self.seq_lens, dtype=torch.int64).repeat_interleave(heads)
        parts: list[tuple[PositionsCSR, Tensor]] = []
        dyn_rows: list[Tensor] = []
        dyn_specs: list[tuple[CompressedLayout, LayerLayout]] = []
        for b, layout in enumerate(self.layouts):
            if layout is None:
                continue
            lay = layout.layers[layer]
            base = b * heads
            if lay.static_heads.numel():
                rows = base + lay.static_heads
                parts.append((lay.static_kept, rows))
                tail_start[rows] = layout.prompt_len
            if lay.dynamic_heads.numel():
                rows = base + lay.dynamic_heads
                dyn_rows.append(rows)
                dyn_specs.append((layout, lay))
                tail_start[rows] = layout.dynamic_rows.tail_start
        if dyn_rows:
            rows = torch.cat(dyn_rows)
            parts.append((_retrieve_chunks(q, rows, dyn_specs), rows))
        selected = assemble_rows(num_rows, parts, device)
        specs = FoldedRowSpecs.create(
            torch.tensor(self.req_pool_indices, dtype=torch.int64).repeat_interleave(heads),
            torch.arange(heads, dtype=torch.int64).repeat(len(self.req_pool_indices)),
            selected,
            tail_start,
            tail_end,
        )
        return build_folded_page_table(req_to_token, specs, heads)


def _retrieve_chunks(
    q: Tensor, rows: Tensor, specs: Sequence[tuple[CompressedLayout, LayerLayout]]
) -> PositionsCSR:
    """Dynamic rows' selections for this step: resident prefix + this query's top-k chunks."""
    kmins, kmaxs, num_chunks, num_selected, prefixes, firsts = [], [], [], [], [], []
    k = max(layout.top_k_chunks for layout, _ in specs)
    for layout, lay in specs:
        assert lay.chunk_kmin is not None and lay.chunk_kmax is not None
        n = lay.dynamic_heads.numel()
        dyn = layout.dynamic_rows
        kmins.append(lay.chunk_kmin)
        kmaxs.append(lay.chunk_kmax)
        num_chunks += [dyn.num_chunks] * n
        num_selected += [dyn.num_selected(layout.top_k_chunks)] * n
        prefixes += [dyn.prefix_end] * n
        firsts += [dyn.first_chunk] * n
    width = max(t.shape[1] for t in kmins)
    kmin = torch.cat([_pad_chunks(t, width) for t in kmins])
    kmax = torch.cat([_pad_chunks(t, width) for t in kmaxs])
    device = kmin.device
    if width == 0:
        top = torch.full((rows.numel(), k), -1, dtype=torch.int64, device=device)
    else:
        counts = torch.tensor(num_chunks, dtype=torch.int32, device=device)
        _, top = chunk_topk_auto(q[rows.to(q.device)].to(kmin.dtype), kmin, kmax, counts, k)
        top = top.to(torch.int64)
    shift = torch.tensor(firsts, dtype=torch.int64, device=device).unsqueeze(1)
    top = torch.where(top >= 0, top + shift, top)
    return chunk_selection_positions(
        top, num_selected, specs[0][0].dynamic_rows.chunk_size, prefixes
    )


def _pad_chunks(bounds: Tensor, width: int) -> Tensor:
    missing = width - bounds.shape[1]
    if missing == 0:
        return bounds
    pad = bounds.new_zeros(bounds.shape[0], missing, bounds.shape[2])
    return torch.cat([bounds, pad], dim=1)
