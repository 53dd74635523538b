"""Folded per-head page-table indices for FlashInfer decode (page size 1).

Each batch row r is one (request, kv head) pair. In the folded view of the KV pool
(``k_buffer.view(slots * H_kv, 1, 1, D)``) entry ``slot * H_kv + h`` is head h of that slot, so
row r's indices are, in order::

    req_to_token[row_req[r], p] * num_kv_heads + row_head[r]
        for p in sel_positions[sel_indptr[r]:sel_indptr[r + 1]]     (the selection)
        then for p in range(tail_start[r], tail_end[r])              (the dense tail)

written at ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]``. Selections are *positions* in the
request's ``req_to_token`` row, never slot ids: the radix tree may re-point rows, so slots are
read at build time. ``kv_indptr`` comes from host-known lengths (:func:`kv_indptr_from_lengths`).

Indices are int32 (FlashInfer's index type): ``slots * num_kv_heads`` must stay below 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INDEX_DTYPES, check_same_device, check_tensor, require_triton_device

__all__ = [
    "build_page_table_indices",
    "build_page_table_indices_auto",
    "build_page_table_indices_ref",
    "kv_indptr_from_lengths",
]


def kv_indptr_from_lengths(sel_lengths: Tensor, tail_lengths: Tensor) -> Tensor:
    """``kv_indptr [R + 1] int32 = [0, cumsum(sel_lengths + tail_lengths)]``.

    Runs wherever its inputs live; call it on the host lengths to get the host indptr (the one
    FlashInfer's ``plan()`` needs) without a device-to-host copy. Negative tail lengths count 0.
    """
    lengths = sel_lengths.to(torch.int64) + tail_lengths.to(torch.int64).clamp(min=0)
    indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=indptr[1:])
    if indptr.numel() and int(indptr[-1]) >= 2**31:
        raise ValueError(
            f"kv_indptr_from_lengths: expected fewer than 2**31 entries in total, got "
            f"{int(indptr[-1])}"
        )
    return indptr.to(torch.int32)


def _validate(
    op: str,
    req_to_token: Tensor,
    row_req: Tensor,
    row_head: Tensor,
    sel_indptr: Tensor,
    sel_positions: Tensor,
    tail_start: Tensor,
    tail_end: Tensor,
    kv_indptr: Tensor,
    num_kv_heads: int,
) -> None:
    check_tensor(op, "req_to_token", req_to_token, ndim=2, dtypes=INDEX_DTYPES, layout="[P, ctx]")
    check_tensor(op, "row_req", row_req, ndim=1, dtypes=INDEX_DTYPES, layout="[R]")
    rows = row_req.shape[0]
    check_tensor(op, "row_head", row_head, dtypes=INDEX_DTYPES, shape=(rows,), layout="[R]")
    check_tensor(op, "sel_indptr", sel_indptr, dtypes=INDEX_DTYPES, shape=(rows + 1,))
    check_tensor(op, "sel_positions", sel_positions, ndim=1, dtypes=INDEX_DTYPES, layout="[nnz]")
    check_tensor(op, "tail_start", tail_start, dtypes=INDEX_DTYPES, shape=(rows,))
    check_tensor(op, "tail_end", tail_end, dtypes=INDEX_DTYPES, shape=(rows,))
    check_tensor(op, "kv_indptr", kv_indptr, dtypes=INDEX_DTYPES, shape=(rows + 1,))
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"{op}: num_kv_heads: expected a positive int, got {num_kv_heads!r}")
    check_same_device(
        op,
        req_to_token=req_to_token,
        row_req=row_req,
        row_head=row_head,
        sel_indptr=sel_indptr,
        sel_positions=sel_positions,
        tail_start=tail_start,
        tail_end=tail_end,
        kv_indptr=kv_indptr,
    )


def build_page_table_indices_ref(
    req_to_token: Tensor,
    row_req: Tensor,
    row_head: Tensor,
    sel_indptr: Tensor,
    sel_positions: Tensor,
    tail_start: Tensor,
    tail_end: Tensor,
    kv_indptr: Tensor,
    num_kv_heads: int,
) -> Tensor:
    """Torch definition (vectorised, no loop over rows; reads ``kv_indptr`` on the host).

    Args:
        req_to_token: ``[P, ctx]`` int32, SGLang's request-to-slot map.
        row_req: ``[R]`` int64, request pool index of each row.
        row_head: ``[R]`` int64, kv head of each row, in ``[0, num_kv_heads)``.
        sel_indptr: ``[R + 1]`` int32/int64, CSR offsets into ``sel_positions``.
        sel_positions: ``[nnz_sel]`` int32, selected positions (in the request's row).
        tail_start, tail_end: ``[R]`` int32, dense tail ``[tail_start, tail_end)`` (empty if
            ``tail_end <= tail_start``).
        kv_indptr: ``[R + 1]`` int32, ``[0, cumsum(sel_len + tail_len)]``.
        num_kv_heads: ``H_kv`` of the pool.

    Returns:
        kv_indices: ``[kv_indptr[-1]]`` int32, entries of the folded view.
    """
    op = "build_page_table_indices_ref"
    _validate(
        op, req_to_token, row_req, row_head, sel_indptr, sel_positions, tail_start, tail_end,
        kv_indptr, num_kv_heads,
    )  # fmt: skip
    device = req_to_token.device
    rows = row_req.shape[0]
    sel_indptr = sel_indptr.to(torch.int64)
    kv_indptr64 = kv_indptr.to(torch.int64)
    sel_len = sel_indptr[1:] - sel_indptr[:-1]
    tail_len = (tail_end.to(torch.int64) - tail_start.to(torch.int64)).clamp(min=0)
    if not torch.equal(kv_indptr64[1:] - kv_indptr64[:-1], sel_len + tail_len):
        raise ValueError(
            f"{op}: kv_indptr: expected row lengths sel_len + tail_len = "
            f"{(sel_len + tail_len).tolist()}, got {(kv_indptr64[1:] - kv_indptr64[:-1]).tolist()}"
        )
    out = torch.empty(int(kv_indptr64[-1]), dtype=torch.int32, device=device)
    row_ids = torch.arange(rows, device=device)
    req = row_req.to(torch.int64)
    head = row_head.to(torch.int64)

    # The selection: entries [sel_indptr[0], sel_indptr[-1]) of sel_positions.
    n_sel = int(sel_indptr[-1] - sel_indptr[0])
    sel_row = torch.repeat_interleave(row_ids, sel_len, output_size=n_sel)
    src = sel_indptr[0] + torch.arange(n_sel, device=device)
    j = src - sel_indptr[sel_row]
    pos = sel_positions[src].to(torch.int64)
    slots = req_to_token[req[sel_row], pos].to(torch.int64)
    out[kv_indptr64[sel_row] + j] = (slots * num_kv_heads + head[sel_row]).to(torch.int32)

    # The dense tail.
    n_tail = int(tail_len.sum())
    tail_row = torch.repeat_interleave(row_ids, tail_len, output_size=n_tail)
    tail_off = torch.cumsum(tail_len, 0) - tail_len
    j = torch.arange(n_tail, device=device) - tail_off[tail_row]
    pos = tail_start.to(torch.int64)[tail_row] + j
    slots = req_to_token[req[tail_row], pos].to(torch.int64)
    dst = kv_indptr64[tail_row] + sel_len[tail_row] + j
    out[dst] = (slots * num_kv_heads + head[tail_row]).to(torch.int32)
    return out


@triton.jit
def _page_table_indices_kernel(
    req_to_token_ptr,
    row_req_ptr,
    row_head_ptr,
    sel_indptr_ptr,
    sel_positions_ptr,
    tail_start_ptr,
    tail_end_ptr,
    kv_indptr_ptr,
    out_ptr,
    stride_req,
    stride_pos,
    num_kv_heads,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    req = tl.load(row_req_ptr + row).to(tl.int64)
    head = tl.load(row_head_ptr + row).to(tl.int64)
    sel_lo = tl.load(sel_indptr_ptr + row).to(tl.int64)
    sel_hi = tl.load(sel_indptr_ptr + row + 1).to(tl.int64)
    t_lo = tl.load(tail_start_ptr + row).to(tl.int64)
    t_hi = tl.load(tail_end_ptr + row).to(tl.int64)
    dst = tl.load(kv_indptr_ptr + row).to(tl.int64)
    base = req_to_token_ptr + req * stride_req
    n_sel = (sel_hi - sel_lo).to(tl.int32)  # row lengths stay below 2**31
    for i in range(0, n_sel, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n_sel
        pos = tl.load(sel_positions_ptr + sel_lo + offs, mask=mask, other=0).to(tl.int64)
        slot = tl.load(base + pos * stride_pos, mask=mask, other=0).to(tl.int64)
        tl.store(out_ptr + dst + offs, (slot * num_kv_heads + head).to(tl.int32), mask=mask)
    dst += n_sel
    n_tail = (t_hi - t_lo).to(tl.int32)
    for i in range(0, n_tail, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n_tail
        slot = tl.load(base + (t_lo + offs) * stride_pos, mask=mask, other=0).to(tl.int64)
        tl.store(out_ptr + dst + offs, (slot * num_kv_heads + head).to(tl.int32), mask=mask)


def build_page_table_indices(
    req_to_token: Tensor,
    row_req: Tensor,
    row_head: Tensor,
    sel_indptr: Tensor,
    sel_positions: Tensor,
    tail_start: Tensor,
    tail_end: Tensor,
    kv_indptr: Tensor,
    num_kv_heads: int,
    *,
    out: Tensor | None = None,
    block: int = 256,
) -> Tensor:
    """Triton version of :func:`build_page_table_indices_ref` (one program per row).

    Trusts ``kv_indptr`` (no value checks: that would sync). Pass ``out`` (int32, at least
    ``kv_indptr[-1]`` long, e.g. a CUDA-graph buffer) to avoid the one host read of
    ``kv_indptr[-1]`` that sizing the output otherwise needs; ``out`` is returned.
    """
    op = "build_page_table_indices"
    _validate(
        op, req_to_token, row_req, row_head, sel_indptr, sel_positions, tail_start, tail_end,
        kv_indptr, num_kv_heads,
    )  # fmt: skip
    require_triton_device(op, req_to_token, row_req, sel_positions, kv_indptr)
    rows = row_req.shape[0]
    if out is None:
        out = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=req_to_token.device)
    else:
        check_tensor(op, "out", out, ndim=1, dtypes=(torch.int32,), layout="[>= nnz]")
        check_same_device(op, out=out, req_to_token=req_to_token)
    if rows == 0:
        return out
    _page_table_indices_kernel[(rows,)](
        req_to_token,
        row_req,
        row_head,
        sel_indptr,
        sel_positions,
        tail_start,
        tail_end,
        kv_indptr,
        out,
        req_to_token.stride(0),
        req_to_token.stride(1),
        num_kv_heads,
        BLOCK=block,
    )
    return out


def build_page_table_indices_auto(
    req_to_token: Tensor,
    row_req: Tensor,
    row_head: Tensor,
    sel_indptr: Tensor,
    sel_positions: Tensor,
    tail_start: Tensor,
    tail_end: Tensor,
    kv_indptr: Tensor,
    num_kv_heads: int,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`build_page_table_indices` on CUDA, the ref elsewhere (copied into ``out``)."""
    args = (
        req_to_token, row_req, row_head, sel_indptr, sel_positions, tail_start, tail_end,
        kv_indptr, num_kv_heads,
    )  # fmt: skip
    if req_to_token.is_cuda:
        return build_page_table_indices(*args, out=out)
    result = build_page_table_indices_ref(*args)
    if out is None:
        return result
    out[: result.numel()].copy_(result)
    return out
