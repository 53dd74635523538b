"""Sparse decode attention over folded per-head tables: the pure-torch definition.

One decode query per row; row r = one (request, kv head) pair whose ``G`` query heads (the GQA
group) attend over the entries ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]`` of the folded KV
view ``[slots * H_kv, D]`` (one kv head per entry). :func:`sparse_decode_reference` is the CPU
attention of :class:`~hybridkv_sglang.attention.folded_decode.FoldedDecode` (``use_triton=False``)
and the reference its GPU path (SGLang's Triton ``decode_attention_fwd`` over the same table)
is checked against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sparse_decode_reference"]


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
            raise ValueError(f"{name}: expected dtype int32 or int64, got {t.dtype}")


def sparse_decode_reference(
    q: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
) -> Tensor:
    """Decode attention over per-row entry lists: one small GEMM pair per row.

    Rows are few (requests × kv heads) and long, so a loop over rows with dense per-row matmuls
    is both the plainest statement of the semantics and the fastest CPU path (a vectorised
    segment softmax materialises ``[nnz, G, D]`` products).

    ``out[r, g] = softmax_j(sm_scale * q[r, g] · K[e_j]) @ V[e_j]`` over the row's entries
    ``e_j = kv_indices[kv_indptr[r] + j]``. Computed in float32. Rows with no entries give zeros.

    Args:
        q: ``[R, G, D]`` fp16/bf16/fp32, one decode query per row, G query heads.
        k_entries: ``[E, D]`` keys of the folded view (``k_buffer[l].view(-1, D)``).
        v_entries: ``[E, D_v]`` values, same entry numbering.
        kv_indptr: ``[R + 1]`` int32 or int64 (read on the host).
        kv_indices: ``[>= kv_indptr[-1]]`` int32 or int64 entries (extra trailing entries are
            ignored: the step's buffer is sized for the largest table).
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
