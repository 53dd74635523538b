"""Compressed decode under SGLang's decode CUDA graphs.

SGLang captures one decode graph per batch size and, before each replay, calls the backend's
``init_forward_metadata_out_graph`` with a padded view of the batch that carries no request
ids. So:

- an AFTER hook on ``ForwardBatch.init_new`` records each decode batch's rids and pool rows,
  keyed by the identity of its ``out_cache_loc`` tensor, which the replay view shares
  (:class:`DecodeBatchRecords`);
- before a replay, :meth:`GraphDecode.stage` writes every layer's table into fixed buffers
  (:mod:`hybridkv_sglang.storage.static_decode`) and plans one FlashInfer wrapper per layer,
  whose index buffers *are* those fixed buffers;
- inside the graph, :meth:`GraphDecode.attend` fills the retrieved chunks (fixed top-k) and
  runs the layer's wrapper over the fixed row count (rows past the batch read one dummy entry);
- an AFTER hook on the runner's ``can_run_graph`` sends a batch the buffers cannot serve to
  the eager path (counted as ``graph_fallback_*``).

On CPU the same tables are used eagerly (``static_tables_eager``), with the torch reference
attention, so the graph path's semantics are tested through real servers.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybridkv_sglang.attention.sparse_decode import FlashInferFoldedDecode, sparse_decode_reference
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from hybridkv_sglang.storage.static_decode import (
    StaticDecodeTables,
    StaticTableLimits,
    static_table_misfit,
)

logger = logging.getLogger(__name__)

_MAX_RECORDS = 64


@dataclass(frozen=True)
class DecodeBatchRecord:
    """The requests of one decode batch, in batch order."""

    out_cache_loc: Tensor
    rids: tuple[str, ...]
    req_pool_indices: tuple[int, ...]
    seq_lens: tuple[int, ...]


class DecodeBatchRecords:
    """Decode batches by the identity of their ``out_cache_loc`` (held, so ids are not reused)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loc: OrderedDict[int, DecodeBatchRecord] = OrderedDict()

    def add(self, record: DecodeBatchRecord) -> None:
        with self._lock:
            self._by_loc[id(record.out_cache_loc)] = record
            while len(self._by_loc) > _MAX_RECORDS:
                self._by_loc.popitem(last=False)

    def find(self, out_cache_loc: Tensor | None) -> DecodeBatchRecord | None:
        if out_cache_loc is None:
            return None
        with self._lock:
            record = self._by_loc.get(id(out_cache_loc))
        if record is None or record.out_cache_loc is not out_cache_loc:
            return None
        return record


DECODE_BATCHES = DecodeBatchRecords()


def record_decode_batch(forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``ForwardBatch.init_new``: remember a decode batch's requests."""
    if forward_batch is None or not forward_batch.forward_mode.is_decode():
        return forward_batch
    rids, loc, lens = forward_batch.rids, forward_batch.out_cache_loc, forward_batch.seq_lens_cpu
    if rids is None or loc is None or lens is None:
        return forward_batch
    rows = forward_batch.req_pool_indices_cpu
    if rows is None:
        rows = forward_batch.req_pool_indices.cpu()
    DECODE_BATCHES.add(
        DecodeBatchRecord(loc, tuple(rids), tuple(rows.tolist()), tuple(lens.tolist()))
    )
    return forward_batch


class GraphDecode:
    """Fixed-buffer tables plus one FlashInfer wrapper per layer (CUDA) for every decode step."""

    def __init__(
        self,
        tables: StaticDecodeTables,
        group_size: int,
        head_dim: int,
        q_dtype: torch.dtype,
    ) -> None:
        self.tables = tables
        self.group_size = group_size
        self.head_dim = head_dim
        self.q_dtype = q_dtype
        self.wrappers: list[FlashInferFoldedDecode] = []
        self._q: Tensor | None = None
        if tables.device.type == "cuda":
            workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=tables.device)
            rows = tables.limits.max_rows
            self._q = torch.zeros(rows, group_size, head_dim, dtype=q_dtype, device=tables.device)
            self.wrappers = [
                FlashInferFoldedDecode(
                    group_size,
                    head_dim,
                    tables.device,
                    workspace_buffer=workspace,
                    graph_buffers=(
                        tables.kv_indptr[layer],
                        tables.kv_indices[layer],
                        tables.kv_last_page_len,
                    ),
                )
                for layer in range(tables.num_layers)
            ]

    def misfit(self, batch: DecodeBatchLayout) -> str | None:
        """Why this batch must decode eagerly, or ``None``."""
        return static_table_misfit(batch, self.tables.limits)

    def stage(self, batch: DecodeBatchLayout, req_to_token: Tensor, kv_dtype: torch.dtype) -> None:
        """Host side, outside any graph: tables into the buffers, one plan per layer."""
        self.tables.stage(batch, req_to_token)
        for layer, wrapper in enumerate(self.wrappers):
            wrapper.plan_rows(
                self.tables.kv_indptr_host[layer],
                self.tables.kv_indices[layer],
                q_dtype=self.q_dtype,
                kv_dtype=kv_dtype,
            )

    def attend(
        self,
        layer: int,
        q: Tensor,
        k_buffer: Tensor,
        v_buffer: Tensor,
        req_to_token: Tensor,
        sm_scale: float,
    ) -> Tensor:
        """Device only (graph-safe): ``q [rows, G, D]`` -> ``[rows, G, D_v]``."""
        self.tables.fill_chunks(layer, q, req_to_token)
        if not self.wrappers:
            table = self.tables.layer_table(layer)
            return sparse_decode_reference(
                q,
                k_buffer.view(-1, k_buffer.shape[-1]),
                v_buffer.view(-1, v_buffer.shape[-1]),
                table.kv_indptr,
                table.kv_indices,
                sm_scale,
            )
        assert self._q is not None
        rows = q.shape[0]
        self._q[:rows].copy_(q)
        out = self.wrappers[layer].run(self._q, k_buffer, v_buffer, sm_scale=sm_scale)
        return out[:rows]


def graph_limits(
    max_bs: int,
    num_kv_heads: int,
    max_context_len: int,
    chunk_size: int,
    top_k: int,
    table_entries: int,
    bound_chunks: int,
) -> StaticTableLimits:
    """Buffer sizes for batches of up to ``max_bs`` requests."""
    return StaticTableLimits(
        max_rows=max_bs * num_kv_heads,
        max_entries=table_entries,
        max_bound_chunks=bound_chunks,
        max_row_chunks=max(1, -(-max_context_len // chunk_size)),
        top_k=top_k,
        chunk_size=chunk_size,
    )


def limit_graph_to_fit(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``DecodeCudaGraphRunner.can_run_graph``: eager when the buffers cannot
    serve the batch (the backend says why; other backends are left alone)."""
    forward_batch = args[0] if args else kwargs.get("forward_batch")
    check = getattr(type(getattr(runner, "attn_backend", None)), "graph_misfit", None)
    if not result or check is None or forward_batch is None:
        return result
    return check(runner.attn_backend, forward_batch) is None
