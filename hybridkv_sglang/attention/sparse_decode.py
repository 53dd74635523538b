"""Sparse decode attention over folded per-head page tables.

One decode query per row; row r = one (request, kv head) pair whose ``G`` query heads (the GQA
group) attend over the entries ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]`` of the folded KV
view ``[slots * H_kv, D]`` (page size 1, one kv head per page). This is FlashInfer's
``BatchDecodeWithPagedKVCacheWrapper`` with ``num_qo_heads=G, num_kv_heads=1, page_size=1``.

- :func:`sparse_decode_reference`: pure torch, the definition (any device).
- :class:`FlashInferFoldedDecode`: the CUDA path through FlashInfer (imported lazily).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hybridkv_sglang.storage.page_tables import FoldedPageTable

__all__ = ["FlashInferFoldedDecode", "sparse_decode_reference"]

# Group sizes FlashInfer's CUDA-core decode kernels are compiled for; others need tensor cores.
CUDA_CORE_GROUP_SIZES = frozenset({1, 2, 3, 4, 6, 8, 16})


def _check_inputs(
    q: Tensor, k_entries: Tensor, v_entries: Tensor, kv_indptr: Tensor, kv_indices: Tensor
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [R, G, D], got shape {tuple(q.shape)}")
    rows, _, dim = q.shape
    if k_entries.dim() != 2 or k_entries.shape[1] != dim:
        raise ValueError(f"k_entries: expected shape (*, {dim}), got {tuple(k_entries.shape)}")
    if v_entries.dim() != 2 or v_entries.shape[0] != k_entries.shape[0]:
        raise ValueError(
            f"v_entries: expected shape ({k_entries.shape[0]}, *), got {tuple(v_entries.shape)}"
        )
    if kv_indptr.shape != (rows + 1,):
        raise ValueError(f"kv_indptr: expected shape ({rows + 1},), got {tuple(kv_indptr.shape)}")
    if kv_indices.dim() != 1:
        raise ValueError(f"kv_indices: expected a 1-D tensor, got shape {tuple(kv_indices.shape)}")
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected dtype int32, got {t.dtype}")


def sparse_decode_reference(
    q: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
) -> Tensor:
    """Paged decode attention with page size 1: one small GEMM pair per row.

    Rows are few (requests × kv heads) and long, so a loop over rows with dense per-row matmuls
    is both the plainest statement of the semantics and the fastest CPU path (a vectorised
    segment softmax materialises ``[nnz, G, D]`` products).

    ``out[r, g] = softmax_j(sm_scale * q[r, g] · K[e_j]) @ V[e_j]`` over the row's entries
    ``e_j = kv_indices[kv_indptr[r] + j]``. Computed in float32. Rows with no entries (undefined
    in FlashInfer) give zeros.

    Args:
        q: ``[R, G, D]`` fp16/bf16/fp32, one decode query per row, G query heads.
        k_entries: ``[E, D]`` keys of the folded view (``k_buffer[l].view(-1, D)``).
        v_entries: ``[E, D_v]`` values, same entry numbering.
        kv_indptr: ``[R + 1]`` int32 device.
        kv_indices: ``[>= kv_indptr[-1]]`` int32 entries (extra trailing entries are ignored).
        sm_scale: softmax scale, normally ``1 / sqrt(D)``.

    Returns:
        ``[R, G, D_v]`` in ``q.dtype``.
    """
    _check_inputs(q, k_entries, v_entries, kv_indptr, kv_indices)
    rows, groups, _ = q.shape
    out = torch.zeros(rows, groups, v_entries.shape[1], dtype=torch.float32, device=q.device)
    bounds = kv_indptr.tolist()  # the reference may read the offsets on the host
    qf = q.float()
    for r in range(rows):
        if bounds[r + 1] == bounds[r]:
            continue
        entries = kv_indices[bounds[r] : bounds[r + 1]].to(torch.int64)
        weights = torch.softmax((qf[r] @ k_entries[entries].float().T) * sm_scale, dim=-1)
        out[r] = weights @ v_entries[entries].float()
    return out.to(q.dtype)


class FlashInferFoldedDecode:
    """One FlashInfer batch-decode wrapper serving every (request, kv head) row of a step.

    Plan on the host (``plan(table, ...)``: uses ``table.kv_indptr_host`` and host last-page
    lengths, so no device-to-host copy), then ``run`` with ``q [R, G, D]``
    (``q.view(B * H_kv, G, D)``) and the layer's ``k_buffer`` / ``v_buffer``
    ``[slots, H_kv, D]``, viewed as ``[slots * H_kv, 1, 1, D]`` pages of one token, one head.
    ``use_tensor_cores`` is forced on for group sizes FlashInfer's CUDA-core decode lacks
    (e.g. Qwen2.5-VL-7B's G = 7).

    With ``graph_buffers=(kv_indptr [R + 1], kv_indices [E], kv_last_page_len [R])`` (int32
    device) the wrapper is FlashInfer's CUDA-graph form: it reads its table from those fixed
    buffers, always over ``R`` rows, and ``run`` may be captured; plan before every replay.
    """

    def __init__(
        self,
        group_size: int,
        head_dim: int,
        device: torch.device | str = "cuda",
        *,
        workspace_buffer: Tensor | None = None,
        workspace_bytes: int = 128 * 1024 * 1024,
        use_tensor_cores: bool | None = None,
        graph_buffers: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        import flashinfer  # lazy: CUDA-only at run time

        self.group_size = group_size
        self.head_dim = head_dim
        if use_tensor_cores is None:
            use_tensor_cores = group_size not in CUDA_CORE_GROUP_SIZES
        elif not use_tensor_cores and group_size not in CUDA_CORE_GROUP_SIZES:
            raise ValueError(
                f"use_tensor_cores=False: FlashInfer's CUDA-core decode supports group sizes "
                f"{sorted(CUDA_CORE_GROUP_SIZES)}, got {group_size}; leave use_tensor_cores=None"
            )
        self.use_tensor_cores = use_tensor_cores
        if workspace_buffer is None:
            workspace_buffer = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        graph: dict[str, Any] = {}
        if graph_buffers is not None:
            indptr, indices, last_page_len = graph_buffers
            graph = {
                "use_cuda_graph": True,
                "paged_kv_indptr_buffer": indptr,
                "paged_kv_indices_buffer": indices,
                "paged_kv_last_page_len_buffer": last_page_len,
            }
        self.graph_rows = None if graph_buffers is None else graph_buffers[2].numel()
        self.wrapper: Any = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace_buffer, "NHD", use_tensor_cores=use_tensor_cores, **graph
        )
        self._planned_rows: int | None = None
        self._planned_key: tuple[Tensor, torch.dtype, torch.dtype, float] | None = None

    def plan(
        self,
        table: FoldedPageTable,
        *,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        sm_scale: float | None = None,
    ) -> bool:
        """Plan one layer's table (host work; outside CUDA-graph capture).

        FlashInfer's plan depends only on the row lengths (the host indptr) and dtypes, so a
        table with the same lengths as the last plan (another layer of the same step, e.g. every
        layer of a batch of dense or all-dynamic rows) reuses it: only the table's device tensors
        are rebound, as ``plan`` itself binds them. Returns whether a plan ran.
        """
        scale = 1.0 / math.sqrt(self.head_dim) if sm_scale is None else sm_scale
        key = self._planned_key
        if (
            self.graph_rows is None
            and key is not None
            and key[1:] == (q_dtype, kv_dtype, scale)
            and torch.equal(key[0], table.kv_indptr_host)
        ):
            self.wrapper._paged_kv_indptr_buf = table.kv_indptr
            self.wrapper._paged_kv_indices_buf = table.kv_indices
            return False
        self.plan_rows(
            table.kv_indptr_host,  # host: plan reads it without a device-to-host copy
            table.kv_indices,
            q_dtype=q_dtype,
            kv_dtype=kv_dtype,
            sm_scale=scale,
        )
        self._planned_key = (table.kv_indptr_host.clone(), q_dtype, kv_dtype, scale)
        return True

    def plan_rows(
        self,
        kv_indptr_host: Tensor,
        kv_indices: Tensor,
        *,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        sm_scale: float | None = None,
    ) -> None:
        """Plan from a host ``indptr [R + 1]`` and device ``indices`` (at least ``indptr[-1]``)."""
        rows = kv_indptr_host.numel() - 1
        if self.graph_rows is not None and rows != self.graph_rows:
            raise ValueError(
                f"plan_rows: a CUDA-graph wrapper serves {self.graph_rows} rows, got {rows}"
            )
        if sm_scale is None:
            sm_scale = 1.0 / math.sqrt(self.head_dim)
        self.wrapper.plan(
            kv_indptr_host,
            kv_indices[: int(kv_indptr_host[-1])],
            torch.ones(rows, dtype=torch.int32),  # host last-page lengths, page size 1
            self.group_size,  # num_qo_heads
            1,  # num_kv_heads
            self.head_dim,
            1,  # page_size
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
            sm_scale=sm_scale,
        )
        self._planned_rows = rows

    def run(
        self, q: Tensor, k_buffer: Tensor, v_buffer: Tensor, sm_scale: float | None = None
    ) -> Tensor:
        """Attend.

        Args:
            q: ``[R, G, D]`` (R = requests × H_kv, request-major), the planned rows.
            k_buffer, v_buffer: ``[slots, H_kv, D]`` one layer of SGLang's KV pool.
            sm_scale: overrides the planned scale (one plan serving layers that differ).

        Returns:
            ``[R, G, D]`` in ``q.dtype``.
        """
        if self._planned_rows is None:
            raise RuntimeError("FlashInferFoldedDecode.run: call plan() first")
        if q.dim() != 3 or q.shape[0] != self._planned_rows or q.shape[1] != self.group_size:
            raise ValueError(
                f"q: expected shape ({self._planned_rows}, {self.group_size}, {self.head_dim}), "
                f"got {tuple(q.shape)}"
            )
        d = k_buffer.shape[-1]
        k_pages = k_buffer.view(-1, 1, 1, d)
        v_pages = v_buffer.view(-1, 1, 1, v_buffer.shape[-1])
        if sm_scale is None:
            return self.wrapper.run(q, (k_pages, v_pages))
        # ``forward`` sets the scale, then runs (SGLang's FlashInfer backend calls it the same way)
        return self.wrapper.forward(q, (k_pages, v_pages), sm_scale=sm_scale)
