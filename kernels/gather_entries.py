"""Gather kept KV into compact entries (folded view), for the ``compact`` storage mode.

In the folded view a KV buffer ``[slots, H_kv, D]`` is ``[slots * H_kv, D]``: entry
``slot * H_kv + h`` is head h of that slot. The copy is::

    dst_k[dst_idx[i]] = src_k[src_idx[i]];  dst_v[dst_idx[i]] = src_v[src_idx[i]]

``src`` and ``dst`` may be the same buffer when the index sets are disjoint. Duplicate
``dst_idx`` entries leave an unspecified winner (as with torch index assignment).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_tensor,
    require_triton_device,
)

__all__ = ["gather_entries", "gather_entries_auto", "gather_entries_ref"]

_KV_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)


def _validate(
    op: str,
    src_k: Tensor,
    src_v: Tensor,
    dst_k: Tensor,
    dst_v: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
) -> None:
    check_tensor(op, "src_k", src_k, ndim=2, dtypes=_KV_DTYPES, layout="[E, D]")
    entries, dim = src_k.shape
    check_tensor(op, "src_v", src_v, ndim=2, dtypes=_KV_DTYPES, shape=(entries, None))
    dim_v = src_v.shape[1]
    check_tensor(op, "dst_k", dst_k, ndim=2, dtypes=(src_k.dtype,), shape=(None, dim))
    check_tensor(op, "dst_v", dst_v, dtypes=(src_v.dtype,), shape=(dst_k.shape[0], dim_v))
    check_tensor(op, "src_idx", src_idx, ndim=1, dtypes=INDEX_DTYPES, layout="[n]")
    check_tensor(op, "dst_idx", dst_idx, dtypes=INDEX_DTYPES, shape=(src_idx.shape[0],))
    check_same_device(
        op, src_k=src_k, src_v=src_v, dst_k=dst_k, dst_v=dst_v, src_idx=src_idx, dst_idx=dst_idx
    )


def gather_entries_ref(
    src_k: Tensor,
    src_v: Tensor,
    dst_k: Tensor,
    dst_v: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
) -> None:
    """Torch definition: ``dst_k[dst_idx] = src_k[src_idx]``, same for v (in place).

    Args:
        src_k: ``[E, D]`` KV dtype, the folded source keys; ``src_v``: ``[E, D_v]``.
        dst_k: ``[E2, D]`` same dtype as ``src_k``; ``dst_v``: ``[E2, D_v]``.
        src_idx, dst_idx: ``[n]`` int64 (int32 accepted), entry ids.
    """
    _validate("gather_entries_ref", src_k, src_v, dst_k, dst_v, src_idx, dst_idx)
    dst_k[dst_idx] = src_k[src_idx]
    dst_v[dst_idx] = src_v[src_idx]


@triton.jit
def _gather_entries_kernel(
    src_ptr,
    dst_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    n,
    D,
    stride_src,
    stride_dst,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    si = tl.load(src_idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    di = tl.load(dst_idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d < D)[None, :]
        x = tl.load(src_ptr + si[:, None] * stride_src + offs_d[None, :], mask=mask)
        tl.store(dst_ptr + di[:, None] * stride_dst + offs_d[None, :], x, mask=mask)


def _launch(src: Tensor, dst: Tensor, src_idx: Tensor, dst_idx: Tensor) -> None:
    n, dim = src_idx.shape[0], src.shape[1]
    if n == 0 or dim == 0:
        return
    # fp8 / uint8 are moved as raw bytes: the copy does not care about the value type.
    if src.element_size() == 1:
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    block_d = min(triton.next_power_of_2(dim), 256)
    block_n = max(1, min(64, 4096 // block_d))
    _gather_entries_kernel[(triton.cdiv(n, block_n),)](
        src,
        dst,
        src_idx,
        dst_idx,
        n,
        dim,
        src.stride(0),
        dst.stride(0),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )


def gather_entries(
    src_k: Tensor,
    src_v: Tensor,
    dst_k: Tensor,
    dst_v: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
) -> None:
    """Triton version of :func:`gather_entries_ref`; rows may be strided, the last dim must be
    contiguous (true of folded views of SGLang's ``k_buffer``/``v_buffer``)."""
    op = "gather_entries"
    _validate(op, src_k, src_v, dst_k, dst_v, src_idx, dst_idx)
    require_triton_device(op, src_k, src_v, dst_k, dst_v, src_idx, dst_idx)
    for name, t in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
        check_last_dim_contiguous(op, name, t)
    _launch(src_k, dst_k, src_idx, dst_idx)
    _launch(src_v, dst_v, src_idx, dst_idx)


def gather_entries_auto(
    src_k: Tensor,
    src_v: Tensor,
    dst_k: Tensor,
    dst_v: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
) -> None:
    """:func:`gather_entries` on CUDA, :func:`gather_entries_ref` elsewhere."""
    fn = gather_entries if src_k.is_cuda else gather_entries_ref
    fn(src_k, src_v, dst_k, dst_v, src_idx, dst_idx)
