"""One decode step over the folded tables, built on the device (eager and CUDA graphs alike).

Per step, :meth:`FoldedDecode.begin_step` computes every layer's ``kv_indptr`` and KV split
counts in one launch from SGLang's ``req_pool_indices`` and ``seq_lens`` and the per-request
metadata (:class:`~hybridkv_sglang.storage.decode_metadata.DecodeMetadata`). Per layer,
:meth:`FoldedDecode.retrieve` retrieves the dynamic rows' chunks and, with a host tier, stages
``compact`` host-tier rows' chunks into their device slots
(:mod:`hybridkv_sglang.kernels.host_staging`), in one launch; :meth:`FoldedDecode.attend` fills
the layer's ``kv_indices`` into one buffer that every layer reuses, and attends. Nothing reads
the device from the host, so the same calls run inside a captured decode graph.

Kernels: SGLang's own Triton decode kernel (``decode_attention_fwd``, the stock ``triton``
backend's; no host plan) over the folded view ``k_buffer.view(slots * H_kv, 1, D)`` with the
table kernels of :mod:`hybridkv_sglang.kernels.folded_tables` (``decode_kernel="triton"``, the
default on GPUs), or their torch twins and :func:`sparse_decode_reference` (``"torch"``, the CPU
path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.attention.sparse_decode import sparse_decode_reference
from hybridkv_sglang.kernels.folded_tables import (
    chunk_retrieval,
    chunk_retrieval_ref,
    fill_folded_indices,
    fill_folded_indices_ref,
    folded_lengths,
    folded_lengths_ref,
)
from hybridkv_sglang.kernels.host_staging import HostStaging
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata


@dataclass(frozen=True)
class FoldedShape:
    """What the step buffers are sized from (fixed at start-up)."""

    num_layers: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    v_head_dim: int
    max_rows: int
    """(request, kv head) rows of the largest batch: max batch size × ``H_kv``."""
    table_entries: int
    """Folded entries one layer's table may hold (the buffer every layer reuses)."""
    max_kv_splits: int
    chunk_size: int
    max_chunks: int
    """Retrievable chunks of the longest dynamic row (the context length over ``chunk_size``)."""
    max_selected: int
    """Chunks a dynamic row retrieves per step in a graph (more: the batch decodes eagerly)."""
    max_stage_slots: int = 0
    """Staging slots of a host-tier dynamic row (0: no host tier)."""


class FoldedDecode:
    """Step buffers plus the kernels of one decode step (see the module docstring)."""

    def __init__(
        self,
        meta: DecodeMetadata,
        shape: FoldedShape,
        *,
        use_triton: bool,
        target_programs: int,
        device: torch.device | str,
    ) -> None:
        self.meta = meta
        self.shape = shape
        self.use_triton = use_triton
        self.target_programs = target_programs
        self.kv_indices = torch.zeros(shape.table_entries, dtype=torch.int64, device=device)
        self._allocate_rows(device)
        self._lengths: Callable[..., None] = folded_lengths if use_triton else folded_lengths_ref
        self._retrieve: Callable[..., None] = chunk_retrieval if use_triton else chunk_retrieval_ref
        self._fill: Callable[..., None] = (
            fill_folded_indices if use_triton else fill_folded_indices_ref
        )
        self._host_tier: tuple[Tensor, Tensor] | None = None
        self._req_pool_indices: Tensor | None = None
        self._seq_lens: Tensor | None = None
        self._indices: Tensor = self.kv_indices
        self._retrieval = (shape.max_chunks, shape.max_selected)

    @property
    def nbytes(self) -> int:
        """Device bytes of the step buffers: the tables plus the retrieval's block counters and
        the attention's split scratch."""
        scratch = [self.retrieval_done]
        if self.use_triton:
            scratch += [self.attn_logits, self.attn_lse]
        return self.table_bytes + sum(t.numel() * t.element_size() for t in scratch)

    def _allocate_rows(self, device: torch.device | str) -> None:
        shape = self.shape
        rows, layers = shape.max_rows, shape.num_layers
        self.kv_indptr = torch.zeros(layers, rows + 1, dtype=torch.int32, device=device)
        self.num_kv_splits = torch.ones(layers, rows, dtype=torch.int32, device=device)
        # per row, the retrieval's finished blocks of chunks (zeros between launches)
        self.retrieval_done = torch.zeros(rows, dtype=torch.int32, device=device)
        if self.use_triton:
            splits, dv = shape.max_kv_splits, shape.v_head_dim
            self.attn_logits = torch.empty(
                rows, shape.group_size, splits, dv, dtype=torch.float32, device=device
            )
            self.attn_lse = torch.empty(
                rows, shape.group_size, splits, dtype=torch.float32, device=device
            )

    def reserve(self, table_entries: int, max_rows: int) -> None:
        """Grow the buffers for graph batches of ``max_rows`` rows reading ``table_entries``
        entries per layer (before any graph captures them)."""
        device = self.kv_indices.device
        if table_entries > self.kv_indices.numel():
            self.kv_indices = torch.zeros(table_entries, dtype=torch.int64, device=device)
        if max_rows > self.shape.max_rows:
            self.shape = dataclasses.replace(self.shape, max_rows=max_rows)
            self._allocate_rows(device)

    @property
    def table_bytes(self) -> int:
        """Bytes of the tables themselves: row offsets, split counts, indices."""
        tensors = (self.kv_indptr, self.num_kv_splits, self.kv_indices)
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin_step(
        self,
        req_pool_indices: Tensor,
        seq_lens: Tensor,
        table_entries: int | None = None,
        retrieval: tuple[int, int] | None = None,
    ) -> None:
        """Every layer's row offsets and split counts for this batch (one launch).

        Eager steps pass host bounds (graphs use the fixed ones, see :meth:`fits`):
        ``table_entries`` of one layer (above the buffer, the step takes a buffer of its own)
        and ``retrieval``, the batch's most ``(chunks, selected chunks)`` of a dynamic row.
        """
        self._req_pool_indices = req_pool_indices
        self._seq_lens = seq_lens
        self._indices = self.kv_indices
        self._retrieval = retrieval or (self.shape.max_chunks, self.shape.max_selected)
        if table_entries is not None and table_entries > self.kv_indices.numel():
            self._indices = torch.empty(
                table_entries, dtype=torch.int64, device=self.kv_indices.device
            )
        self._lengths(
            req_pool_indices,
            seq_lens,
            self.meta.slot_of_row,
            self.meta.row_meta,
            self.kv_indptr,
            self.num_kv_splits,
            chunk_size=self.shape.chunk_size,
            max_kv_splits=self.shape.max_kv_splits,
            target_programs=self.target_programs,
        )

    def fits(self, batch_size: int, table_entries: int, retrieval: tuple[int, int]) -> bool:
        """Host only: whether the fixed buffers and grids hold this batch (graphs need it)."""
        chunks, selected = retrieval
        return (
            batch_size * self.shape.num_kv_heads <= self.shape.max_rows
            and table_entries <= self.kv_indices.numel()
            and chunks <= self.shape.max_chunks
            and selected <= self.shape.max_selected
        )

    def retrieve(self, layer: int, q_rows: Tensor, k_buffer: Tensor, v_buffer: Tensor) -> None:
        """The dynamic rows' chunks of ``layer`` into ``meta.chunk_top`` and, with a host tier,
        the host-tier rows' selected chunks staged into their slots (copied from the host tier
        into ``k_buffer`` / ``v_buffer`` where a slot does not hold them yet; ``chunk_top`` then
        names the slots). One launch; nothing read back."""
        assert self._req_pool_indices is not None, "begin_step first"
        meta = self.meta
        staging = None
        if self._host_tier is not None:
            staging = HostStaging(
                meta.staged,
                meta.stage_age,
                meta.host_chunk_ids,
                meta.fixed_values,
                *self._host_tier,
                k_buffer.view(-1, k_buffer.shape[-1]),
                v_buffer.view(-1, v_buffer.shape[-1]),
                meta.moves,
                chunk_size=self.shape.chunk_size,
                max_slots=self.shape.max_stage_slots,
            )
        self._retrieve(
            q_rows,
            meta.kmin,
            meta.kmax,
            meta.bound_channels,
            meta.bound_affine,
            meta.chunk_scores,
            meta.chunk_ids,
            meta.chunk_top,
            self._req_pool_indices,
            meta.slot_of_row,
            meta.row_meta,
            layer,
            self.retrieval_done,
            max_chunks=self._retrieval[0],
            max_selected=self._retrieval[1],
            staging=staging,
        )

    def attach_host_tier(self, host_k: Tensor, host_v: Tensor) -> None:
        """``compact`` storage's host tier (``[chunks, C, D]`` K and V, pinned on CUDA): every
        step then stages its host-tier rows' selected chunks on the device."""
        if self.shape.max_stage_slots <= 0:
            raise ValueError("a host tier needs max_stage_slots > 0 in the decode shape")
        self._host_tier = (host_k, host_v)

    def fill(self, layer: int, req_to_token: Tensor) -> None:
        """``layer``'s ``kv_indices`` (after :meth:`retrieve`)."""
        assert self._req_pool_indices is not None and self._seq_lens is not None
        meta = self.meta
        self._fill(
            req_to_token,
            self._req_pool_indices,
            self._seq_lens,
            meta.slot_of_row,
            meta.row_meta,
            meta.fixed_values,
            meta.chunk_top,
            self.kv_indptr[layer],
            self._indices,
            layer,
            chunk_size=self.shape.chunk_size,
        )

    def attend(
        self,
        layer: int,
        q_rows: Tensor,
        k_buffer: Tensor,
        v_buffer: Tensor,
        req_to_token: Tensor,
        sm_scale: float,
    ) -> Tensor:
        """``q_rows [B * H_kv, G, D]`` (after :meth:`retrieve`) -> ``[B * H_kv, G, D_v]``."""
        self.fill(layer, req_to_token)
        return self.attention(layer, q_rows, k_buffer, v_buffer, sm_scale)

    def attention(
        self, layer: int, q_rows: Tensor, k_buffer: Tensor, v_buffer: Tensor, sm_scale: float
    ) -> Tensor:
        """Attention over ``layer``'s filled table."""
        indptr = self.kv_indptr[layer]
        rows = q_rows.shape[0]
        dim, dim_v = k_buffer.shape[-1], v_buffer.shape[-1]
        if not self.use_triton:
            return sparse_decode_reference(
                q_rows,
                k_buffer.view(-1, dim),
                v_buffer.view(-1, dim_v),
                indptr[: rows + 1],
                self._indices,
                sm_scale,
            )
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

        out = q_rows.new_empty(rows, q_rows.shape[1], dim_v)
        decode_attention_fwd(
            q_rows,
            k_buffer.view(-1, 1, dim),
            v_buffer.view(-1, 1, dim_v),
            out,
            indptr,
            self._indices,
            self.attn_logits,
            self.attn_lse,
            self.num_kv_splits[layer],
            self.shape.max_kv_splits,
            sm_scale,
            1.0,
            1.0,
        )
        return out
