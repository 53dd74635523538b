"""Decode attention over the folded tables, each row's entries derived inside the kernel.

A decode step's table of layer ``l`` has one row per (request, kv head), request-major, and what
a row reads is described by its record in ``row_meta`` (see
:mod:`hybridkv_sglang.kernels.folded_tables`): ``PRE_LEN`` fixed values, ``NUM_SEL`` retrieved
chunks of ``C`` entries, ``POST_LEN`` fixed values, then the dense tail ``[TAIL_START, seq_len)``.
Instead of writing those entries into an index buffer that the attention then reads back (one
more launch per layer and ``B x context`` int64 of buffer), the attention derives the folded
entry of each position ``j`` of its row from the record, the ``fixed_values`` arena, the row's
``chunk_top`` and SGLang's ``req_to_token`` as it loads the keys: that is the index fill folded
into the attention's first stage.

Two launches per layer:

- **stage 1**, one program per (row, split): the row's splits are ``split_indptr[r + 1] -
  split_indptr[r]`` (written per step by
  :func:`~hybridkv_sglang.kernels.folded_tables.folded_lengths` from each row's length and the
  batch's rows: long static rows many, short dynamic rows few);
  split ``s`` covers positions ``[s * P, min((s + 1) * P, length))`` with ``P`` the row's length
  over its splits rounded up to :data:`MIN_BLOCK_KV`. A row of one split writes its output
  directly; a split of a longer row writes its partial output and log-sum-exp at scratch slot
  ``split_indptr[r] + s``, so scratch is sized by the splits a step can hold in all, never by
  rows × the largest split count;
- **stage 2**, one program per (row, query head): merges the partials of rows with two or more
  splits; rows of one split exit at once.

The arithmetic is SGLang's grouped Triton decode kernel's (``_fwd_grouped_kernel_stage1`` /
``_fwd_kernel_stage2``): queries cast to the KV dtype for ``q . k``, float32 online softmax,
probabilities cast to the V dtype for ``p . v``, float32 merge. Triton's interpreter computes
bfloat16 dots wrongly, so there (``TRITON_INTERPRET=1``) the rounded bfloat16 operands are
widened to float32 first: their products are exact either way, only the accumulation order
differs.

Torch twin: :func:`folded_attention_ref` lists each row's entries with
:func:`folded_entries_ref` (the definition of a row) and attends with
:func:`~hybridkv_sglang.kernels.sparse_decode.sparse_decode_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpret_enabled, require_triton_device
from .folded_tables import (
    CHUNK_BASE,
    DIRECT,
    FIRST_CHUNK,
    FIXED_START,
    NF,
    NUM_SEL,
    POST_LEN,
    POST_START,
    PRE_LEN,
    TAIL_START,
    TOP_START,
    _batch_rows,
    _row_lengths,
    _row_record,
)
from .sparse_decode import sparse_decode_reference

__all__ = [
    "BLOCK_N",
    "MIN_BLOCK_KV",
    "folded_attention",
    "folded_attention_ref",
    "folded_entries_ref",
]

MIN_BLOCK_KV = 32
"""A split's length is a multiple of this (SGLang's ``_MIN_BLOCK_KV``)."""

BLOCK_N = 32
"""Entries a stage-1 program loads per iteration (SGLang's grouped kernel's ``BLOCK``)."""

_FIXED_START = tl.constexpr(FIXED_START)
_PRE_LEN = tl.constexpr(PRE_LEN)
_POST_START = tl.constexpr(POST_START)
_POST_LEN = tl.constexpr(POST_LEN)
_TAIL_START = tl.constexpr(TAIL_START)
_NUM_SEL = tl.constexpr(NUM_SEL)
_FIRST_CHUNK = tl.constexpr(FIRST_CHUNK)
_CHUNK_BASE = tl.constexpr(CHUNK_BASE)
_DIRECT = tl.constexpr(DIRECT)
_TOP_START = tl.constexpr(TOP_START)


@triton.jit
def _entries(
    j,
    in_range,
    tokens,
    fixed_ptr,
    top_ptr,
    h,
    fstart,
    pre,
    pstart,
    end_chunks,
    end_post,
    tail,
    first,
    tstart,
    cbase,
    direct,
    H: tl.constexpr,
    C: tl.constexpr,
):
    """Folded entries of positions ``j`` of one row (positions outside ``in_range``: 0)."""
    is_direct = (j * 0 + direct) != 0  # a vector: the interpreter masks with vectors only
    is_pre = j < pre
    is_chunk = (j >= pre) & (j < end_chunks)
    is_post = (j >= end_chunks) & (j < end_post)
    is_tail = (j >= end_post) & in_range
    jc = tl.maximum(j - pre, 0)
    c = tl.load(top_ptr + tstart + jc // C, mask=is_chunk & in_range, other=0).to(tl.int64)
    chunk_v = (first + c) * C + jc % C
    pre_v = tl.load(fixed_ptr + fstart + j, mask=is_pre & in_range, other=0).to(tl.int64)
    post_v = tl.load(fixed_ptr + pstart + j - end_chunks, mask=is_post & in_range, other=0)
    position = tl.where(is_pre, pre_v, tl.where(is_chunk, chunk_v, tail + j - end_post))
    positional = (is_tail | ((is_pre | is_chunk) & ~is_direct)) & in_range
    slot_v = tl.load(tokens + position, mask=positional, other=0).to(tl.int64)
    direct_chunk = tl.load(
        fixed_ptr + cbase + chunk_v, mask=is_chunk & is_direct & in_range, other=0
    ).to(tl.int64)
    entry = tl.where(is_post, post_v.to(tl.int64), tl.where(is_chunk, direct_chunk, pre_v))
    entry = tl.where(positional, slot_v * H + h, entry)
    return tl.where(in_range, entry, 0)


@triton.jit
def _folded_attention_stage1(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    req_to_token_ptr,
    req_pool_ptr,
    seq_lens_ptr,
    slot_of_row_ptr,
    meta_ptr,
    fixed_ptr,
    top_ptr,
    split_indptr_ptr,
    layer,
    num_layers,
    groups,
    sm_scale,
    stride_rt,
    stride_qr,
    stride_qg,
    stride_k,
    stride_v,
    stride_or,
    stride_og,
    stride_pr,
    stride_pg,
    stride_lr,
    H: tl.constexpr,
    NF_: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,
    MIN_BLOCK: tl.constexpr,
    EXACT_DOTS: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    first_split = tl.load(split_indptr_ptr + r)
    splits = tl.load(split_indptr_ptr + r + 1) - first_split
    if s < splits:
        h = r % H
        pool = tl.load(req_pool_ptr + r // H).to(tl.int64)
        seq = tl.load(seq_lens_ptr + r // H).to(tl.int64)
        slot, base = _row_record(
            req_pool_ptr, slot_of_row_ptr, meta_ptr, r, layer, num_layers, H, NF_
        )
        comp = slot >= 0
        fstart = tl.load(meta_ptr + base + _FIXED_START, mask=comp, other=0).to(tl.int64)
        pre = tl.load(meta_ptr + base + _PRE_LEN, mask=comp, other=0).to(tl.int64)
        pstart = tl.load(meta_ptr + base + _POST_START, mask=comp, other=0).to(tl.int64)
        post = tl.load(meta_ptr + base + _POST_LEN, mask=comp, other=0).to(tl.int64)
        tail = tl.load(meta_ptr + base + _TAIL_START, mask=comp, other=0).to(tl.int64)
        nsel = tl.load(meta_ptr + base + _NUM_SEL, mask=comp, other=0).to(tl.int64)
        first = tl.load(meta_ptr + base + _FIRST_CHUNK, mask=comp, other=0).to(tl.int64)
        tstart = tl.load(meta_ptr + base + _TOP_START, mask=comp, other=0).to(tl.int64)
        cbase = tl.load(meta_ptr + base + _CHUNK_BASE, mask=comp, other=0).to(tl.int64)
        direct = tl.load(meta_ptr + base + _DIRECT, mask=comp, other=0)
        end_chunks = pre + nsel * C
        end_post = end_chunks + post
        length = end_post + seq - tail
        per_split = tl.cdiv(tl.cdiv(length, splits), MIN_BLOCK) * MIN_BLOCK
        lo = per_split * s
        hi = tl.minimum(lo + per_split, length)

        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < groups
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_d = offs_d < D
        mask_dv = offs_dv < DV
        q = tl.load(
            q_ptr + r.to(tl.int64) * stride_qr + offs_g[:, None] * stride_qg + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        ).to(k_ptr.dtype.element_ty)
        tokens = req_to_token_ptr + pool * stride_rt
        e_max = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
        e_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        for j0 in range(lo, hi, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            in_split = j < hi
            entry = _entries(
                j,
                in_split,
                tokens,
                fixed_ptr,
                top_ptr,
                h,
                fstart,
                pre,
                pstart,
                end_chunks,
                end_post,
                tail,
                first,
                tstart,
                cbase,
                direct,
                H,
                C,
            )
            k = tl.load(
                k_ptr + entry[None, :] * stride_k + offs_d[:, None],
                mask=in_split[None, :] & mask_d[:, None],
                other=0.0,
            )
            if EXACT_DOTS:
                qk = tl.dot(q.to(tl.float32), k.to(tl.float32)) * sm_scale
            else:
                qk = tl.dot(q, k) * sm_scale
            qk = tl.where(in_split[None, :], qk, float("-inf"))  # >= 1 finite column per row
            v = tl.load(
                v_ptr + entry[:, None] * stride_v + offs_dv[None, :],
                mask=in_split[:, None] & mask_dv[None, :],
                other=0.0,
            )
            new_max = tl.maximum(tl.max(qk, 1), e_max)
            rescale = tl.exp(e_max - new_max)
            p = tl.exp(qk - new_max[:, None])
            p_v = p.to(v.dtype)
            if EXACT_DOTS:
                acc = acc * rescale[:, None] + tl.dot(p_v.to(tl.float32), v.to(tl.float32))
            else:
                acc = acc * rescale[:, None] + tl.dot(p_v, v)
            e_sum = e_sum * rescale + tl.sum(p, 1)
            e_max = new_max
        safe_sum = tl.where(e_sum > 0, e_sum, 1.0)  # an empty split: zeros, log-sum-exp -inf
        partial = acc / safe_sum[:, None]
        mask = mask_g[:, None] & mask_dv[None, :]
        if splits == 1:
            at = out_ptr + r.to(tl.int64) * stride_or + offs_g[:, None] * stride_og
            tl.store(at + offs_dv[None, :], partial.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            at = (first_split + s).to(tl.int64)
            tl.store(
                part_out_ptr + at * stride_pr + offs_g[:, None] * stride_pg + offs_dv[None, :],
                partial,
                mask=mask,
            )
            tl.store(part_lse_ptr + at * stride_lr + offs_g, e_max + tl.log(safe_sum), mask=mask_g)


@triton.jit
def _folded_attention_stage2(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    split_indptr_ptr,
    stride_pr,
    stride_pg,
    stride_lr,
    stride_or,
    stride_og,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    r = tl.program_id(0)
    g = tl.program_id(1)
    first_split = tl.load(split_indptr_ptr + r)
    splits = tl.load(split_indptr_ptr + r + 1) - first_split
    if splits > 1:
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_dv = offs_dv < DV
        e_max = -float("inf")
        e_sum = 0.0
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for s in range(0, splits):
            at = (first_split + s).to(tl.int64)
            lse = tl.load(part_lse_ptr + at * stride_lr + g)
            if lse > -float("inf"):  # an empty split (past the row's end) adds nothing
                part = tl.load(
                    part_out_ptr + at * stride_pr + g * stride_pg + offs_dv, mask=mask_dv, other=0.0
                )
                new_max = tl.maximum(lse, e_max)
                old_scale = tl.exp(e_max - new_max)
                weight = tl.exp(lse - new_max)
                acc = acc * old_scale + weight * part
                e_sum = e_sum * old_scale + weight
                e_max = new_max
        at = out_ptr + r.to(tl.int64) * stride_or + g * stride_og + offs_dv
        tl.store(at, (acc / e_sum).to(out_ptr.dtype.element_ty), mask=mask_dv)


def _check_attention_args(
    q: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    row_meta: Tensor,
    split_indptr: Tensor,
    partial_out: Tensor,
    partial_lse: Tensor,
) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q: expected [rows, G, D] with a unit last stride, got {tuple(q.shape)}")
    rows, groups, dim = q.shape
    if row_meta.dim() != 4 or row_meta.shape[3] != NF or row_meta.dtype != torch.int32:
        raise ValueError(
            f"row_meta: expected int32 [slots, L, H, {NF}], got {row_meta.dtype} "
            f"{tuple(row_meta.shape)}"
        )
    if rows % row_meta.shape[2]:
        raise ValueError(f"q: expected a multiple of {row_meta.shape[2]} rows, got {rows}")
    if k_entries.dim() != 2 or k_entries.shape[1] != dim or k_entries.stride(1) != 1:
        raise ValueError(f"k_entries: expected [entries, {dim}], got {tuple(k_entries.shape)}")
    if v_entries.dim() != 2 or v_entries.shape[0] != k_entries.shape[0] or v_entries.stride(1) != 1:
        raise ValueError(
            f"v_entries: expected [{k_entries.shape[0]}, D_v], got {tuple(v_entries.shape)}"
        )
    if split_indptr.dim() != 1 or split_indptr.numel() < rows + 1:
        raise ValueError(f"split_indptr: expected [>= {rows + 1}], got {tuple(split_indptr.shape)}")
    dim_v = v_entries.shape[1]
    if partial_out.dim() != 3 or partial_out.shape[1:] != (groups, dim_v):
        raise ValueError(
            f"partial_out: expected [splits, {groups}, {dim_v}], got {tuple(partial_out.shape)}"
        )
    if partial_lse.shape != partial_out.shape[:2]:
        raise ValueError(
            f"partial_lse: expected {tuple(partial_out.shape[:2])}, got {tuple(partial_lse.shape)}"
        )
    if partial_out.dtype != torch.float32 or partial_lse.dtype != torch.float32:
        raise ValueError("partial_out, partial_lse: expected float32")


def folded_attention(
    q: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    fixed_values: Tensor,
    chunk_top: Tensor,
    split_indptr: Tensor,
    partial_out: Tensor,
    partial_lse: Tensor,
    layer: int,
    *,
    sm_scale: float,
    chunk_size: int,
    max_row_splits: int,
) -> Tensor:
    """``layer``'s decode attention, ``q [B * H_kv, G, D] -> [B * H_kv, G, D_v]`` (two launches).

    Args:
        q: this layer's queries, rows request-major.
        k_entries, v_entries: ``[slots * H_kv, D]`` / ``[slots * H_kv, D_v]``, the folded view of
            the layer's KV buffers (entry ``slot * H_kv + h``).
        req_to_token: ``[P, ctx]`` int32, SGLang's request-to-slot map.
        req_pool_indices, seq_lens, slot_of_row, row_meta: as in
            :func:`~hybridkv_sglang.kernels.folded_tables.folded_lengths`.
        fixed_values: ``[F]`` int32 arena; chunk_top: ``[T]`` int32 (after retrieval).
        split_indptr: ``[>= rows + 1]`` int32, this layer's split offsets (from
            :func:`~hybridkv_sglang.kernels.folded_tables.folded_lengths`).
        partial_out: ``[S, G, D_v]`` float32, partial_lse: ``[S, G]`` float32: split scratch,
            ``S >= split_indptr[rows]``.
        max_row_splits: at least every row's split count (sizes the grid).
    """
    _check_attention_args(q, k_entries, v_entries, row_meta, split_indptr, partial_out, partial_lse)
    require_triton_device("folded_attention", q, k_entries, row_meta, split_indptr, partial_out)
    rows, groups, dim = q.shape
    dim_v = v_entries.shape[1]
    out = q.new_empty(rows, groups, dim_v)
    if rows == 0:
        return out
    _folded_attention_stage1[(rows, max(1, max_row_splits))](
        q,
        k_entries,
        v_entries,
        out,
        partial_out,
        partial_lse,
        req_to_token,
        req_pool_indices,
        seq_lens,
        slot_of_row,
        row_meta,
        fixed_values,
        chunk_top,
        split_indptr,
        layer,
        row_meta.shape[1],
        groups,
        sm_scale,
        req_to_token.stride(0),
        q.stride(0),
        q.stride(1),
        k_entries.stride(0),
        v_entries.stride(0),
        out.stride(0),
        out.stride(1),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_lse.stride(0),
        H=row_meta.shape[2],
        NF_=NF,
        C=chunk_size,
        D=dim,
        DV=dim_v,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_DV=triton.next_power_of_2(dim_v),
        BLOCK_G=max(16, triton.next_power_of_2(groups)),
        BLOCK=BLOCK_N,
        MIN_BLOCK=MIN_BLOCK_KV,
        EXACT_DOTS=interpret_enabled() and k_entries.dtype == torch.bfloat16,
        num_warps=4,
        num_stages=2,
    )
    _folded_attention_stage2[(rows, groups)](
        partial_out,
        partial_lse,
        out,
        split_indptr,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_lse.stride(0),
        out.stride(0),
        out.stride(1),
        DV=dim_v,
        BLOCK_DV=triton.next_power_of_2(dim_v),
        num_warps=4,
    )
    return out


def folded_attention_ref(
    q: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    fixed_values: Tensor,
    chunk_top: Tensor,
    split_indptr: Tensor,
    partial_out: Tensor,
    partial_lse: Tensor,
    layer: int,
    *,
    sm_scale: float,
    chunk_size: int,
    max_row_splits: int,
) -> Tensor:
    """Torch twin of :func:`folded_attention` (float32 math; splits change only the rounding,
    so the twin ignores them and its scratch)."""
    _check_attention_args(q, k_entries, v_entries, row_meta, split_indptr, partial_out, partial_lse)
    indptr, indices = folded_entries_ref(
        req_to_token,
        req_pool_indices,
        seq_lens,
        slot_of_row,
        row_meta,
        fixed_values,
        chunk_top,
        layer,
        chunk_size=chunk_size,
    )
    return sparse_decode_reference(q, k_entries, v_entries, indptr, indices, sm_scale)


def folded_entries_ref(
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    fixed_values: Tensor,
    chunk_top: Tensor,
    layer: int,
    *,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """``(kv_indptr [rows + 1], kv_indices)``: the folded entries each row of ``layer`` reads,
    the definition the attention kernel derives in registers (vectorised over the layer)."""
    heads = row_meta.shape[2]
    rows = req_pool_indices.numel() * heads
    device = req_to_token.device
    b, h, _, meta = _batch_rows(req_pool_indices, slot_of_row, row_meta, layer, rows)
    seq = seq_lens.to(torch.int64)[b]
    lengths = _row_lengths(meta, seq, chunk_size)
    indptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.cumsum(lengths, 0)
    total = int(indptr[-1])
    row = torch.repeat_interleave(torch.arange(rows, device=device), lengths)
    j = torch.arange(total, device=device) - indptr[row]
    m = meta[row]
    pre, post = m[:, PRE_LEN], m[:, POST_LEN]
    nch = m[:, NUM_SEL] * chunk_size
    direct = m[:, DIRECT] != 0
    in_chunks = (j >= pre) & (j < pre + nch)
    in_post = (j >= pre + nch) & (j < pre + nch + post)
    in_tail = j >= pre + nch + post
    jc = (j - pre).clamp(min=0)
    top = (
        chunk_top.to(torch.int64)[
            (m[:, TOP_START] + jc // chunk_size).clamp(max=max(chunk_top.numel() - 1, 0))
        ]
        if chunk_top.numel()
        else jc
    )
    chunk_v = (m[:, FIRST_CHUNK] + top) * chunk_size + jc % chunk_size
    fixed = fixed_values.to(torch.int64)
    last = max(fixed.numel() - 1, 0)
    pre_v = fixed[(m[:, FIXED_START] + j).clamp(max=last)] if fixed.numel() else j
    post_v = fixed[(m[:, POST_START] + j - pre - nch).clamp(0, last)] if fixed.numel() else j
    tail_v = m[:, TAIL_START] + j - pre - nch - post
    value = torch.where(
        in_chunks, chunk_v, torch.where(in_post, post_v, torch.where(in_tail, tail_v, pre_v))
    )
    pool = req_pool_indices.to(torch.int64)[b][row]
    positional = (~direct & ~in_post) | in_tail
    slots = req_to_token[pool, torch.where(positional, value, 0)].to(torch.int64)
    mapped_chunk = fixed[(m[:, CHUNK_BASE] + chunk_v).clamp(0, last)] if fixed.numel() else chunk_v
    entry = torch.where(positional, slots * heads + h[row], value)
    entry = torch.where(direct & in_chunks, mapped_chunk, entry)
    return indptr, entry
