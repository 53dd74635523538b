"""``compact`` storage: where a compressed request's prompt KV lives after its prefix is released.

A request takes ``S`` slots from SGLang's allocator. In the folded view (DESIGN §3) they give it
``S * H_kv`` *compact entries* per layer: entry ``e`` is head slice ``e mod H_kv`` of slot
``slots[e div H_kv]``; layers share the slots, each uses its own ``k_buffer[l]``. Per layer the
entries are laid out row after row:

- a static head's kept positions, in kept order (its row reads them all);
- a dynamic head's *region*. On the device tier: the whole prompt ``[0, N)``, entry offset =
  position. On the host tier: ``[prefix | S staging chunks | window]``: the resident prefix
  ``[0, prefix_end)``, ``S`` chunk-sized staging slots that decode fills from the host copy
  (:func:`staging_slots`: one step's ``n_sel = min(k, num_chunks)`` plus a slack, so chunks
  selected again soon are still there), then the window ``[tail_start, N)``; the retrievable
  chunks live on the host (chunk-major), one host chunk per (layer, head, chunk).

Decode reads a row as region offsets mapped through the region (``CHUNK_BASE`` in the decode
records of :mod:`hybridkv_sglang.kernels.folded_tables`), so a compact row lists the same KV as
the ``in_place`` row of the same plan.
Everything here is pure torch; the runtime does the allocation and the copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.page_tables import DynamicRowLayout, PositionsCSR, _h2d


@dataclass(frozen=True)
class CompactShape:
    """Entry counts of one request's compact layout, known before any slot is taken."""

    num_kv_heads: int
    entries_per_layer: tuple[int, ...]
    host_chunks: int
    """Host chunks the dynamic heads need (0 on the device tier or without dynamic heads)."""

    @property
    def num_slots(self) -> int:
        """Slots to take from the allocator: the widest layer's entries over ``H_kv``."""
        widest = max(self.entries_per_layer, default=0)
        return -(-widest // self.num_kv_heads)


def staging_slots(rows: DynamicRowLayout, top_k: int, slack: float) -> int:
    """Staging slots of a host-tier dynamic head: one step's selection and ``slack`` times
    more (at most every retrievable chunk), so a chunk selected again within a few steps is
    read from its slot instead of crossing the bus again."""
    selected = rows.num_selected(top_k)
    return min(rows.num_chunks, math.ceil(selected * (1 + slack)))


def dynamic_row_locals(rows: DynamicRowLayout, staging: int | None) -> tuple[int, int, int]:
    """``(prefix_len, window_start, window_end)`` of a dynamic head's row in region offsets.

    ``staging``: the host tier's staging slots per head (``None``: the device tier). A row
    reads ``[0, prefix_len)``, then its chunks (chunk ``c`` at offsets ``[c*C, (c+1)*C)``:
    prompt chunks on the device tier, staging slot ``j`` as chunk ``first_chunk + j`` on the
    host tier), then ``[window_start, window_end)``; ``window_end`` is the region's length.
    """
    if staging is None:
        return rows.prefix_end, rows.tail_start, rows.prompt_len
    start = rows.prefix_end + staging * rows.chunk_size
    return rows.prefix_end, start, start + rows.prompt_len - rows.tail_start


def compact_shape(layout: CompressedLayout, staging: int | None) -> CompactShape:
    """How many entries (per layer) and host chunks ``layout`` needs in compact storage
    (``staging``: staging slots per host-tier dynamic head, ``None`` on the device tier)."""
    rows = layout.dynamic_rows
    region = dynamic_row_locals(rows, staging)[2]
    entries, chunks = [], 0
    for lay in layout.layers:
        n_dyn = int(lay.dynamic_heads.numel())
        entries.append(lay.static_kept.nnz + n_dyn * region)
        if staging is not None:
            chunks += n_dyn * rows.num_chunks
    return CompactShape(layout.num_kv_heads, tuple(entries), chunks)


@dataclass(frozen=True)
class CompactLayerLayout:
    """One layer of a compact request.

    Attributes:
        static_entries: CSR over the layer's static heads, folded entry ids in kept order.
        dynamic_regions: ``[n_d, W]`` int64 device, folded entry ids of each dynamic head's
            region (see the module docstring).
        host_chunks: ``[n_d, num_chunks]`` int64 CPU, host-tier chunk of retrievable chunk
            ``j`` of each dynamic head; ``None`` on the device tier.
    """

    static_entries: PositionsCSR
    dynamic_regions: Tensor
    host_chunks: Tensor | None


@dataclass(frozen=True)
class CompactCopies:
    """The copies that fill a compact layout at compaction, per layer.

    ``entry_src[l]`` / ``entry_dst[l]``: folded pool entries copied within layer ``l``'s buffer.
    ``chunk_src[l]``: ``[m, C]`` folded pool entries of the chunks going to the host, whose host
    chunk ids are ``chunk_dst[l]`` ``[m]`` (CPU).
    """

    entry_src: tuple[Tensor, ...]
    entry_dst: tuple[Tensor, ...]
    chunk_src: tuple[Tensor, ...]
    chunk_dst: tuple[Tensor, ...]


@dataclass(frozen=True)
class CompactLayout:
    """A compressed request whose prompt KV lives in compact entries (and the host tier)."""

    plan: CompressedLayout
    slots: Tensor
    """``[S]`` int64, slots owned (freed at release)."""
    host_chunk_ids: Tensor
    """``[M]`` int64 CPU, host chunks owned (freed at release)."""
    layers: tuple[CompactLayerLayout, ...]
    staging_slots: int = 0
    """Staging slots per host-tier dynamic head (0: the device tier)."""

    @property
    def on_host(self) -> bool:
        return self.host_chunk_ids.numel() > 0


def build_compact_layout(
    plan: CompressedLayout,
    prompt_slots: Tensor,
    slots: Tensor,
    host_chunk_ids: Tensor | None,
    staging: int | None = None,
) -> tuple[CompactLayout, CompactCopies]:
    """Lay ``plan`` out over ``slots`` (and host chunks) and list the copies that fill it.

    Args:
        plan: the request's ``in_place`` layout (positions in its row).
        prompt_slots: ``[N]`` int64 device, the slots of the prompt (``req_to_token[row, :N]``).
        slots: ``[S]`` int64 device, ``S >= compact_shape(plan, staging).num_slots``.
        host_chunk_ids: ``[M]`` int64 CPU from the host tier, ``M = compact_shape(...).host_chunks``
            or ``None`` for the device tier.
        staging: staging slots per dynamic head on the host tier (with ``host_chunk_ids``).
    """
    on_host = host_chunk_ids is not None
    if on_host != (staging is not None):
        raise ValueError("host_chunk_ids and staging go together (the host tier)")
    shape = compact_shape(plan, staging)
    if slots.numel() < shape.num_slots:
        raise ValueError(f"slots: expected at least {shape.num_slots}, got {slots.numel()}")
    heads = plan.num_kv_heads
    device = slots.device
    entry_of = slots.to(torch.int64).unsqueeze(1) * heads + torch.arange(heads, device=device)
    entry_of = entry_of.reshape(-1)
    prompt_folded = prompt_slots.to(torch.int64).unsqueeze(1) * heads  # + head
    rows = plan.dynamic_rows
    region_len = dynamic_row_locals(rows, staging)[2]
    region_src = _region_source_positions(rows, staging, device)
    chunk_positions = torch.arange(rows.first_chunk, rows.end_chunk, device=device).unsqueeze(
        1
    ) * rows.chunk_size + torch.arange(rows.chunk_size, device=device)
    host_ids = host_chunk_ids if on_host else torch.empty(0, dtype=torch.int64)
    # The region offsets copied from the prompt, as indices built once on the host: a boolean
    # mask would read the device once per layer.
    host_src = _region_source_positions(rows, staging, torch.device("cpu"))
    copy_at = _h2d(torch.nonzero(host_src >= 0).reshape(-1), device)
    region_copied = region_src[copy_at]
    host_used = 0
    layers, entry_src, entry_dst, chunk_src, chunk_dst = [], [], [], [], []
    for lay in plan.layers:
        kept = lay.static_kept
        static_heads = _h2d(lay.static_heads, device)
        per_entry_head = torch.repeat_interleave(
            static_heads, kept.indptr.to(torch.int64).diff(), output_size=kept.nnz
        )
        src_static = prompt_folded[kept.positions.to(torch.int64)].squeeze(1) + per_entry_head
        dst_static = entry_of[: kept.nnz]
        static_entries = PositionsCSR(kept.indptr_host, kept.indptr, dst_static.to(torch.int32))
        n_dyn = int(lay.dynamic_heads.numel())
        dyn_heads = _h2d(lay.dynamic_heads, device)
        regions = entry_of[kept.nnz : kept.nnz + n_dyn * region_len].reshape(n_dyn, region_len)
        src_dyn = prompt_folded[region_copied].reshape(1, -1) + dyn_heads.unsqueeze(1)
        dst_dyn = regions[:, copy_at]
        entry_src.append(torch.cat([src_static, src_dyn.reshape(-1)]))
        entry_dst.append(torch.cat([dst_static, dst_dyn.reshape(-1)]))
        host_chunks = None
        if on_host:
            count = n_dyn * rows.num_chunks
            host_chunks = host_ids[host_used : host_used + count].reshape(n_dyn, rows.num_chunks)
            host_used += count
            src = prompt_folded[chunk_positions].squeeze(-1)  # [num_chunks, C]
            chunk_src.append(
                (src.unsqueeze(0) + dyn_heads.view(-1, 1, 1)).reshape(-1, rows.chunk_size)
            )
            chunk_dst.append(host_chunks.reshape(-1))
        else:
            chunk_src.append(torch.empty(0, rows.chunk_size, dtype=torch.int64, device=device))
            chunk_dst.append(torch.empty(0, dtype=torch.int64))
        layers.append(CompactLayerLayout(static_entries, regions, host_chunks))
    layout = CompactLayout(plan, slots, host_ids, tuple(layers), staging or 0)
    copies = CompactCopies(tuple(entry_src), tuple(entry_dst), tuple(chunk_src), tuple(chunk_dst))
    return layout, copies


def _region_source_positions(
    rows: DynamicRowLayout, staging: int | None, device: torch.device
) -> Tensor:
    """``[W]`` prompt position copied into each region offset; ``-1`` for staging slots."""
    if staging is None:
        return torch.arange(rows.prompt_len, device=device)
    prefix, window_start, _ = dynamic_row_locals(rows, staging)
    return torch.cat(
        [
            torch.arange(prefix, device=device),
            torch.full((window_start - prefix,), -1, device=device),
            torch.arange(rows.tail_start, rows.prompt_len, device=device),
        ]
    )
