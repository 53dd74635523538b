"""One decode step over the folded tables, built on the device (eager and CUDA graphs alike).

Per step, :meth:`FoldedDecode.begin_step` computes every layer's split offsets (each row's KV
splits) in one launch from SGLang's ``req_pool_indices`` and ``seq_lens`` and the per-request
metadata (:class:`~hybridkv_sglang.storage.decode_metadata.DecodeMetadata`). Per layer,
:meth:`FoldedDecode.retrieve` retrieves the dynamic rows' chunks and, with a host tier, stages
``compact`` host-tier rows' chunks into their device slots
(:mod:`hybridkv_sglang.kernels.host_staging`), in one launch; :meth:`FoldedDecode.attend`
attends, each row's entries derived from its record inside the attention kernel (no index
buffer). Nothing reads the device from the host, so the same calls run inside a captured decode
graph.

Kernels: :mod:`hybridkv_sglang.kernels.folded_attention` (SGLang's grouped Triton decode
arithmetic over the folded view ``k_buffer.view(slots * H_kv, D)``) with the table kernels of
:mod:`hybridkv_sglang.kernels.folded_tables` (``decode_kernel="triton"``, the default on GPUs),
or their torch twins (``"torch"``, the CPU path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.folded_attention import (
    folded_attention,
    folded_attention_ref,
    folded_entries_ref,
)
from hybridkv_sglang.kernels.folded_tables import (
    chunk_retrieval,
    chunk_retrieval_ref,
    folded_lengths,
    folded_lengths_ref,
    row_split_cap,
    split_capacity,
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
    max_kv_splits: int
    """Most KV splits of a row when many rows run (raised when few do: ``row_split_cap``)."""
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
        self._allocate_rows(device)
        self._lengths: Callable[..., None] = folded_lengths if use_triton else folded_lengths_ref
        self._retrieve: Callable[..., None] = chunk_retrieval if use_triton else chunk_retrieval_ref
        self._attend: Callable[..., Tensor] = (
            folded_attention if use_triton else folded_attention_ref
        )
        self._host_tier: tuple[Tensor, Tensor] | None = None
        self._req_pool_indices: Tensor | None = None
        self._seq_lens: Tensor | None = None
        self._retrieval = (shape.max_chunks, shape.max_selected)
        self._row_splits = shape.max_kv_splits

    @property
    def nbytes(self) -> int:
        """Device bytes of the step buffers: the split offsets plus the retrieval's block counters
        and the attention's split scratch."""
        scratch = (self.retrieval_done, self.partial_out, self.partial_lse)
        return self.table_bytes + sum(t.numel() * t.element_size() for t in scratch)

    def _allocate_rows(self, device: torch.device | str) -> None:
        shape = self.shape
        rows, layers = shape.max_rows, shape.num_layers
        self.split_indptr = torch.zeros(layers, rows + 1, dtype=torch.int32, device=device)
        # per row, the retrieval's finished blocks of chunks (zeros between launches)
        self.retrieval_done = torch.zeros(rows, dtype=torch.int32, device=device)
        splits = split_capacity(rows, self.target_programs) if self.use_triton else 0
        self.partial_out = torch.empty(
            splits, shape.group_size, shape.v_head_dim, dtype=torch.float32, device=device
        )
        self.partial_lse = torch.empty(splits, shape.group_size, dtype=torch.float32, device=device)

    def reserve(self, max_rows: int) -> None:
        """Grow the buffers for graph batches of ``max_rows`` rows (before any graph captures
        them)."""
        if max_rows > self.shape.max_rows:
            self.shape = dataclasses.replace(self.shape, max_rows=max_rows)
            self._allocate_rows(self.split_indptr.device)

    @property
    def table_bytes(self) -> int:
        """Bytes of the tables themselves: every layer's split offsets (a row's entries are
        derived from its record inside the attention, never stored)."""
        return self.split_indptr.numel() * self.split_indptr.element_size()

    def begin_step(
        self,
        req_pool_indices: Tensor,
        seq_lens: Tensor,
        retrieval: tuple[int, int] | None = None,
    ) -> None:
        """Every layer's split offsets for this batch (one launch).

        Eager steps pass ``retrieval``, the batch's most ``(chunks, selected chunks)`` of a
        dynamic row, as host bounds (graphs use the fixed ones, see :meth:`fits`). A row's
        split cap follows from the batch size alone (the host knows it), so a graph captures
        its own grid.
        """
        self._req_pool_indices = req_pool_indices
        self._seq_lens = seq_lens
        self._retrieval = retrieval or (self.shape.max_chunks, self.shape.max_selected)
        rows = req_pool_indices.numel() * self.shape.num_kv_heads
        self._row_splits = row_split_cap(rows, self.target_programs, self.shape.max_kv_splits)
        self._lengths(
            req_pool_indices,
            seq_lens,
            self.meta.slot_of_row,
            self.meta.row_meta,
            self.split_indptr,
            chunk_size=self.shape.chunk_size,
            max_row_splits=self._row_splits,
            target_programs=self.target_programs,
        )

    def fits(self, batch_size: int, retrieval: tuple[int, int]) -> bool:
        """Host only: whether the fixed buffers and grids hold this batch (graphs need it)."""
        chunks, selected = retrieval
        return (
            batch_size * self.shape.num_kv_heads <= self.shape.max_rows
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

    def _rows(self, req_to_token: Tensor) -> tuple[Tensor, ...]:
        """What describes this step's rows: SGLang's tables, then the records and arenas."""
        assert self._req_pool_indices is not None and self._seq_lens is not None, "begin_step"
        meta = self.meta
        return (
            req_to_token,
            self._req_pool_indices,
            self._seq_lens,
            meta.slot_of_row,
            meta.row_meta,
            meta.fixed_values,
            meta.chunk_top,
        )

    def row_entries(self, layer: int, req_to_token: Tensor) -> tuple[Tensor, Tensor]:
        """``(kv_indptr, kv_indices)``: the folded entries each row of ``layer`` reads this step
        (after :meth:`retrieve`), listed by the twin's definition; for checks, not the step."""
        rows = self._rows(req_to_token)
        return folded_entries_ref(*rows, layer, chunk_size=self.shape.chunk_size)

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
        return self._attend(
            q_rows,
            k_buffer.view(-1, k_buffer.shape[-1]),
            v_buffer.view(-1, v_buffer.shape[-1]),
            *self._rows(req_to_token),
            self.split_indptr[layer],
            self.partial_out,
            self.partial_lse,
            layer,
            sm_scale=sm_scale,
            chunk_size=self.shape.chunk_size,
            max_row_splits=self._row_splits,
        )
