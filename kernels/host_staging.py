"""Host-tier chunks staged into device staging slots on the device (graph-safe, no host reads).

``compact`` dynamic heads may keep their retrievable prompt chunks in a pinned host tier
(:mod:`hybridkv_sglang.storage.host_tier`) and only ``STAGE_SLOTS`` chunks' worth of device
entries per (request, layer, kv head): the staging slots. Staging runs inside
:func:`~hybridkv_sglang.kernels.folded_tables.chunk_retrieval`'s one launch (pass it a
:class:`HostStaging`): once a row's selected chunks are in ``chunk_top``, the program that
selected them decides which chunks move, copies them from the host tier into the KV pool, and
rewrites the row's ``chunk_top`` to staging slot numbers, so
:func:`~hybridkv_sglang.kernels.folded_attention.folded_attention` reads staging slot ``s`` (a
``DIRECT`` row) as chunk ``s``: entries ``fixed_values[CHUNK_BASE + (FIRST_CHUNK + s) * C + i]``.
This module holds the rules, the per-row Triton body (:func:`_stage_row`) and the torch twin
:func:`stage_host_chunks_ref`, the definition.

Each row record (``row_meta``, see :mod:`hybridkv_sglang.kernels.folded_tables`) has three
staging fields, :data:`STAGING_ROW_FIELDS` (the last of ``ROW_FIELDS``): ``STAGE_START`` (the
row's range of the ``staged`` / ``stage_age`` arenas), ``STAGE_SLOTS`` (``S``, its staging slots;
0: not a host-tier row) and ``HOST_START`` (its range of ``host_chunk_ids``, one host chunk per
relative chunk ``[0, NUM_CHUNKS)``). A row of ``n = NUM_SEL <= S`` selected chunks (``n > 0``: a
row that selects nothing is not staged, its slots keep their ages):

1. a selected chunk already held by a slot keeps it (hit; the lowest such slot if several);
2. misses, in their ``chunk_top`` order, take the slots that hold none of this step's selected
   chunks in least-recently-used order: empty slots (``-1``) first, then the largest age, then
   the lowest slot index;
3. every used slot holds its chunk and gets age 0; every other slot ages by 1 (saturating at
   ``2**31 - 1``);
4. each miss copies its ``C`` host positions into its slot's entries (``k_entries[e] =
   host_k[host_chunk_ids[HOST_START + chunk], i]``, the same for V), bit for bit;
5. ``chunk_top[TOP_START + j]`` becomes the slot of selected chunk ``j``;
6. ``moves[slot, 0] += misses``, ``moves[slot, 1] += n`` (per request slot, for stats).

Graph safety: one program per (request, kv head) row stages it (the retrieval's last program of
the row), a grid fixed by the batch size; every decision is made in registers from the row's own
ranges (rows never share slots or ranges, so no program reads what another writes); nothing is
allocated and nothing is read back to the host. On CUDA the host tier is read through unified
addressing (pinned CPU tensors), so the copy needs no host-issued ``cudaMemcpy`` either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpret_enabled, triton_runnable

__all__ = [
    "MAX_STAGE_SLOTS",
    "STAGING_ROW_FIELDS",
    "HostStaging",
    "stage_host_chunks_ref",
]

STAGING_ROW_FIELDS = ("STAGE_START", "STAGE_SLOTS", "HOST_START")
"""Row fields staging reads beyond the retrieval's (the last three of ``ROW_FIELDS``)."""

MAX_STAGE_SLOTS = 1024
"""Most staging slots per row (``max_slots``): the LRU order is one register sort of them."""

_MAX_AGE = 0x7FFFFFFF
_SLOT_BITS = 16  # a slot index's bits in the LRU key (MAX_STAGE_SLOTS < 2**16)
_NOT_FREE = 1 << 62  # LRU key of a slot that is not free: after every free slot


@dataclass(frozen=True)
class HostStaging:
    """What staging reads and writes beside the retrieval's arenas, for one layer's call.

    Attributes:
        staged: ``[Z]`` int32, the relative chunk each staging slot holds (``-1``: empty),
            ``STAGE_SLOTS`` per row from ``STAGE_START``; updated.
        stage_age: ``[Z]`` int32, steps since each slot was last used; updated.
        host_chunk_ids: ``[Y]`` int32, host chunk of each relative chunk from ``HOST_START``.
        fixed_values: ``[F]`` int32, folded entries of staging slot ``s`` at
            ``CHUNK_BASE + (FIRST_CHUNK + s) * C + i``.
        host_k, host_v: ``[capacity, C, D]`` / ``[capacity, C, Dv]`` the host tier (pinned CPU,
            read through unified addressing; CPU under the interpreter), KV dtype.
        k_entries, v_entries: ``[E, D]`` / ``[E, Dv]`` the layer's KV pool as folded entries
            (``k_buffer.view(-1, D)``), written at the misses' entries.
        moves: ``[>= slots, 2]`` int64, per request slot: chunks moved, chunks selected
            (accumulated with atomics).
        chunk_size: ``C``, positions per chunk.
        max_slots: at least every row's ``STAGE_SLOTS`` (sizes the registers), at most
            :data:`MAX_STAGE_SLOTS`.
    """

    staged: Tensor
    stage_age: Tensor
    host_chunk_ids: Tensor
    fixed_values: Tensor
    host_k: Tensor
    host_v: Tensor
    k_entries: Tensor
    v_entries: Tensor
    moves: Tensor
    chunk_size: int
    max_slots: int


# ----------------------------------------------------------------------------- per-row body
@triton.jit
def _stage_row(
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
    n,
    num_slots,
    top,
    sstart,
    hstart,
    first,
    cbase,
    dim_k,
    dim_v,
    stride_hk_chunk,
    stride_hk_pos,
    stride_hv_chunk,
    stride_hv_pos,
    stride_k,
    stride_v,
    stride_moves,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MAX_AGE: tl.constexpr,
    SLOT_BITS: tl.constexpr,
    NOT_FREE: tl.constexpr,
):
    """Stage one row (request slot ``slot``, ``n > 0`` chunks selected at ``chunk_top[top:]``,
    ``num_slots`` slots from ``sstart``, 0: not a host-tier row; int64 offsets) by the module's
    rules. Called by the retrieval kernel's program that wrote the row's ``chunk_top``, after a
    barrier (other threads of the program wrote it)."""
    if num_slots > 0:
        offs_n = tl.arange(0, BLOCK_N)
        offs_s = tl.arange(0, BLOCK_S)
        in_n = offs_n < n
        in_s = offs_s < num_slots
        sel = tl.load(top_ptr + top + offs_n, mask=in_n, other=-1)
        held = tl.load(staged_ptr + sstart + offs_s, mask=in_s, other=-1)
        age = tl.load(age_ptr + sstart + offs_s, mask=in_s, other=0)
        # 1. hits: the lowest slot holding each selected chunk
        match = (sel[:, None] == held[None, :]) & in_n[:, None] & (in_s & (held >= 0))[None, :]
        hit_slot = tl.min(tl.where(match, offs_s[None, :], BLOCK_S), axis=1)
        hit = hit_slot < BLOCK_S
        kept = tl.max(((hit_slot[:, None] == offs_s[None, :]) & hit[:, None]).to(tl.int32), 0)
        # 2. misses take the free slots in LRU order (empty, then oldest, then lowest index)
        miss = in_n & ~hit
        miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
        age_key = MAX_AGE - tl.minimum(tl.maximum(age, 0), MAX_AGE)
        key = ((held >= 0).to(tl.int64) << 48) | (age_key.to(tl.int64) << SLOT_BITS)
        key = tl.where(in_s & (kept == 0), key | offs_s.to(tl.int64), NOT_FREE)
        free_slot = (tl.sort(key, dim=0) & ((1 << SLOT_BITS) - 1)).to(tl.int32)
        take = miss_rank[:, None] == offs_s[None, :]
        miss_slot = tl.sum(tl.where(take, free_slot[None, :], 0), axis=1)
        slot_of = tl.where(hit, hit_slot, miss_slot)
        # 3. slots and ages; 5. chunk_top as staging slots
        used = tl.max(((slot_of[:, None] == offs_s[None, :]) & in_n[:, None]).to(tl.int32), 0)
        aged = tl.where(age < MAX_AGE, age + 1, age)
        tl.store(age_ptr + sstart + offs_s, tl.where(used > 0, 0, aged), mask=in_s)
        tl.store(staged_ptr + sstart + slot_of, sel, mask=in_n)
        tl.store(top_ptr + top + offs_n, slot_of, mask=in_n)
        # 6. stats (a request's heads share its counters)
        misses = tl.sum(miss.to(tl.int32), axis=0)
        counters = moves_ptr + slot.to(tl.int64) * stride_moves
        tl.atomic_add(counters, misses.to(tl.int64))
        tl.atomic_add(counters + 1, n.to(tl.int64))
        # 4. copies, one miss at a time: its C positions x a block of channels per pass
        offs_c = tl.arange(0, BLOCK_C)
        in_c = offs_c < C
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = tl.arange(0, BLOCK_DV)
        for m in range(0, misses):
            pick = miss & (miss_rank == m)
            chunk = tl.sum(tl.where(pick, sel, 0), axis=0).to(tl.int64)
            dst = tl.sum(tl.where(pick, slot_of, 0), axis=0).to(tl.int64)
            host_id = tl.load(host_ids_ptr + hstart + chunk).to(tl.int64)
            entry = tl.load(fixed_ptr + cbase + (first + dst) * C + offs_c, mask=in_c, other=0)
            entry = entry.to(tl.int64)
            src_k = host_k_ptr + host_id * stride_hk_chunk + offs_c.to(tl.int64) * stride_hk_pos
            for d0 in range(0, dim_k, BLOCK_DK):
                d = d0 + offs_dk
                mask = in_c[:, None] & (d < dim_k)[None, :]
                x = tl.load(src_k[:, None] + d[None, :], mask=mask)
                tl.store(k_ptr + entry[:, None] * stride_k + d[None, :], x, mask=mask)
            src_v = host_v_ptr + host_id * stride_hv_chunk + offs_c.to(tl.int64) * stride_hv_pos
            for d0 in range(0, dim_v, BLOCK_DV):
                d = d0 + offs_dv
                mask = in_c[:, None] & (d < dim_v)[None, :]
                x = tl.load(src_v[:, None] + d[None, :], mask=mask)
                tl.store(v_ptr + entry[:, None] * stride_v + d[None, :], x, mask=mask)


# ----------------------------------------------------------------------------- validation
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: Tensor) -> Tensor:
    """``t`` viewed as integers of its element size: the copies move bits, never values."""
    return t.view(_BITS[t.element_size()])


def _check_staging(
    row_meta: Tensor, chunk_top: Tensor, staging: HostStaging, max_selected: int
) -> None:
    """Shapes, dtypes and strides of a staging call (``ValueError``: expected X, got Y)."""
    op = "host staging"
    if row_meta.dim() != 4 or row_meta.dtype != torch.int32:
        raise ValueError(
            f"{op}: row_meta: expected int32 [slots, L, H, NF], got {row_meta.dtype} "
            f"{tuple(row_meta.shape)}"
        )
    arenas = {
        "chunk_top": chunk_top,
        "staged": staging.staged,
        "stage_age": staging.stage_age,
        "host_chunk_ids": staging.host_chunk_ids,
        "fixed_values": staging.fixed_values,
    }
    for name, t in arenas.items():
        if t.dim() != 1 or t.dtype != torch.int32:
            raise ValueError(f"{op}: {name}: expected 1-D int32, got {t.dtype} {tuple(t.shape)}")
    chunk_size = staging.chunk_size
    pairs = (("k", staging.host_k, staging.k_entries), ("v", staging.host_v, staging.v_entries))
    for name, host, pool in pairs:
        if host.dim() != 3 or host.shape[1] != chunk_size or host.stride(2) != 1:
            raise ValueError(
                f"{op}: host_{name}: expected [capacity, {chunk_size}, D] with a unit last "
                f"stride, got shape {tuple(host.shape)} strides {tuple(host.stride())}"
            )
        if pool.dim() != 2 or pool.shape[1] != host.shape[2] or pool.stride(1) != 1:
            raise ValueError(
                f"{op}: {name}_entries: expected [E, {host.shape[2]}] with a unit last stride, "
                f"got shape {tuple(pool.shape)} strides {tuple(pool.stride())}"
            )
        if pool.dtype != host.dtype or pool.element_size() not in _BITS:
            raise ValueError(
                f"{op}: {name}_entries, host_{name}: expected one dtype, got {pool.dtype} and "
                f"{host.dtype}"
            )
    moves = staging.moves
    if moves.dim() != 2 or moves.shape[1] != 2 or moves.dtype != torch.int64:
        raise ValueError(
            f"{op}: moves: expected int64 [slots, 2], got {moves.dtype} {tuple(moves.shape)}"
        )
    if moves.shape[0] < row_meta.shape[0] or moves.stride(1) != 1:
        raise ValueError(
            f"{op}: moves: expected >= {row_meta.shape[0]} contiguous rows (one per request "
            f"slot), got shape {tuple(moves.shape)} strides {tuple(moves.stride())}"
        )
    max_slots = staging.max_slots
    if not 1 <= max_slots <= MAX_STAGE_SLOTS or max_selected < 0:
        raise ValueError(
            f"{op}: max_slots, max_selected: expected in [1, {MAX_STAGE_SLOTS}] and >= 0, got "
            f"{max_slots} and {max_selected}"
        )


def _check_host_tier(host_k: Tensor, host_v: Tensor) -> None:
    """Compiled Triton reads a CPU host tier through unified addressing, so it must be pinned."""
    if triton_runnable(host_k, host_v):
        return
    if not interpret_enabled() and host_k.is_pinned() and host_v.is_pinned():
        return
    raise ValueError(
        f"host staging: host_k, host_v: expected pinned CPU or CUDA tensors (CPU under "
        f"TRITON_INTERPRET=1), got {host_k.device} (pinned: {host_k.is_pinned()}) and "
        f"{host_v.device}; call chunk_retrieval_ref instead"
    )


# ----------------------------------------------------------------------------- twin
def stage_host_chunks_ref(
    req_pool_indices: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    layer: int,
    chunk_top: Tensor,
    staging: HostStaging,
    *,
    max_selected: int,
) -> None:
    """``layer``'s host-tier rows staged by the module's rules: the definition, vectorised over
    the staging rows (padded to the largest ``NUM_SEL`` and ``STAGE_SLOTS``), run after the
    retrieval twin wrote ``chunk_top`` (relative chunk ids, distinct, ``NUM_SEL`` per row from
    ``TOP_START``; rewritten with staging slots). Reads row counts on the host (CPU path) and
    raises ``ValueError`` for a row with ``NUM_SEL > STAGE_SLOTS`` or beyond ``max_selected`` /
    ``staging.max_slots``."""
    # imported here: folded_tables imports this module (its retrieval kernel stages rows)
    from .folded_tables import (
        CHUNK_BASE,
        FIRST_CHUNK,
        HOST_START,
        NUM_SEL,
        STAGE_SLOTS,
        STAGE_START,
        TOP_START,
        _batch_rows,
    )

    _check_staging(row_meta, chunk_top, staging, max_selected)
    staged, stage_age, moves = staging.staged, staging.stage_age, staging.moves
    chunk_size, max_slots = staging.chunk_size, staging.max_slots
    rows = req_pool_indices.numel() * row_meta.shape[2]
    if rows == 0:
        return
    _, _, slot, meta = _batch_rows(req_pool_indices, slot_of_row, row_meta, layer, rows)
    live = (slot >= 0) & (meta[:, STAGE_SLOTS] > 0) & (meta[:, NUM_SEL] > 0)
    slot, meta = slot[live], meta[live]
    if slot.numel() == 0:
        return
    n, num_slots = meta[:, NUM_SEL], meta[:, STAGE_SLOTS]
    if bool((n > num_slots).any() | (n > max_selected).any() | (num_slots > max_slots).any()):
        raise ValueError(
            f"host staging: expected NUM_SEL <= STAGE_SLOTS <= max_slots={max_slots} and "
            f"NUM_SEL <= max_selected={max_selected} per staging row, got NUM_SEL "
            f"{n.tolist()} and STAGE_SLOTS {num_slots.tolist()}"
        )
    device = meta.device
    width_n, width_s = max(int(n.max()), 1), int(num_slots.max())
    jn = torch.arange(width_n, device=device)
    js = torch.arange(width_s, device=device)
    in_n, in_s = jn < n[:, None], js < num_slots[:, None]
    top_at = torch.where(in_n, meta[:, TOP_START, None] + jn, 0)
    stage_at = torch.where(in_s, meta[:, STAGE_START, None] + js, 0)
    sel = torch.where(in_n, chunk_top.to(torch.int64)[top_at], -1)
    held = torch.where(in_s, staged.to(torch.int64)[stage_at], -1)
    age = torch.where(in_s, stage_age.to(torch.int64)[stage_at], 0)
    # 1. hits: the lowest slot holding each selected chunk
    match = (sel[:, :, None] == held[:, None, :]) & in_n[:, :, None]
    match &= (in_s & (held >= 0))[:, None, :]
    hit_slot = torch.where(match, js, width_s).amin(dim=2)
    hit = hit_slot < width_s
    kept = ((hit_slot[:, :, None] == js) & hit[:, :, None]).any(dim=1)
    # 2. misses take the free slots in LRU order (empty, then oldest, then lowest index)
    miss = in_n & ~hit
    miss_rank = torch.cumsum(miss.to(torch.int64), dim=1) - 1
    key = ((held >= 0).to(torch.int64) << 48) | ((_MAX_AGE - age.clamp(0, _MAX_AGE)) << _SLOT_BITS)
    key = torch.where(in_s & ~kept, key | js, _NOT_FREE)
    free_slot = torch.sort(key, dim=1).values & ((1 << _SLOT_BITS) - 1)
    miss_slot = free_slot.gather(1, miss_rank.clamp(0, width_s - 1))
    slot_of = torch.where(hit, hit_slot, miss_slot)
    # 3. slots and ages; 5. chunk_top as staging slots
    used = ((slot_of[:, :, None] == js) & in_n[:, :, None]).any(dim=1)
    aged = torch.where(age < _MAX_AGE, age + 1, age)
    stage_age[stage_at[in_s]] = torch.where(used, 0, aged)[in_s].to(stage_age.dtype)
    staged[(meta[:, STAGE_START, None] + slot_of)[in_n]] = sel[in_n].to(staged.dtype)
    chunk_top[top_at[in_n]] = slot_of[in_n].to(chunk_top.dtype)
    # 6. stats
    moves[:, 0].index_add_(0, slot, miss.sum(dim=1).to(moves.dtype))
    moves[:, 1].index_add_(0, slot, n.to(moves.dtype))
    # 4. copies
    row, j = miss.nonzero(as_tuple=True)
    if row.numel() == 0:
        return
    m = meta[row]
    host_id = staging.host_chunk_ids.to(torch.int64)[m[:, HOST_START] + sel[row, j]]
    positions = torch.arange(chunk_size, device=device)
    at = m[:, CHUNK_BASE, None] + (m[:, FIRST_CHUNK, None] + slot_of[row, j, None]) * chunk_size
    entry = staging.fixed_values.to(torch.int64)[at + positions].reshape(-1)
    pairs = ((staging.host_k, staging.k_entries), (staging.host_v, staging.v_entries))
    for host, pool in pairs:
        chunks = host[host_id.to(host.device)].reshape(-1, host.shape[2])
        pool[entry] = chunks.to(pool.device)
