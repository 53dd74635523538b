"""Decode page tables built on the device from per-request metadata (graph-safe, no host reads).

A decode step's table of layer ``l`` has one row per (request, kv head), request-major. What a
row reads is described once per request, when its compression finishes, by one record of
``ROW_FIELDS`` int32 values per (request slot, layer, kv head) (``row_meta``), plus values in
arenas: ``fixed_values`` (positions in the request's ``req_to_token`` row, or folded entry ids
when ``DIRECT``), the dynamic rows' chunk key bounds (``[J, r]``, one row per chunk from
``BOUNDS_START``) and their bound parameters (row ``PARAM_ROW`` of ``bound_channels [P, r]`` and
``bound_affine [P, 2, r]``: bound column ``i`` covers key channel ``channels[i]`` and its value is
``offset[i] + scale[i] * stored[i]``, so 8-bit codes over a few channels and plain bounds over
all ``D`` channels in the KV dtype, ``channels = arange(D)``, ``offset = 0``, ``scale = 1``, take
the same path), and their retrieval scratch: ``ceil(NUM_CHUNKS / CANDIDATE_BLOCK) * NUM_SEL``
candidates (``chunk_scores`` float32 and ``chunk_ids`` int32 from ``CAND_START``) and the
``NUM_SEL`` chunks selected (``chunk_top`` int32 from ``TOP_START``), what
:meth:`hybridkv_sglang.policy.byte_cost.ByteCosts.scratch_bytes` charges. A ``compact`` dynamic
row whose chunks live on the host tier also has ``STAGE_SLOTS`` staging slots (their chunks and
ages from ``STAGE_START``) and the host chunk of each retrievable chunk (from ``HOST_START``):
the retrieval launch fills the slots on the device each step (rules:
:mod:`hybridkv_sglang.kernels.host_staging`). A row lists, in order::

    fixed[FIXED_START : FIXED_START + PRE_LEN]            # kept positions / resident prefix
    its NUM_SEL retrieved chunks of C values each          # dynamic rows only
    fixed[POST_START : POST_START + POST_LEN]             # compact window (else empty)
    positions [TAIL_START, seq_len)                        # the dense tail

A value ``v`` becomes the folded entry ``req_to_token[pool_row, v] * H_kv + h`` (in place) or
``v`` itself (``DIRECT``, compact entries). Retrieved chunk ``c`` (``0 <= c < NUM_CHUNKS``, by
descending Quest score) gives values ``(FIRST_CHUNK + c) * C + i``, mapped through
``fixed[CHUNK_BASE + ...]`` when ``DIRECT``. Requests whose pool row maps to no slot
(``slot_of_row[row] == -1``: dense, or graph padding) read ``[0, seq_len)``.

Two kernels, each with a torch twin of the same contract (the attention, which reads the rows,
is :mod:`hybridkv_sglang.kernels.folded_attention`):

- :func:`folded_lengths`: every layer's split offsets (each row's KV splits) in one launch;
- :func:`chunk_retrieval`: per layer, one launch: Quest scores of each dynamic row's chunks and
  their top ``NUM_SEL`` (per block of at least ``CANDIDATE_BLOCK`` chunks the block's best
  ``NUM_SEL``, at the row's own stride, then, in the row's last block to finish, the best of
  those; other rows exit at once), written into the row's own ranges of the candidate and
  ``chunk_top`` arenas, so scratch is sized by each row's chunks and selection, never by the
  batch's largest; with a host tier the same program then stages the row's chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpret_enabled, require_triton_device
from .host_staging import (
    _MAX_AGE,
    _NOT_FREE,
    _SLOT_BITS,
    HostStaging,
    _as_bits,
    _check_host_tier,
    _check_staging,
    _stage_row,
    stage_host_chunks_ref,
)

__all__ = [
    "CANDIDATE_BLOCK",
    "MAX_ROW_SPLITS",
    "ROW_FIELDS",
    "chunk_retrieval",
    "chunk_retrieval_ref",
    "folded_lengths",
    "folded_lengths_ref",
    "row_split_cap",
    "split_capacity",
]

ROW_FIELDS = (
    "FIXED_START",
    "PRE_LEN",
    "POST_START",
    "POST_LEN",
    "TAIL_START",
    "NUM_SEL",
    "NUM_CHUNKS",
    "FIRST_CHUNK",
    "BOUNDS_START",
    "CHUNK_BASE",
    "DIRECT",
    "PARAM_ROW",
    "CAND_START",
    "TOP_START",
    "STAGE_START",
    "STAGE_SLOTS",
    "HOST_START",
)
(
    FIXED_START,
    PRE_LEN,
    POST_START,
    POST_LEN,
    TAIL_START,
    NUM_SEL,
    NUM_CHUNKS,
    FIRST_CHUNK,
    BOUNDS_START,
    CHUNK_BASE,
    DIRECT,
    PARAM_ROW,
    CAND_START,
    TOP_START,
    STAGE_START,
    STAGE_SLOTS,
    HOST_START,
) = range(len(ROW_FIELDS))
NF = len(ROW_FIELDS)

CANDIDATE_BLOCK = 32
"""Fewest chunks per block of the retrieval's first pass: a row of ``n`` chunks selecting
``k`` has at most ``ceil(n / CANDIDATE_BLOCK) * k`` candidates (the cost model's count)."""

_MIN_SPLIT_ENTRIES = 64
"""A KV split reads at least this many entries (fewer splits on short rows)."""

MAX_ROW_SPLITS = 256
"""Most splits of one row, however few rows a batch has."""


# ----------------------------------------------------------------------------- shared twin parts
def _batch_rows(
    req_pool_indices: Tensor, slot_of_row: Tensor, row_meta: Tensor, layer: int, num_rows: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(b, h, slot, meta [rows, NF])`` of the table's rows (dense rows: zero meta)."""
    heads = row_meta.shape[2]
    device = req_pool_indices.device
    r = torch.arange(num_rows, device=device)
    b, h = r // heads, r % heads
    slot = slot_of_row[req_pool_indices.to(torch.int64)[b]].to(torch.int64)
    compressed = slot >= 0
    meta = row_meta[slot.clamp(min=0), layer, h].to(torch.int64)
    meta = torch.where(compressed[:, None], meta, torch.zeros_like(meta))
    return b, h, slot, meta


def _row_lengths(meta: Tensor, seq: Tensor, chunk_size: int) -> Tensor:
    return (
        meta[:, PRE_LEN]
        + meta[:, NUM_SEL] * chunk_size
        + meta[:, POST_LEN]
        + seq
        - meta[:, TAIL_START]
    )


# ----------------------------------------------------------------------------- 1. split offsets
@triton.jit
def _split_offsets_kernel(
    req_pool_ptr,
    seq_lens_ptr,
    slot_of_row_ptr,
    meta_ptr,
    split_indptr_ptr,
    num_rows,
    num_layers,
    stride_split,
    target_programs,
    max_row_splits,
    H: tl.constexpr,
    NF_: tl.constexpr,
    C: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    valid = r < num_rows
    b = r // H
    h = r % H
    pool = tl.load(req_pool_ptr + b, mask=valid, other=0).to(tl.int64)
    seq = tl.load(seq_lens_ptr + b, mask=valid, other=0).to(tl.int32)
    slot = tl.load(slot_of_row_ptr + pool, mask=valid, other=-1)
    comp = valid & (slot >= 0)
    base = ((tl.maximum(slot, 0).to(tl.int64) * num_layers + layer) * H + h) * NF_
    pre = tl.load(meta_ptr + base + 1, mask=comp, other=0)
    post = tl.load(meta_ptr + base + 3, mask=comp, other=0)
    tail = tl.load(meta_ptr + base + 4, mask=comp, other=0)
    nsel = tl.load(meta_ptr + base + 5, mask=comp, other=0)
    length = tl.where(comp, pre + nsel * C + post + seq - tail, seq)
    length = tl.where(valid, length, 0)
    total = tl.maximum(tl.sum(length, axis=0), 1)
    share = (length.to(tl.int64) * target_programs + total - 1) // total
    splits = tl.minimum(share, (length + MIN_SPLIT - 1) // MIN_SPLIT)
    splits = tl.minimum(tl.maximum(splits, 1), max_row_splits).to(tl.int32)
    splits = tl.where(valid, splits, 0)
    row_offsets = split_indptr_ptr + layer * stride_split
    tl.store(row_offsets + 1 + r, tl.cumsum(splits, axis=0), mask=valid)
    tl.store(row_offsets + r, 0, mask=r == 0)


def row_split_cap(rows: int, target_programs: int, max_kv_splits: int) -> int:
    """Most splits one row of a batch of ``rows`` rows may take: ``max_kv_splits`` when many
    rows run, raised to a fair share of ``target_programs`` when few do (so that batch 1
    fills the GPU), at most :data:`MAX_ROW_SPLITS`. Host only: the grid of a graph batch."""
    return min(MAX_ROW_SPLITS, max(max_kv_splits, -(-target_programs // max(rows, 1))))


def split_capacity(max_rows: int, target_programs: int) -> int:
    """Scratch slots that any step's splits fit in: a row takes at most
    ``ceil(length * target_programs / total)`` splits, so all rows at most
    ``target_programs + rows``."""
    return target_programs + max_rows


def _check_split_args(
    req_pool_indices: Tensor, seq_lens: Tensor, row_meta: Tensor, split_indptr: Tensor
) -> None:
    if row_meta.dim() != 4 or row_meta.shape[3] != NF or row_meta.dtype != torch.int32:
        raise ValueError(
            f"row_meta: expected int32 [slots, L, H, {NF}], got {row_meta.dtype} "
            f"{tuple(row_meta.shape)}"
        )
    rows = req_pool_indices.numel() * row_meta.shape[2]
    layers = row_meta.shape[1]
    if seq_lens.numel() != req_pool_indices.numel():
        raise ValueError(
            f"seq_lens: expected {req_pool_indices.numel()} values (one per request), got "
            f"{seq_lens.numel()}"
        )
    if (
        split_indptr.dim() != 2
        or split_indptr.shape[0] != layers
        or split_indptr.shape[1] < rows + 1
        or split_indptr.dtype != torch.int32
    ):
        raise ValueError(
            f"split_indptr: expected int32 [{layers}, >= {rows + 1}], got {split_indptr.dtype} "
            f"{tuple(split_indptr.shape)}"
        )


def folded_lengths(
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    split_indptr: Tensor,
    *,
    chunk_size: int,
    max_row_splits: int,
    target_programs: int,
) -> None:
    """Every layer's split offsets ``split_indptr[l, : rows + 1]`` (one launch).

    A row of ``n`` entries in a layer of ``N`` takes ``min(ceil(n * target_programs / N),
    ceil(n / _MIN_SPLIT_ENTRIES))`` splits, at least 1 and at most ``max_row_splits`` (see
    :func:`row_split_cap`): long static rows many, short dynamic rows few, about
    ``target_programs`` in all. ``split_indptr`` is their exclusive prefix sum, each row's
    range of the attention's split scratch (:func:`split_capacity` slots hold any step).

    Args:
        req_pool_indices: ``[B]`` int, each request's ``req_to_token`` row (graph padding: 0).
        seq_lens: ``[B]`` int, dense lengths (this step's token included).
        slot_of_row: ``[P]`` int32, metadata slot of each pool row, ``-1``: dense.
        row_meta: ``[S, L, H_kv, NF]`` int32 row records (see the module docstring).
        split_indptr: ``[L, >= B * H_kv + 1]`` int32, written.
    """
    _check_split_args(req_pool_indices, seq_lens, row_meta, split_indptr)
    require_triton_device("folded_lengths", req_pool_indices, seq_lens, row_meta, split_indptr)
    layers, heads = row_meta.shape[1], row_meta.shape[2]
    rows = req_pool_indices.numel() * heads
    _split_offsets_kernel[(layers,)](
        req_pool_indices,
        seq_lens,
        slot_of_row,
        row_meta,
        split_indptr,
        rows,
        layers,
        split_indptr.stride(0),
        target_programs,
        max_row_splits,
        H=heads,
        NF_=NF,
        C=chunk_size,
        MIN_SPLIT=_MIN_SPLIT_ENTRIES,
        BLOCK=triton.next_power_of_2(max(rows, 2)),
    )


def folded_lengths_ref(
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    split_indptr: Tensor,
    *,
    chunk_size: int,
    max_row_splits: int,
    target_programs: int,
) -> None:
    """Torch twin of :func:`folded_lengths`."""
    _check_split_args(req_pool_indices, seq_lens, row_meta, split_indptr)
    layers, heads = row_meta.shape[1], row_meta.shape[2]
    rows = req_pool_indices.numel() * heads
    for layer in range(layers):
        b, _, _, meta = _batch_rows(req_pool_indices, slot_of_row, row_meta, layer, rows)
        length = _row_lengths(meta, seq_lens.to(torch.int64)[b], chunk_size)
        total = length.sum().clamp(min=1)
        share = (length * target_programs + total - 1) // total
        splits = torch.minimum(share, (length + _MIN_SPLIT_ENTRIES - 1) // _MIN_SPLIT_ENTRIES)
        split_indptr[layer, 0] = 0
        offsets = torch.cumsum(splits.clamp(1, max_row_splits), 0)
        split_indptr[layer, 1 : rows + 1] = offsets.to(split_indptr.dtype)


# ----------------------------------------------------------------------------- 2. retrieval
@triton.jit
def _row_record(req_pool_ptr, slot_of_row_ptr, meta_ptr, r, layer, num_layers, H, NF_):
    """``(slot, base)``: the row's metadata slot (-1: dense) and its record's offset."""
    pool = tl.load(req_pool_ptr + r // H).to(tl.int64)
    slot = tl.load(slot_of_row_ptr + pool)
    base = ((tl.maximum(slot, 0).to(tl.int64) * num_layers + layer) * H + r % H) * NF_
    return slot, base


@triton.jit
def _rank_keys(scores, ids):
    """int64 keys whose descending order is descending score, then ascending id."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone in the float value
    return (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _ranked_ids(keys):
    return (0x7FFFFFFF - (keys & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _ranked_scores(keys):
    ordered = (keys >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _rounded(x, low: tl.constexpr):
    """float32 ``x`` rounded to ``low`` (to nearest, ties to even), as float32. bfloat16 by bits,
    so the interpreter (whose float32 -> bfloat16 cast truncates) rounds as a GPU does."""
    if low == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif low == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _dot_operand(x, low: tl.constexpr, dot: tl.constexpr):
    """A tile whose values are exact in ``low`` (codes, stored bounds, rounded ``q * scale``) in
    the dot's dtype ``dot``: ``low``, or float32 where ``dot`` is (the interpreter reads uint8
    -> bfloat16 casts as raw bits, so its tiles go through float32, exactly)."""
    if dot == tl.float32:
        return x.to(tl.float32)
    else:
        return x.to(low)


@triton.jit
def _select_chunks(
    cand_score_ptr,
    cand_id_ptr,
    top_ptr,
    n,
    nsel,
    cstart,
    tstart,
    BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """A row's ``nsel`` best candidates (``nsel`` per block of ``BLOCK_C`` chunks from
    ``cstart``), by descending score (ties: the lower chunk id), into ``chunk_top[tstart:]``. Up
    to ``BLOCK`` candidates are ranked by one sort in registers; more are scanned block by block,
    one pass per chunk taken. Candidates are read with ``.cg`` (L2, never a stale L1 line):
    other programs of the launch wrote them."""
    total = tl.cdiv(n, BLOCK_C) * nsel
    if total <= BLOCK:
        c = tl.arange(0, BLOCK)
        ok = (c < total) & (c % nsel < tl.minimum(n - (c // nsel) * BLOCK_C, nsel))
        s = tl.load(cand_score_ptr + cstart + c, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ids = tl.load(cand_id_ptr + cstart + c, mask=ok, other=0x7FFFFFFF, cache_modifier=".cg")
        ranked = tl.sort(_rank_keys(s, ids), dim=0, descending=True)
        tl.store(top_ptr + tstart + c, _ranked_ids(ranked), mask=c < nsel)
    else:
        for j in range(0, nsel):
            best_val = float("-inf")
            best_at = 0
            for c0 in range(0, total, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                ok = (c < total) & (c % nsel < tl.minimum(n - (c // nsel) * BLOCK_C, nsel))
                s = tl.load(
                    cand_score_ptr + cstart + c, mask=ok, other=float("-inf"), cache_modifier=".cg"
                )
                m = tl.max(s, axis=0)
                i = tl.argmax(s, axis=0)
                take = m > best_val
                best_at = tl.where(take, c0 + i, best_at)
                best_val = tl.where(take, m, best_val)
            best_id = tl.load(cand_id_ptr + cstart + best_at, cache_modifier=".cg")
            tl.store(top_ptr + tstart + j, best_id)
            tl.store(cand_score_ptr + cstart + best_at, float("-inf"))
            tl.debug_barrier()  # the next pass's threads read what this one struck out


@triton.jit
def _chunk_retrieval_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    channels_ptr,
    affine_ptr,
    cand_score_ptr,
    cand_id_ptr,
    top_ptr,
    done_ptr,
    req_pool_ptr,
    slot_of_row_ptr,
    meta_ptr,
    staged_ptr,
    age_ptr,
    host_ids_ptr,
    fixed_ptr,
    host_k_ptr,
    host_v_ptr,
    k_ptr,
    v_ptr,
    moves_ptr,
    layer,
    num_layers,
    G,
    R,
    stride_qr,
    stride_qg,
    stride_bound,
    stride_channels,
    stride_affine,
    stride_affine_part,
    dim_k,
    dim_v,
    stride_hk_chunk,
    stride_hk_pos,
    stride_hv_chunk,
    stride_hv_pos,
    stride_k,
    stride_v,
    stride_moves,
    H: tl.constexpr,
    NF_: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SEL: tl.constexpr,
    LOW: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_HOST_TIER: tl.constexpr,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CC: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MAX_AGE: tl.constexpr,
    SLOT_BITS: tl.constexpr,
    NOT_FREE: tl.constexpr,
):
    """One program per (row, block of ``BLOCK_C`` chunks): the block's Quest scores and its best
    ``min(NUM_SEL, valid)`` chunks (one sort) at ``CAND_START + block * NUM_SEL + j`` (the row's
    own stride, so its candidates fit the slots the cost model charges); then the row's last
    program to finish selects the row's chunks and, with ``HAS_HOST_TIER``, stages them.

    Last-block pattern (``done[r]`` counts a row's finished blocks): a program stores its
    candidates, ``tl.debug_barrier()`` (every thread of the CTA has issued its stores), then one
    ``atomic_add(done + r, 1)`` with ``acq_rel`` semantics at GPU scope: the release orders the
    CTA's candidate stores before the count, and the program that reads ``blocks - 1`` acquires
    every other block's release, so after its own barrier all its threads see every candidate
    (read with ``.cg``, from L2). It then resets ``done[r]`` to 0, the only write after the
    count is complete, so the next layer and the next graph replay start from zeros. Programs of
    blocks past the row's chunks, and rows that are not dynamic, exit at once without counting.
    Verified under the Triton interpreter only (which runs programs one by one) until a GPU run.

    Scores at the bounds' byte cost: a bound tile is never widened to float32. uint8 codes go
    to bfloat16 (exact: 8 significant bits), 16-bit bounds stay as stored, and ``q * scale`` is
    rounded once to ``LOW`` (bfloat16, or float16 for float16 bounds), so both dots take 16-bit
    inputs and accumulate in float32; float32 bounds keep float32 with ``PRECISION`` "ieee".
    ``DOT`` is the operands' dtype at the dot: ``LOW``, or float32 under the interpreter, whose
    numpy dot reads bfloat16 as raw bits (the values are the same ``LOW`` values either way, and
    their products are exact in float32)."""
    r = tl.program_id(0)
    blk = tl.program_id(1)
    slot, base = _row_record(req_pool_ptr, slot_of_row_ptr, meta_ptr, r, layer, num_layers, H, NF_)
    nsel = tl.load(meta_ptr + base + 5, mask=slot >= 0, other=0)
    n = tl.load(meta_ptr + base + 6, mask=slot >= 0, other=0)
    if (nsel > 0) & (blk * BLOCK_C < n):
        bstart = tl.load(meta_ptr + base + 8).to(tl.int64)
        param = tl.load(meta_ptr + base + 11).to(tl.int64)
        cstart = tl.load(meta_ptr + base + 12).to(tl.int64)
        offs_c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < n
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        channel = tl.load(channels_ptr + param * stride_channels + offs_r, mask=mask_r, other=0)
        affine = affine_ptr + param * stride_affine + offs_r
        offset = tl.load(affine, mask=mask_r, other=0.0)
        scale = tl.load(affine + stride_affine_part, mask=mask_r, other=0.0)
        where = (bstart + offs_c)[:, None] * stride_bound + offs_r[None, :]
        mask = mask_c[:, None] & mask_r[None, :]
        lo = _dot_operand(tl.load(kmin_ptr + where, mask=mask, other=0), LOW, DOT)
        hi = _dot_operand(tl.load(kmax_ptr + where, mask=mask, other=0), LOW, DOT)
        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < G
        q = tl.load(
            q_ptr + r.to(tl.int64) * stride_qr + offs_g[:, None] * stride_qg + channel[None, :],
            mask=mask_g[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        # sum_i max(q_i lo_i, q_i hi_i) with lo, hi = off + s * stored (s >= 0, stored hi >= lo)
        # = (q s)+ . hi + (q s)- . lo + q . off: two small dots over the stored values, then
        # the offsets' dot per query head (a [G, r] tile, float32)
        qs = _dot_operand(_rounded(q * scale[None, :], LOW), LOW, DOT)
        per_head = tl.dot(tl.maximum(qs, 0.0), tl.trans(hi), input_precision=PRECISION)
        per_head += tl.dot(tl.minimum(qs, 0.0), tl.trans(lo), input_precision=PRECISION)
        per_head += tl.sum(q * offset[None, :], axis=1)[:, None]
        scores = tl.max(tl.where(mask_g[:, None], per_head, float("-inf")), axis=0)
        scores = tl.where(mask_c, scores, float("-inf"))
        ranked = tl.sort(_rank_keys(scores, offs_c), dim=0, descending=True)
        j = tl.arange(0, BLOCK_C)
        keep = j < tl.minimum(n - blk * BLOCK_C, nsel)
        out = cstart + blk * nsel + j
        tl.store(cand_score_ptr + out, _ranked_scores(ranked), mask=keep)
        tl.store(cand_id_ptr + out, _ranked_ids(ranked), mask=keep)
        tl.debug_barrier()
        finished = tl.atomic_add(done_ptr + r, 1, sem="acq_rel")
        if finished == tl.cdiv(n, BLOCK_C) - 1:
            tl.debug_barrier()
            tstart = tl.load(meta_ptr + base + 13).to(tl.int64)
            _select_chunks(
                cand_score_ptr, cand_id_ptr, top_ptr, n, nsel, cstart, tstart, BLOCK_C, BLOCK_SEL
            )
            if HAS_HOST_TIER:
                tl.debug_barrier()
                _stage_row(
                    top_ptr,
                    staged_ptr,
                    age_ptr,
                    host_ids_ptr,
                    fixed_ptr,
                    host_k_ptr,
                    host_v_ptr,
                    k_ptr,
                    v_ptr,
                    moves_ptr,
                    slot,
                    nsel,
                    tl.load(meta_ptr + base + 15),
                    tstart,
                    tl.load(meta_ptr + base + 14).to(tl.int64),
                    tl.load(meta_ptr + base + 16).to(tl.int64),
                    tl.load(meta_ptr + base + 7).to(tl.int64),
                    tl.load(meta_ptr + base + 9).to(tl.int64),
                    dim_k,
                    dim_v,
                    stride_hk_chunk,
                    stride_hk_pos,
                    stride_hv_chunk,
                    stride_hv_pos,
                    stride_k,
                    stride_v,
                    stride_moves,
                    C,
                    BLOCK_N,
                    BLOCK_S,
                    BLOCK_CC,
                    BLOCK_DK,
                    BLOCK_DV,
                    MAX_AGE,
                    SLOT_BITS,
                    NOT_FREE,
                )
            tl.store(done_ptr + r, 0)


_BOUND_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_LOW = {torch.uint8: torch.bfloat16, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
"""The 16-bit dtype of the scores' dot per bound dtype (float32 bounds: float32)."""
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_TILE_BYTES = 16384
"""Bytes of one bound tile (``BLOCK_C x BLOCK_R`` in the dot's dtype) a program aims for."""
_SELECT_SORT = 4096
"""Most candidates a row's selection ranks in one register sort (more: one scan per chunk)."""


def _retrieval_tiles(
    width: int, bound_dtype: torch.dtype, groups: int, max_selected: int
) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, BLOCK_G, num_warps)`` from the bounds' shape.

    A bound tile holds up to ``_TILE_BYTES`` in the dot's dtype (at least ``CANDIDATE_BLOCK``
    chunks, the cost model's count, and the selection; at most 128 chunks, one sort). Warps
    follow the registers a program holds, the larger of a bound tile and the ``[G, BLOCK_C]``
    float32 scores, about 4 KiB per warp (32 registers a thread): the 16-channel uint8 tiles
    (128 chunks x 16 codes, 4 KiB as bfloat16, beside 8 KiB of scores for up to 16 query heads)
    take 2 warps instead of the default 4, whose extra warps would only split a 16 x 128 x 16
    dot and a 128-key sort finer; 128-channel 16-bit or float32 tiles (16 KiB) take 4."""
    block_r = max(16, triton.next_power_of_2(width))
    size = _LOW.get(bound_dtype, torch.float32).itemsize
    block_c = max(CANDIDATE_BLOCK, min(128, _TILE_BYTES // (block_r * size)))
    block_c = max(block_c, triton.next_power_of_2(max_selected))
    block_g = max(16, triton.next_power_of_2(groups))
    held = max(block_c * block_r * size, block_g * block_c * 4)
    return block_r, block_c, block_g, min(8, max(1, triton.next_power_of_2(held // 4096)))


def _check_retrieval_args(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    bound_channels: Tensor,
    bound_affine: Tensor,
    row_meta: Tensor,
    blocks_done: Tensor,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q: expected [rows, G, D], got shape {tuple(q.shape)}")
    if (
        kmin.dim() != 2
        or not 1 <= kmin.shape[1] <= q.shape[2]
        or kmax.shape != kmin.shape
        or kmin.dtype not in _BOUND_DTYPES
        or kmax.dtype != kmin.dtype
    ):
        raise ValueError(
            f"kmin/kmax: expected [chunks, r <= {q.shape[2]}] of one of {_BOUND_DTYPES}, got "
            f"{kmin.dtype} {tuple(kmin.shape)} and {kmax.dtype} {tuple(kmax.shape)}"
        )
    width = kmin.shape[1]
    if bound_channels.dim() != 2 or bound_channels.shape[1] != width:
        raise ValueError(
            f"bound_channels: expected [params, {width}], got {tuple(bound_channels.shape)}"
        )
    if bound_channels.dtype != torch.int32 or bound_affine.dtype != torch.float32:
        raise ValueError(
            f"bound_channels, bound_affine: expected int32 and float32, got "
            f"{bound_channels.dtype} and {bound_affine.dtype}"
        )
    if bound_affine.shape != (bound_channels.shape[0], 2, width):
        raise ValueError(
            f"bound_affine: expected [{bound_channels.shape[0]}, 2, {width}], got "
            f"{tuple(bound_affine.shape)}"
        )
    if q.shape[0] % row_meta.shape[2]:
        raise ValueError(f"q: expected a multiple of {row_meta.shape[2]} rows, got {q.shape[0]}")
    if blocks_done.dim() != 1 or blocks_done.dtype != torch.int32:
        raise ValueError(
            f"blocks_done: expected 1-D int32, got {blocks_done.dtype} {tuple(blocks_done.shape)}"
        )
    if blocks_done.numel() < q.shape[0]:
        raise ValueError(
            f"blocks_done: expected >= {q.shape[0]} counters (one per row), got "
            f"{blocks_done.numel()}"
        )


def chunk_retrieval(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    bound_channels: Tensor,
    bound_affine: Tensor,
    chunk_scores: Tensor,
    chunk_ids: Tensor,
    chunk_top: Tensor,
    req_pool_indices: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    layer: int,
    blocks_done: Tensor,
    *,
    max_chunks: int,
    max_selected: int,
    staging: HostStaging | None = None,
) -> None:
    """Each dynamic row's top ``NUM_SEL`` chunks of ``layer`` into ``chunk_top[TOP_START:]`` and,
    with ``staging``, its host-tier rows' chunks staged: one launch.

    Per (row, block of at least ``CANDIDATE_BLOCK`` chunks) the block's best ``NUM_SEL``
    candidates into ``chunk_scores`` / ``chunk_ids`` from ``CAND_START``; the row's last block
    to finish (counted in ``blocks_done``) takes the best of the candidates and stages them
    (:mod:`hybridkv_sglang.kernels.host_staging`: ``chunk_top`` then holds staging slots). Rows
    that are not dynamic exit at once. Chunk ``c`` of a row scores ``max_g (q[g] . off +
    sum_i max(qs_i kmin[c, i], qs_i kmax[c, i]))`` over its parameter row, ``qs = q[g, ch] *
    scale`` rounded to bfloat16 (float16 for float16 bounds; float32 bounds: not rounded), the
    rest in float32 (see :func:`chunk_retrieval_ref`).

    Args:
        q: ``[B * H_kv, G, D]`` this layer's queries (rows request-major); last dim contiguous.
        kmin, kmax: ``[J, r]`` the bounds arena (row ``BOUNDS_START + c`` is chunk ``c``): uint8
            codes or float16 / bfloat16 / float32 values, ``kmax >= kmin``.
        bound_channels: ``[P, r]`` int32, the key channel of each bound column (row
            ``PARAM_ROW``); contiguous rows.
        bound_affine: ``[P, 2, r]`` float32, offsets (``[:, 0]``) and scales (``[:, 1]``,
            ``>= 0``) of each bound column; contiguous rows.
        chunk_scores: ``[M]`` float32, chunk_ids: ``[M]`` int32: candidate scratch,
            ``ceil(NUM_CHUNKS / CANDIDATE_BLOCK) * NUM_SEL`` slots per dynamic row.
        chunk_top: ``[T]`` int32, written: relative chunk ids by descending score (ties: the
            lower id), ``NUM_SEL`` per dynamic row (host-tier rows: their staging slots).
        req_pool_indices, slot_of_row, row_meta: as in :func:`folded_lengths`.
        blocks_done: ``[>= B * H_kv]`` int32, per row the blocks finished: zeros on entry, zeros
            again on return (the row's last block resets its counter); not read on the host.
        max_chunks: at least every row's ``NUM_CHUNKS`` (sizes the grid).
        max_selected: at least every row's ``NUM_SEL`` (sizes the blocks).
        staging: the host tier and staging state (None: no host tier, nothing staged).
    """
    _check_retrieval_args(q, kmin, kmax, bound_channels, bound_affine, row_meta, blocks_done)
    unit = (q.stride(2), kmin.stride(1), kmax.stride(1), bound_channels.stride(1))
    if unit != (1, 1, 1, 1) or bound_affine.stride(2) != 1:
        raise ValueError("q, kmin, kmax, bound_channels, bound_affine: expected a unit last stride")
    devices = (q, kmin, bound_affine, chunk_top, row_meta, blocks_done)
    if staging is not None:
        _check_staging(row_meta, chunk_top, staging, max_selected)
        devices += (staging.staged, staging.k_entries, staging.v_entries, staging.moves)
    require_triton_device("chunk_retrieval", *devices)
    rows, groups, _ = q.shape
    if rows == 0 or max_selected == 0:
        return
    width = kmin.shape[1]
    block_r, block_c, block_g, num_warps = _retrieval_tiles(width, kmin.dtype, groups, max_selected)
    low = _LOW.get(kmin.dtype, torch.float32)
    dot = torch.float32 if interpret_enabled() and low == torch.bfloat16 else low
    candidates = triton.cdiv(max(max_chunks, 1), block_c) * max_selected
    stage_args, stage_consts = _staging_launch_args(staging, chunk_top, q, max_selected)
    _chunk_retrieval_kernel[(rows, triton.cdiv(max(max_chunks, 1), block_c))](
        q,
        kmin,
        kmax,
        bound_channels,
        bound_affine,
        chunk_scores,
        chunk_ids,
        chunk_top,
        blocks_done,
        req_pool_indices,
        slot_of_row,
        row_meta,
        *stage_args[:9],
        layer,
        row_meta.shape[1],
        groups,
        width,
        q.stride(0),
        q.stride(1),
        kmin.stride(0),
        bound_channels.stride(0),
        bound_affine.stride(0),
        bound_affine.stride(1),
        *stage_args[9:],
        H=row_meta.shape[2],
        NF_=NF,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
        BLOCK_SEL=triton.next_power_of_2(min(max(candidates, 16), _SELECT_SORT)),
        LOW=_TL[low],
        DOT=_TL[dot],
        PRECISION="ieee" if dot == torch.float32 else "tf32",
        num_warps=num_warps,
        **stage_consts,
    )


def _staging_launch_args(
    staging: HostStaging | None, chunk_top: Tensor, q: Tensor, max_selected: int
) -> tuple[tuple, dict[str, int]]:
    """The retrieval kernel's staging arguments: 9 tensors, then 9 sizes and strides, and the
    constants (no host tier: placeholders the kernel never reads, ``HAS_HOST_TIER=False``)."""
    if staging is None:
        tensors = (chunk_top,) * 4 + (q,) * 4 + (chunk_top,)
        return tensors + (0,) * 9, {
            "HAS_HOST_TIER": False,
            **dict.fromkeys(("C", "BLOCK_N", "BLOCK_S", "BLOCK_CC", "BLOCK_DK", "BLOCK_DV"), 1),
            "MAX_AGE": _MAX_AGE,
            "SLOT_BITS": _SLOT_BITS,
            "NOT_FREE": _NOT_FREE,
        }
    _check_host_tier(staging.host_k, staging.host_v)
    host_k, host_v, k_entries, v_entries = (
        staging.host_k,
        staging.host_v,
        staging.k_entries,
        staging.v_entries,
    )
    chunk_size = staging.chunk_size
    block_cc = triton.next_power_of_2(chunk_size)
    dim_k, dim_v = k_entries.shape[1], v_entries.shape[1]
    tile = max(16, 4096 // block_cc)
    tensors = (
        staging.staged,
        staging.stage_age,
        staging.host_chunk_ids,
        staging.fixed_values,
        _as_bits(host_k),
        _as_bits(host_v),
        _as_bits(k_entries),
        _as_bits(v_entries),
        staging.moves,
    )
    sizes = (
        dim_k,
        dim_v,
        host_k.stride(0),
        host_k.stride(1),
        host_v.stride(0),
        host_v.stride(1),
        k_entries.stride(0),
        v_entries.stride(0),
        staging.moves.stride(0),
    )
    selected = min(max_selected, staging.max_slots)  # a staging row's NUM_SEL <= STAGE_SLOTS
    return tensors + sizes, {
        "HAS_HOST_TIER": True,
        "C": chunk_size,
        "BLOCK_N": max(16, triton.next_power_of_2(selected)),
        "BLOCK_S": max(16, triton.next_power_of_2(staging.max_slots)),
        "BLOCK_CC": block_cc,
        "BLOCK_DK": min(triton.next_power_of_2(max(dim_k, 1)), tile),
        "BLOCK_DV": min(triton.next_power_of_2(max(dim_v, 1)), tile),
        "MAX_AGE": _MAX_AGE,
        "SLOT_BITS": _SLOT_BITS,
        "NOT_FREE": _NOT_FREE,
    }


def chunk_retrieval_ref(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    bound_channels: Tensor,
    bound_affine: Tensor,
    chunk_scores: Tensor,
    chunk_ids: Tensor,
    chunk_top: Tensor,
    req_pool_indices: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    layer: int,
    blocks_done: Tensor,
    *,
    max_chunks: int,
    max_selected: int,
    staging: HostStaging | None = None,
) -> None:
    """Torch twin of :func:`chunk_retrieval`, the definition (reads row counts on the host: CPU
    path; ``chunk_scores``, ``chunk_ids`` and ``blocks_done`` untouched): per dynamic row, ``qs =
    q[:, ch] * scale`` rounded to the kernel's 16-bit dtype, then exactly in float32 (16-bit
    products are exact) ``max_g (qs+ . kmax + qs- . kmin + q . off)`` over the stored bounds,
    the top ``NUM_SEL`` by a stable sort; then, with ``staging``,
    :func:`~hybridkv_sglang.kernels.host_staging.stage_host_chunks_ref`."""
    _check_retrieval_args(q, kmin, kmax, bound_channels, bound_affine, row_meta, blocks_done)
    _, _, slot, meta = _batch_rows(req_pool_indices, slot_of_row, row_meta, layer, q.shape[0])
    dynamic = torch.nonzero((slot >= 0) & (meta[:, NUM_SEL] > 0)).reshape(-1).tolist()
    low = _LOW.get(kmin.dtype, torch.float32)
    qf = q.float()
    for r in dynamic:
        n, nsel, start, param, top = (
            int(meta[r, f]) for f in (NUM_CHUNKS, NUM_SEL, BOUNDS_START, PARAM_ROW, TOP_START)
        )
        offset, scale = bound_affine[param]
        qr = qf[r][:, bound_channels[param].to(torch.int64)]
        qs = (qr * scale).to(low).float()
        lo, hi = kmin[start : start + n].float(), kmax[start : start + n].float()
        scores = (qs.clamp(min=0) @ hi.T + qs.clamp(max=0) @ lo.T + (qr @ offset)[:, None]).amax(0)
        order = torch.sort(scores, descending=True, stable=True).indices[:nsel]
        chunk_top[top : top + nsel] = order.to(chunk_top.dtype)
    if staging is not None:
        stage_host_chunks_ref(
            req_pool_indices, slot_of_row, row_meta, layer, chunk_top, staging,
            max_selected=max_selected,
        )  # fmt: skip
