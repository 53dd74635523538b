"""Chunk scoring and top-k for dynamic heads (the Quest bound).

Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML 2024).

For a row r (one (request, kv head) pair) with G query heads and chunks summarised by the
element-wise key minimum ``kmin[c]`` and maximum ``kmax[c]``, the score of chunk c is an upper
bound on the attention logit of any key in the chunk, reduced over the GQA group by max::

    score[r, c] = max_g sum_d max(q[r, g, d] * kmin[r, c, d], q[r, g, d] * kmax[r, c, d])

computed in float32; chunks ``c >= num_chunks[r]`` score ``-inf``. ``top[r]`` lists the ``k``
best chunk ids by descending score, padded with ``-1`` when the row has fewer than ``k`` valid
chunks (the valid ids always come first).

The Triton version computes the scores in one kernel (one program per (row, block of chunks));
the top-k itself is ``torch.topk`` over the scores, which is a single fused device op, needs no
host sync and is exact; a Triton top-k would only pay off fused with the index translation.
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

__all__ = ["chunk_topk", "chunk_topk_auto", "chunk_topk_ref"]

# head_dim up to this is scored from one [BLOCK_C, BLOCK_D] tile of bounds read once per block of
# chunks; larger head_dims loop over D (re-reading the bounds per query head).
_MAX_ONE_BLOCK_D = 256


def _validate(op: str, q: Tensor, kmin: Tensor, kmax: Tensor, num_chunks: Tensor, k: int) -> None:
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES, layout="[R, G, D]")
    check_tensor(op, "kmin", kmin, ndim=3, dtypes=FLOAT_DTYPES, layout="[R, C_max, D]")
    rows, _, dim = q.shape
    c_max = kmin.shape[1]
    check_tensor(op, "kmin", kmin, shape=(rows, None, dim), layout="[R, C_max, D]")
    check_tensor(op, "kmax", kmax, dtypes=(kmin.dtype,), shape=(rows, c_max, dim))
    check_tensor(op, "num_chunks", num_chunks, ndim=1, dtypes=INDEX_DTYPES, shape=(rows,))
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{op}: k: expected a non-negative int, got {k!r}")
    check_same_device(op, q=q, kmin=kmin, kmax=kmax, num_chunks=num_chunks)


def _top_from_scores(scores: Tensor, num_chunks: Tensor, k: int) -> Tensor:
    """top [R, k] int32: chunk ids by descending score, -1 beyond the row's valid chunks."""
    rows, c_max = scores.shape
    top = torch.full((rows, k), -1, dtype=torch.int32, device=scores.device)
    kk = min(k, c_max)
    if kk == 0 or rows == 0:
        return top
    _, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    n_valid = num_chunks.to(torch.int64).clamp(0, c_max)
    valid = torch.arange(kk, device=scores.device)[None, :] < n_valid[:, None]
    top[:, :kk] = torch.where(valid, idx.to(torch.int32), -1)
    return top


def chunk_topk_ref(
    q: Tensor, kmin: Tensor, kmax: Tensor, num_chunks: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Torch definition of the chunk scores and top-k.

    Args:
        q: ``[R, G, D]`` fp16/bf16/fp32, the decode queries of each row's GQA group.
        kmin: ``[R, C_max, D]`` fp16/bf16/fp32, per-chunk element-wise key minimum.
        kmax: ``[R, C_max, D]``, same dtype as ``kmin``, per-chunk element-wise key maximum.
        num_chunks: ``[R]`` int32 (int64 accepted), valid chunks of each row.
        k: chunks to select per row (``>= 0``; may exceed ``C_max``: padded with -1).

    Returns:
        scores: ``[R, C_max]`` float32, ``-inf`` for chunks ``>= num_chunks[r]``.
        top: ``[R, k]`` int32 chunk ids by descending score, ``-1`` padding at the end.
    """
    _validate("chunk_topk_ref", q, kmin, kmax, num_chunks, k)
    qf = q.float()
    lo = torch.minimum(kmin, kmax).float()
    hi = torch.maximum(kmin, kmax).float()
    # max(q_d·kmin_d, q_d·kmax_d) = q_d·hi_d where q_d >= 0, else q_d·lo_d: the bound is two
    # batched matmuls [R, G, D] @ [R, D, C] -> [R, G, C], then the max over the group.
    per_head = qf.clamp(min=0) @ hi.transpose(1, 2) + qf.clamp(max=0) @ lo.transpose(1, 2)
    scores = per_head.amax(dim=1)
    c_max = kmin.shape[1]
    cols = torch.arange(c_max, device=q.device)[None, :]
    scores = torch.where(cols < num_chunks.to(torch.int64)[:, None], scores, float("-inf"))
    return scores, _top_from_scores(scores, num_chunks, k)


@triton.jit
def _chunk_scores_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    num_chunks_ptr,
    out_ptr,
    G,
    D,
    C_max,
    stride_qr,
    stride_qg,
    stride_qd,
    stride_lr,
    stride_lc,
    stride_ld,
    stride_hr,
    stride_hc,
    stride_hd,
    stride_or,
    stride_oc,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_valid = tl.load(num_chunks_ptr + row)
    in_bounds = offs_c < C_max
    valid = in_bounds & (offs_c < n_valid)
    offs_c64 = offs_c.to(tl.int64)
    best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    q_row = q_ptr + row * stride_qr
    lo_rows = kmin_ptr + row * stride_lr + offs_c64[:, None] * stride_lc
    hi_rows = kmax_ptr + row * stride_hr + offs_c64[:, None] * stride_hc
    if ONE_D_BLOCK:
        # head_dim fits one block: read the chunk bounds once, loop over the group
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = valid[:, None] & mask_d[None, :]
        lo = tl.load(lo_rows + offs_d[None, :] * stride_ld, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(hi_rows + offs_d[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        for g in range(0, G):
            qv = tl.load(q_row + g * stride_qg + offs_d * stride_qd, mask=mask_d, other=0.0)
            qv = qv.to(tl.float32)[None, :]
            best = tl.maximum(best, tl.sum(tl.maximum(qv * lo, qv * hi), axis=1))
    else:
        for g in range(0, G):
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                mask = valid[:, None] & mask_d[None, :]
                qv = tl.load(q_row + g * stride_qg + offs_d * stride_qd, mask=mask_d, other=0.0)
                qv = qv.to(tl.float32)[None, :]
                lo = tl.load(lo_rows + offs_d[None, :] * stride_ld, mask=mask, other=0.0)
                hi = tl.load(hi_rows + offs_d[None, :] * stride_hd, mask=mask, other=0.0)
                lo = lo.to(tl.float32)
                hi = hi.to(tl.float32)
                acc += tl.sum(tl.maximum(qv * lo, qv * hi), axis=1)
            best = tl.maximum(best, acc)
    best = tl.where(valid, best, float("-inf"))
    tl.store(out_ptr + row * stride_or + offs_c64 * stride_oc, best, mask=in_bounds)


def chunk_topk(
    q: Tensor, kmin: Tensor, kmax: Tensor, num_chunks: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Triton chunk scores + ``torch.topk``; same contract as :func:`chunk_topk_ref`.

    Runs on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``). No host sync: the
    output sizes come from shapes and ``k``. Any strides are accepted.
    """
    _validate("chunk_topk", q, kmin, kmax, num_chunks, k)
    require_triton_device("chunk_topk", q, kmin, kmax, num_chunks)
    rows, groups, dim = q.shape
    c_max = kmin.shape[1]
    scores = torch.empty((rows, c_max), dtype=torch.float32, device=q.device)
    if rows > 0 and c_max > 0:
        block_d = triton.next_power_of_2(max(dim, 1))
        if block_d > _MAX_ONE_BLOCK_D:
            block_d = 128
        block_c = min(triton.next_power_of_2(c_max), max(16, 4096 // block_d))
        grid = (rows, triton.cdiv(c_max, block_c))
        _chunk_scores_kernel[grid](
            q,
            kmin,
            kmax,
            num_chunks,
            scores,
            groups,
            dim,
            c_max,
            *q.stride(),
            *kmin.stride(),
            *kmax.stride(),
            *scores.stride(),
            BLOCK_C=block_c,
            BLOCK_D=block_d,
            ONE_D_BLOCK=block_d >= dim,
        )
    return scores, _top_from_scores(scores, num_chunks, k)


def chunk_topk_auto(
    q: Tensor, kmin: Tensor, kmax: Tensor, num_chunks: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """:func:`chunk_topk` on CUDA, :func:`chunk_topk_ref` elsewhere."""
    if q.is_cuda:
        return chunk_topk(q, kmin, kmax, num_chunks, k)
    return chunk_topk_ref(q, kmin, kmax, num_chunks, k)
