"""Decode page tables in fixed-size buffers, the form a CUDA graph replays.

A captured graph reads its tables at fixed addresses with fixed shapes, and nothing inside it
may read the host. So one decode step is split in two:

- out of the graph, on the host, before the replay: :meth:`StaticDecodeTables.stage` writes
  every layer's complete table into the fixed buffers, except the chunks the dynamic heads
  retrieve this step, whose places are reserved (every row length is known on the host, so the
  places are too); plus, per dynamic row, where its query, pool row, head and reserved places
  are; plus, when the batch's compressed requests changed, their chunks' key bounds;
- in the graph, per layer: :meth:`StaticDecodeTables.fill_chunks` scores every chunk with the
  layer's queries (:mod:`ragged_chunk_scores`), takes a fixed top-k and writes the chosen chunks'
  entries into the reserved places.

The filled table equals :meth:`DecodeBatchLayout.layer_table` of the same step entry for entry.
Rows beyond the batch read one entry (slot 0, SGLang's padding sink), so a wrapper planned for
the fixed row count never sees an empty row.

Not served here (the batch runs eagerly instead, :func:`static_table_misfit` says why):
``compact`` requests with dynamic heads (their chunks are staged from the host tier or read
through regions) and batches larger than the buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.ragged_chunk_scores import ragged_chunk_scores_auto
from hybridkv_sglang.storage.compact_layout import CompactLayout
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout, DynamicGroup
from hybridkv_sglang.storage.page_tables import FoldedPageTable


@dataclass(frozen=True)
class StaticTableLimits:
    """Sizes of the fixed buffers (per layer)."""

    max_rows: int
    """(request, kv head) rows: the largest captured batch × ``H_kv``."""
    max_entries: int
    """Folded entries of one layer's table, padding rows included."""
    max_bound_chunks: int
    """Retrievable chunks of all dynamic rows of one layer."""
    max_row_chunks: int
    """Retrievable chunks of one dynamic row (the context length / ``chunk_size``)."""
    top_k: int
    """Chunks each dynamic row retrieves per step (the captured ``k``)."""
    chunk_size: int

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_entries", "max_row_chunks", "top_k", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"StaticTableLimits.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.max_bound_chunks < 0:
            raise ValueError(f"max_bound_chunks must be >= 0, got {self.max_bound_chunks}")


def _plan_of(layout: CompressedLayout | CompactLayout) -> CompressedLayout:
    return layout.plan if isinstance(layout, CompactLayout) else layout


def layer_row_lengths(batch: DecodeBatchLayout, layer: int) -> Tensor:
    """``[B * H_kv]`` int64 CPU: the entries each row of ``layer`` reads this step (host only)."""
    heads = batch.num_kv_heads
    lengths = torch.tensor(batch.seq_lens, dtype=torch.int64).repeat_interleave(heads)
    for b, layout in enumerate(batch.layouts):
        if layout is None:
            continue
        plan = _plan_of(layout)
        lay = plan.layers[layer]
        base, seq_len = b * heads, batch.seq_lens[b]
        kept = (
            layout.layers[layer].static_entries
            if isinstance(layout, CompactLayout)
            else lay.static_kept
        )
        lengths[base + lay.static_heads] = kept.lengths_host() + (seq_len - plan.prompt_len)
        lengths[base + lay.dynamic_heads] = plan.dynamic_rows.row_length(seq_len, plan.top_k_chunks)
    return lengths


def static_table_misfit(batch: DecodeBatchLayout, limits: StaticTableLimits) -> str | None:
    """Why this step cannot use the fixed buffers, or ``None`` when it can (host only)."""
    rows = len(batch.req_pool_indices) * batch.num_kv_heads
    if rows > limits.max_rows:
        return f"{rows} rows > {limits.max_rows}"
    layers = 0
    for layout in batch.layouts:
        if layout is None:
            continue
        plan = _plan_of(layout)
        layers = len(plan.layers)
        has_dynamic = any(lay.dynamic_heads.numel() for lay in plan.layers)
        if not has_dynamic:
            continue
        if isinstance(layout, CompactLayout):
            return "a compact request with dynamic heads"
        if plan.top_k_chunks > limits.top_k or plan.dynamic_rows.chunk_size != limits.chunk_size:
            return f"top_k {plan.top_k_chunks} / chunk_size {plan.dynamic_rows.chunk_size}"
        if plan.dynamic_rows.num_chunks > limits.max_row_chunks:
            return f"{plan.dynamic_rows.num_chunks} chunks in a row > {limits.max_row_chunks}"
    for layer in range(layers):
        entries = int(layer_row_lengths(batch, layer).sum()) + limits.max_rows - rows
        if entries > limits.max_entries:
            return f"{entries} entries in layer {layer} > {limits.max_entries}"
        chunks = sum(
            g.rows.numel() * g.plan.dynamic_rows.num_chunks for g in batch.dynamic_groups(layer)
        )
        if chunks > limits.max_bound_chunks:
            return f"{chunks} chunk bounds in layer {layer} > {limits.max_bound_chunks}"
    return None


class StaticDecodeTables:
    """Every layer's decode table in fixed buffers (see the module docstring).

    Buffers, per layer ``l``:

    - ``kv_indptr[l]`` ``[max_rows + 1]`` int32, ``kv_indices[l]`` ``[max_entries + C]`` int32
      (the last ``C`` entries are where unused places write);
    - dynamic rows, ``R_d = max_rows``: ``dyn_q_row``, ``dyn_req``, ``dyn_head``, ``dyn_first``
      ``[R_d]`` int64 and ``dyn_dest`` ``[R_d, k]`` int64 (where chunk ``j``'s ``C`` entries go);
    - chunk bounds, ``J = max_bound_chunks``: ``kmin``, ``kmax`` ``[J, D]``, ``chunk_row`` and
      ``chunk_col`` ``[J]`` int64 (which dynamic row, which of its chunks; unused: ``R_d``, 0).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        limits: StaticTableLimits,
        bound_dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.limits = limits
        self.device = torch.device(device)
        lim, rd = limits, limits.max_rows

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(num_layers, *shape, dtype=dtype, device=device)

        self.scratch = lim.max_entries
        self.kv_indptr = zeros(lim.max_rows + 1, dtype=torch.int32)
        self.kv_indices = zeros(lim.max_entries + lim.chunk_size, dtype=torch.int32)
        self.kv_last_page_len = torch.ones(lim.max_rows, dtype=torch.int32, device=device)
        self.dyn_q_row = zeros(rd)
        self.dyn_req = zeros(rd)
        self.dyn_head = zeros(rd)
        self.dyn_first = zeros(rd)
        self.dyn_dest = torch.full(
            (num_layers, rd, lim.top_k), self.scratch, dtype=torch.int64, device=device
        )
        self.kmin = zeros(lim.max_bound_chunks, head_dim, dtype=bound_dtype)
        self.kmax = zeros(lim.max_bound_chunks, head_dim, dtype=bound_dtype)
        self.chunk_row = torch.full(
            (num_layers, lim.max_bound_chunks), rd, dtype=torch.int64, device=device
        )
        self.chunk_col = zeros(lim.max_bound_chunks)
        self.kv_indptr_host = torch.zeros(num_layers, lim.max_rows + 1, dtype=torch.int32)
        self.num_rows = 0
        self._bound_layouts: tuple[CompressedLayout | CompactLayout, ...] = ()

    @property
    def nbytes(self) -> int:
        """Device memory the fixed buffers hold."""
        buffers = (
            self.kv_indptr,
            self.kv_indices,
            self.dyn_q_row,
            self.dyn_req,
            self.dyn_head,
            self.dyn_first,
            self.dyn_dest,
            self.kmin,
            self.kmax,
            self.chunk_row,
            self.chunk_col,
        )
        return sum(t.numel() * t.element_size() for t in buffers)

    # ------------------------------------------------------------------ out of the graph
    def stage(self, batch: DecodeBatchLayout, req_to_token: Tensor) -> None:
        """Write this step's tables (all but the retrieved chunks) into the buffers (host side).

        Raises ``ValueError`` when the batch does not fit: check :func:`static_table_misfit`
        first (a graph has already been chosen when this runs).
        """
        misfit = static_table_misfit(batch, self.limits)
        if misfit is not None:
            raise ValueError(f"StaticDecodeTables.stage: the batch does not fit ({misfit})")
        compressed = tuple(layout for layout in batch.layouts if layout is not None)
        refresh_bounds = len(compressed) != len(self._bound_layouts) or any(
            a is not b for a, b in zip(compressed, self._bound_layouts, strict=False)
        )
        self.num_rows = len(batch.req_pool_indices) * self.num_kv_heads
        for layer in range(self.num_layers):
            groups = batch.dynamic_groups(layer)
            table = batch.layer_table(
                layer,
                None,
                req_to_token,
                top=_stand_in_chunks(groups, self.limits.top_k, req_to_token.device),
            )
            self._stage_table(layer, table)
            self._stage_dynamic_rows(layer, batch, groups, table.kv_indptr_host)
            if refresh_bounds:
                self._stage_bounds(layer, groups)
        self._bound_layouts = compressed

    def _stage_table(self, layer: int, table: FoldedPageTable) -> None:
        rows, nnz = table.num_rows, table.nnz
        pad = self.limits.max_rows - rows
        host = self.kv_indptr_host[layer]
        host[: rows + 1] = table.kv_indptr_host
        host[rows + 1 :] = nnz + torch.arange(1, pad + 1, dtype=torch.int32)
        self.kv_indptr[layer].copy_(host, non_blocking=True)
        self.kv_indices[layer, :nnz].copy_(table.kv_indices)
        self.kv_indices[layer, nnz : nnz + pad].zero_()

    def _stage_dynamic_rows(
        self,
        layer: int,
        batch: DecodeBatchLayout,
        groups: Sequence[DynamicGroup],
        indptr_host: Tensor,
    ) -> None:
        lim = self.limits
        rd = lim.max_rows
        q_row = torch.zeros(rd, dtype=torch.int64)
        req = torch.zeros(rd, dtype=torch.int64)
        head = torch.zeros(rd, dtype=torch.int64)
        first = torch.zeros(rd, dtype=torch.int64)
        dest = torch.full((rd, lim.top_k), self.scratch, dtype=torch.int64)
        i = 0
        chunk_offsets = torch.arange(lim.top_k, dtype=torch.int64) * lim.chunk_size
        for g in groups:
            dyn = g.plan.dynamic_rows
            n_sel = dyn.num_selected(g.plan.top_k_chunks)
            for row in g.rows.tolist():
                q_row[i] = row
                req[i] = batch.req_pool_indices[g.request]
                head[i] = row % self.num_kv_heads
                first[i] = dyn.first_chunk
                start = int(indptr_host[row]) + dyn.prefix_end
                dest[i, :n_sel] = start + chunk_offsets[:n_sel]
                i += 1
        packed = torch.stack([q_row, req, head, first]).to(self.device, non_blocking=True)
        self.dyn_q_row[layer].copy_(packed[0])
        self.dyn_req[layer].copy_(packed[1])
        self.dyn_head[layer].copy_(packed[2])
        self.dyn_first[layer].copy_(packed[3])
        self.dyn_dest[layer].copy_(dest, non_blocking=True)

    def _stage_bounds(self, layer: int, groups: Sequence[DynamicGroup]) -> None:
        rows, cols, kmins, kmaxs = [], [], [], []
        i = 0
        for g in groups:
            assert g.layer.chunk_kmin is not None and g.layer.chunk_kmax is not None
            n, chunks = g.layer.chunk_kmin.shape[:2]
            rows.append(torch.arange(i, i + n).repeat_interleave(chunks))
            cols.append(torch.arange(chunks).repeat(n))
            kmins.append(g.layer.chunk_kmin.reshape(n * chunks, -1))
            kmaxs.append(g.layer.chunk_kmax.reshape(n * chunks, -1))
            i += n
        self.chunk_row[layer].fill_(self.limits.max_rows)
        self.chunk_col[layer].zero_()
        if not rows:
            return
        used = sum(t.numel() for t in rows)
        self.chunk_row[layer, :used].copy_(torch.cat(rows), non_blocking=True)
        self.chunk_col[layer, :used].copy_(torch.cat(cols), non_blocking=True)
        self.kmin[layer, :used].copy_(torch.cat(kmins))
        self.kmax[layer, :used].copy_(torch.cat(kmaxs))

    # ------------------------------------------------------------------ in the graph
    def fill_chunks(self, layer: int, q: Tensor, req_to_token: Tensor) -> None:
        """Write this step's retrieved chunks into ``layer``'s table; fixed shapes, no host sync.

        Args:
            q: ``[rows, G, D]`` this layer's queries (rows request-major, then kv head).
            req_to_token: ``[P, ctx]`` int32, SGLang's request-to-slot map.
        """
        lim = self.limits
        q_dyn = q.index_select(0, self.dyn_q_row[layer].clamp(max=q.shape[0] - 1))
        scores = ragged_chunk_scores_auto(
            q_dyn.to(self.kmin.dtype), self.kmin[layer], self.kmax[layer], self.chunk_row[layer]
        )
        width = max(lim.max_row_chunks, lim.top_k)
        grid = torch.full(
            (lim.max_rows + 1, width), float("-inf"), dtype=torch.float32, device=q.device
        )
        grid.index_put_((self.chunk_row[layer], self.chunk_col[layer]), scores)
        top = torch.topk(grid[: lim.max_rows], lim.top_k, dim=1, sorted=True).indices
        within = torch.arange(lim.chunk_size, device=q.device)
        positions = (self.dyn_first[layer][:, None, None] + top[:, :, None]) * lim.chunk_size
        positions = (positions + within).clamp(max=req_to_token.shape[1] - 1)
        slots = req_to_token[self.dyn_req[layer][:, None, None], positions].to(torch.int64)
        entries = slots * self.num_kv_heads + self.dyn_head[layer][:, None, None]
        dest = self.dyn_dest[layer][:, :, None] + within
        self.kv_indices[layer].index_put_((dest.reshape(-1),), entries.reshape(-1).to(torch.int32))

    def layer_table(self, layer: int) -> FoldedPageTable:
        """The staged (and, after :meth:`fill_chunks`, complete) table of the batch's rows."""
        rows = self.num_rows
        host = self.kv_indptr_host[layer, : rows + 1]
        return FoldedPageTable(
            kv_indptr=self.kv_indptr[layer, : rows + 1],
            kv_indices=self.kv_indices[layer, : int(host[-1])],
            kv_last_page_len=self.kv_last_page_len[:rows],
            kv_indptr_host=host,
        )


def _stand_in_chunks(groups: Sequence[DynamicGroup], k: int, device: torch.device) -> Tensor | None:
    """Valid chunk ids that reserve each dynamic row's places (overwritten in the graph)."""
    if not groups:
        return None
    parts = []
    for g in groups:
        dyn = g.plan.dynamic_rows
        ids = torch.full((k,), -1, dtype=torch.int64)
        n_sel = dyn.num_selected(g.plan.top_k_chunks)
        ids[:n_sel] = dyn.first_chunk + torch.arange(n_sel)
        parts.append(ids.expand(g.rows.numel(), k))
    return torch.cat(parts).to(device)
