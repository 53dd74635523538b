"""Quest chunk scores over a flat, ragged list of chunks (the CUDA-graph decode path).

The padded :mod:`chunk_topk` op needs bounds as ``[R, C_max, D]``, which a CUDA graph would have
to hold at its worst case for every row. Here the chunks of all dynamic rows lie back to back in
one fixed-size buffer, each tagged with the row whose query scores it::

    score[j] = max_g sum_d max(q[row[j], g, d] * kmin[j, d], q[row[j], g, d] * kmax[j, d])

in float32; a chunk whose ``row[j]`` is outside ``[0, R)`` (the buffer's unused tail) scores
``-inf``. Output shape depends only on input shapes, so the op can be captured in a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    require_triton_device,
)

__all__ = ["ragged_chunk_scores", "ragged_chunk_scores_auto", "ragged_chunk_scores_ref"]


def _validate(op: str, q: Tensor, kmin: Tensor, kmax: Tensor, chunk_row: Tensor) -> None:
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES, layout="[R, G, D]")
    dim = q.shape[2]
    check_tensor(op, "kmin", kmin, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, dim), layout="[J, D]")
    check_tensor(op, "kmax", kmax, dtypes=(kmin.dtype,), shape=tuple(kmin.shape), layout="[J, D]")
    check_tensor(op, "chunk_row", chunk_row, ndim=1, dtypes=INDEX_DTYPES, shape=(kmin.shape[0],))
    check_same_device(op, q=q, kmin=kmin, kmax=kmax, chunk_row=chunk_row)


def ragged_chunk_scores_ref(q: Tensor, kmin: Tensor, kmax: Tensor, chunk_row: Tensor) -> Tensor:
    """Torch definition.

    Args:
        q: ``[R, G, D]`` fp16/bf16/fp32, one decode query group per row.
        kmin: ``[J, D]`` fp16/bf16/fp32, per-chunk element-wise key minimum.
        kmax: ``[J, D]`` same dtype, per-chunk element-wise key maximum.
        chunk_row: ``[J]`` int32/int64, the row scoring each chunk; outside ``[0, R)`` = unused.

    Returns:
        ``[J]`` float32 scores, ``-inf`` for unused chunks.
    """
    _validate("ragged_chunk_scores_ref", q, kmin, kmax, chunk_row)
    rows = q.shape[0]
    row = chunk_row.to(torch.int64)
    used = (row >= 0) & (row < rows)
    if rows == 0:
        return torch.full(row.shape, float("-inf"), dtype=torch.float32, device=q.device)
    qf = q.float()[row.clamp(0, rows - 1)]  # [J, G, D]
    lo = torch.minimum(kmin, kmax).float()[:, None, :]
    hi = torch.maximum(kmin, kmax).float()[:, None, :]
    scores = (qf.clamp(min=0) * hi + qf.clamp(max=0) * lo).sum(-1).amax(-1)
    return torch.where(used, scores, float("-inf"))


@triton.jit
def _ragged_chunk_scores_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    row_ptr,
    out_ptr,
    R,
    G,
    D,
    J,
    stride_qr,
    stride_qg,
    stride_qd,
    stride_lj,
    stride_ld,
    stride_hj,
    stride_hd,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    in_bounds = offs_j < J
    row = tl.load(row_ptr + offs_j, mask=in_bounds, other=-1).to(tl.int64)
    used = in_bounds & (row >= 0) & (row < R)
    safe_row = tl.where(used, row, 0)
    offs_j64 = offs_j.to(tl.int64)
    best = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    for g in range(0, G):
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = used[:, None] & (offs_d < D)[None, :]
            qv = tl.load(
                q_ptr + safe_row[:, None] * stride_qr + g * stride_qg + offs_d[None, :] * stride_qd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            lo = tl.load(
                kmin_ptr + offs_j64[:, None] * stride_lj + offs_d[None, :] * stride_ld,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            hi = tl.load(
                kmax_ptr + offs_j64[:, None] * stride_hj + offs_d[None, :] * stride_hd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tl.maximum(qv * lo, qv * hi), axis=1)
        best = tl.maximum(best, acc)
    best = tl.where(used, best, float("-inf"))
    tl.store(out_ptr + offs_j64, best, mask=in_bounds)


def ragged_chunk_scores(q: Tensor, kmin: Tensor, kmax: Tensor, chunk_row: Tensor) -> Tensor:
    """Triton version of :func:`ragged_chunk_scores_ref`; no host sync, any strides."""
    _validate("ragged_chunk_scores", q, kmin, kmax, chunk_row)
    require_triton_device("ragged_chunk_scores", q, kmin, kmax, chunk_row)
    rows, groups, dim = q.shape
    chunks = kmin.shape[0]
    out = torch.empty(chunks, dtype=torch.float32, device=q.device)
    if chunks == 0:
        return out
    block_d = min(triton.next_power_of_2(max(dim, 1)), 128)
    block_j = max(16, 4096 // block_d)
    _ragged_chunk_scores_kernel[(triton.cdiv(chunks, block_j),)](
        q,
        kmin,
        kmax,
        chunk_row,
        out,
        rows,
        groups,
        dim,
        chunks,
        *q.stride(),
        *kmin.stride(),
        *kmax.stride(),
        BLOCK_J=block_j,
        BLOCK_D=block_d,
    )
    return out


def ragged_chunk_scores_auto(q: Tensor, kmin: Tensor, kmax: Tensor, chunk_row: Tensor) -> Tensor:
    """:func:`ragged_chunk_scores` on CUDA, :func:`ragged_chunk_scores_ref` elsewhere."""
    if q.is_cuda:
        return ragged_chunk_scores(q, kmin, kmax, chunk_row)
    return ragged_chunk_scores_ref(q, kmin, kmax, chunk_row)
