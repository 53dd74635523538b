"""Host-tier chunks staged into device staging slots on the device (graph-safe, no host reads).

``compact`` dynamic heads may keep their retrievable prompt chunks in a pinned host tier
(:mod:`hybridkv_sglang.storage.host_tier`) and only ``STAGE_SLOTS`` chunks' worth of device
entries per (request, layer, kv head): the staging slots. After :func:`chunk_retrieval` wrote a
row's selected chunks, :func:`stage_host_chunks` decides on the device which chunks move, copies
them from the host tier into the KV pool, and rewrites the row's ``chunk_top`` to staging slot
numbers, so :func:`fill_folded_indices` reads staging slot ``s`` (a ``DIRECT`` row) as chunk
``s``: entries ``fixed_values[CHUNK_BASE + (FIRST_CHUNK + s) * C + i]``.

Each row record (``row_meta``, see :mod:`hybridkv_sglang.kernels.folded_tables`) has three
staging fields, :data:`STAGING_ROW_FIELDS` (the last of ``ROW_FIELDS``; their columns are
passed in): ``STAGE_START`` (the row's range of the ``staged`` / ``stage_age`` arenas),
``STAGE_SLOTS`` (``S``, its staging slots; 0: not a host-tier row) and ``HOST_START`` (its range
of ``host_chunk_ids``, one host chunk per relative chunk ``[0, NUM_CHUNKS)``). A row of ``n =
NUM_SEL <= S`` selected chunks:

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

Graph safety: one program per (request, kv head) row, a grid fixed by the batch size; every
decision is made in registers from the row's own ranges (rows never share slots or ranges, so
no program reads what another writes); nothing is allocated and nothing is read back to the
host. On CUDA the host tier is read through unified addressing (pinned CPU tensors), so the
copy needs no host-issued ``cudaMemcpy`` either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpret_enabled, require_triton_device, triton_runnable
from .folded_tables import (
    CHUNK_BASE,
    FIRST_CHUNK,
    NUM_SEL,
    TOP_START,
    _batch_rows,
    _row_record,
)

__all__ = [
    "MAX_STAGE_SLOTS",
    "STAGING_ROW_FIELDS",
    "stage_host_chunks",
    "stage_host_chunks_ref",
]

STAGING_ROW_FIELDS = ("STAGE_START", "STAGE_SLOTS", "HOST_START")
"""Row fields this kernel reads beyond ``ROW_FIELDS`` (their columns are passed as
``stage_start_field``, ``stage_slots_field``, ``host_start_field``)."""

MAX_STAGE_SLOTS = 1024
"""Most staging slots per row (``max_slots``): the LRU order is one register sort of them."""

_MAX_AGE = 0x7FFFFFFF
_SLOT_BITS = 16  # a slot index's bits in the LRU key (MAX_STAGE_SLOTS < 2**16)
_NOT_FREE = 1 << 62  # LRU key of a slot that is not free: after every free slot


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _stage_host_chunks_kernel(
    req_pool_ptr,
    slot_of_row_ptr,
    meta_ptr,
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
    layer,
    num_layers,
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
    C: tl.constexpr,
    F_SEL: tl.constexpr,
    F_FIRST: tl.constexpr,
    F_CBASE: tl.constexpr,
    F_TOP: tl.constexpr,
    F_SSTART: tl.constexpr,
    F_SSLOTS: tl.constexpr,
    F_HSTART: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MAX_AGE: tl.constexpr,
    SLOT_BITS: tl.constexpr,
    NOT_FREE: tl.constexpr,
):
    """One program per (request, kv head) row; rows that stage nothing exit at once."""
    r = tl.program_id(0)
    slot, base = _row_record(req_pool_ptr, slot_of_row_ptr, meta_ptr, r, layer, num_layers, H, NF_)
    num_slots = tl.load(meta_ptr + base + F_SSLOTS, mask=slot >= 0, other=0)
    if num_slots > 0:
        n = tl.load(meta_ptr + base + F_SEL)
        top = tl.load(meta_ptr + base + F_TOP).to(tl.int64)
        sstart = tl.load(meta_ptr + base + F_SSTART).to(tl.int64)
        hstart = tl.load(meta_ptr + base + F_HSTART).to(tl.int64)
        first = tl.load(meta_ptr + base + F_FIRST).to(tl.int64)
        cbase = tl.load(meta_ptr + base + F_CBASE).to(tl.int64)
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


def _check_args(
    row_meta: Tensor,
    arenas: dict[str, Tensor],
    host_k: Tensor,
    host_v: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    moves: Tensor,
    fields: tuple[int, int, int],
    chunk_size: int,
    max_slots: int,
    max_selected: int,
) -> None:
    op = "stage_host_chunks"
    if row_meta.dim() != 4 or row_meta.dtype != torch.int32:
        raise ValueError(
            f"{op}: row_meta: expected int32 [slots, L, H, NF], got {row_meta.dtype} "
            f"{tuple(row_meta.shape)}"
        )
    nf = row_meta.shape[3]
    for name, f in zip(STAGING_ROW_FIELDS, fields, strict=True):
        if not 0 <= f < nf:
            raise ValueError(f"{op}: {name} column: expected in [0, {nf}), got {f}")
    for name, t in arenas.items():
        if t.dim() != 1 or t.dtype != torch.int32:
            raise ValueError(f"{op}: {name}: expected 1-D int32, got {t.dtype} {tuple(t.shape)}")
    for name, host, pool in (("k", host_k, k_entries), ("v", host_v, v_entries)):
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
    if moves.dim() != 2 or moves.shape[1] != 2 or moves.dtype != torch.int64:
        raise ValueError(
            f"{op}: moves: expected int64 [slots, 2], got {moves.dtype} {tuple(moves.shape)}"
        )
    if moves.shape[0] < row_meta.shape[0] or moves.stride(1) != 1:
        raise ValueError(
            f"{op}: moves: expected >= {row_meta.shape[0]} contiguous rows (one per request "
            f"slot), got shape {tuple(moves.shape)} strides {tuple(moves.stride())}"
        )
    if not 1 <= max_slots <= MAX_STAGE_SLOTS or not 0 <= max_selected <= MAX_STAGE_SLOTS:
        raise ValueError(
            f"{op}: max_slots, max_selected: expected in [1, {MAX_STAGE_SLOTS}] and "
            f"[0, {MAX_STAGE_SLOTS}], got {max_slots} and {max_selected}"
        )


def _check_host_tier(host_k: Tensor, host_v: Tensor) -> None:
    """Compiled Triton reads a CPU host tier through unified addressing, so it must be pinned."""
    if triton_runnable(host_k, host_v):
        return
    if not interpret_enabled() and host_k.is_pinned() and host_v.is_pinned():
        return
    raise ValueError(
        f"stage_host_chunks: host_k, host_v: expected pinned CPU or CUDA tensors (CPU under "
        f"TRITON_INTERPRET=1), got {host_k.device} (pinned: {host_k.is_pinned()}) and "
        f"{host_v.device}; call stage_host_chunks_ref instead"
    )


# ----------------------------------------------------------------------------- entry points
def stage_host_chunks(
    req_pool_indices: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    layer: int,
    chunk_top: Tensor,
    staged: Tensor,
    stage_age: Tensor,
    host_chunk_ids: Tensor,
    fixed_values: Tensor,
    host_k: Tensor,
    host_v: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    moves: Tensor,
    *,
    chunk_size: int,
    stage_start_field: int,
    stage_slots_field: int,
    host_start_field: int,
    max_slots: int,
    max_selected: int,
) -> None:
    """Stage ``layer``'s selected host-tier chunks into their rows' staging slots (one launch).

    Runs after :func:`chunk_retrieval` and before :func:`fill_folded_indices` of the layer; the
    rules are in the module docstring. No host sync, no allocation.

    Args:
        req_pool_indices: ``[B]`` int64, the batch's ``req_to_token`` rows (graph padding: a
            row whose slot is ``-1``).
        slot_of_row: ``[P]`` int32, request slot of each pool row, ``-1``: none.
        row_meta: ``[slots, L, H_kv, NF]`` int32 row records with the staging fields.
        chunk_top: ``[T]`` int32, read (relative chunk ids, distinct, ``NUM_SEL`` per row from
            ``TOP_START``) and rewritten with staging slots.
        staged: ``[Z]`` int32, the relative chunk each staging slot holds (``-1``: empty),
            ``STAGE_SLOTS`` per row from ``STAGE_START``; updated.
        stage_age: ``[Z]`` int32, steps since each slot was last used; updated.
        host_chunk_ids: ``[Y]`` int32, host chunk of each relative chunk from ``HOST_START``.
        fixed_values: ``[F]`` int32, folded entries of staging slot ``s`` at
            ``CHUNK_BASE + (FIRST_CHUNK + s) * C + i``.
        host_k, host_v: ``[capacity, C, D]`` / ``[capacity, C, Dv]`` the host tier (pinned CPU,
            read through unified addressing; CPU under the interpreter), KV dtype.
        k_entries, v_entries: ``[E, D]`` / ``[E, Dv]`` this layer's KV pool as folded entries
            (``k_buffer.view(-1, D)``), written at the misses' entries.
        moves: ``[>= slots, 2]`` int64, per request slot: chunks moved, chunks selected
            (accumulated with atomics).
        chunk_size: ``C``, positions per chunk.
        stage_start_field, stage_slots_field, host_start_field: columns of ``row_meta`` holding
            ``STAGE_START``, ``STAGE_SLOTS``, ``HOST_START``.
        max_slots: at least every row's ``STAGE_SLOTS`` (sizes the registers), at most
            :data:`MAX_STAGE_SLOTS`.
        max_selected: at least every staging row's ``NUM_SEL``.
    """
    fields = (stage_start_field, stage_slots_field, host_start_field)
    arenas = {
        "chunk_top": chunk_top,
        "staged": staged,
        "stage_age": stage_age,
        "host_chunk_ids": host_chunk_ids,
        "fixed_values": fixed_values,
    }
    _check_args(
        row_meta,
        arenas,
        host_k,
        host_v,
        k_entries,
        v_entries,
        moves,
        fields,
        chunk_size,
        max_slots,
        max_selected,
    )
    require_triton_device(
        "stage_host_chunks",
        req_pool_indices,
        slot_of_row,
        row_meta,
        *arenas.values(),
        k_entries,
        v_entries,
        moves,
    )
    _check_host_tier(host_k, host_v)
    heads = row_meta.shape[2]
    rows = req_pool_indices.numel() * heads
    if rows == 0:
        return
    block_c = triton.next_power_of_2(chunk_size)
    dim_k, dim_v = k_entries.shape[1], v_entries.shape[1]
    tile = max(16, 4096 // block_c)
    _stage_host_chunks_kernel[(rows,)](
        req_pool_indices,
        slot_of_row,
        row_meta,
        chunk_top,
        staged,
        stage_age,
        host_chunk_ids,
        fixed_values,
        _as_bits(host_k),
        _as_bits(host_v),
        _as_bits(k_entries),
        _as_bits(v_entries),
        moves,
        layer,
        row_meta.shape[1],
        dim_k,
        dim_v,
        host_k.stride(0),
        host_k.stride(1),
        host_v.stride(0),
        host_v.stride(1),
        k_entries.stride(0),
        v_entries.stride(0),
        moves.stride(0),
        H=heads,
        NF_=row_meta.shape[3],
        C=chunk_size,
        F_SEL=NUM_SEL,
        F_FIRST=FIRST_CHUNK,
        F_CBASE=CHUNK_BASE,
        F_TOP=TOP_START,
        F_SSTART=stage_start_field,
        F_SSLOTS=stage_slots_field,
        F_HSTART=host_start_field,
        BLOCK_N=max(16, triton.next_power_of_2(max_selected)),
        BLOCK_S=max(16, triton.next_power_of_2(max_slots)),
        BLOCK_C=block_c,
        BLOCK_DK=min(triton.next_power_of_2(max(dim_k, 1)), tile),
        BLOCK_DV=min(triton.next_power_of_2(max(dim_v, 1)), tile),
        MAX_AGE=_MAX_AGE,
        SLOT_BITS=_SLOT_BITS,
        NOT_FREE=_NOT_FREE,
    )


def stage_host_chunks_ref(
    req_pool_indices: Tensor,
    slot_of_row: Tensor,
    row_meta: Tensor,
    layer: int,
    chunk_top: Tensor,
    staged: Tensor,
    stage_age: Tensor,
    host_chunk_ids: Tensor,
    fixed_values: Tensor,
    host_k: Tensor,
    host_v: Tensor,
    k_entries: Tensor,
    v_entries: Tensor,
    moves: Tensor,
    *,
    chunk_size: int,
    stage_start_field: int,
    stage_slots_field: int,
    host_start_field: int,
    max_slots: int,
    max_selected: int,
) -> None:
    """Torch twin of :func:`stage_host_chunks`, the definition, vectorised over the staging rows
    (padded to the largest ``NUM_SEL`` and ``STAGE_SLOTS``). Reads row counts on the host (CPU
    path) and raises ``ValueError`` for a row with ``NUM_SEL > STAGE_SLOTS`` or beyond
    ``max_selected`` / ``max_slots``."""
    fields = (stage_start_field, stage_slots_field, host_start_field)
    arenas = {
        "chunk_top": chunk_top,
        "staged": staged,
        "stage_age": stage_age,
        "host_chunk_ids": host_chunk_ids,
        "fixed_values": fixed_values,
    }
    _check_args(
        row_meta,
        arenas,
        host_k,
        host_v,
        k_entries,
        v_entries,
        moves,
        fields,
        chunk_size,
        max_slots,
        max_selected,
    )
    rows = req_pool_indices.numel() * row_meta.shape[2]
    if rows == 0:
        return
    _, _, slot, meta = _batch_rows(req_pool_indices, slot_of_row, row_meta, layer, rows)
    live = (slot >= 0) & (meta[:, stage_slots_field] > 0)
    slot, meta = slot[live], meta[live]
    if slot.numel() == 0:
        return
    n, num_slots = meta[:, NUM_SEL], meta[:, stage_slots_field]
    if bool((n > num_slots).any() | (n > max_selected).any() | (num_slots > max_slots).any()):
        raise ValueError(
            f"stage_host_chunks: expected NUM_SEL <= STAGE_SLOTS <= max_slots={max_slots} and "
            f"NUM_SEL <= max_selected={max_selected} per staging row, got NUM_SEL "
            f"{n.tolist()} and STAGE_SLOTS {num_slots.tolist()}"
        )
    device = meta.device
    width_n, width_s = max(int(n.max()), 1), int(num_slots.max())
    jn = torch.arange(width_n, device=device)
    js = torch.arange(width_s, device=device)
    in_n, in_s = jn < n[:, None], js < num_slots[:, None]
    top_at = torch.where(in_n, meta[:, TOP_START, None] + jn, 0)
    stage_at = torch.where(in_s, meta[:, stage_start_field, None] + js, 0)
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
    staged[(meta[:, stage_start_field, None] + slot_of)[in_n]] = sel[in_n].to(staged.dtype)
    chunk_top[top_at[in_n]] = slot_of[in_n].to(chunk_top.dtype)
    # 6. stats
    moves[:, 0].index_add_(0, slot, miss.sum(dim=1).to(moves.dtype))
    moves[:, 1].index_add_(0, slot, n.to(moves.dtype))
    # 4. copies
    row, j = miss.nonzero(as_tuple=True)
    if row.numel() == 0:
        return
    m = meta[row]
    host_id = host_chunk_ids.to(torch.int64)[m[:, host_start_field] + sel[row, j]]
    positions = torch.arange(chunk_size, device=device)
    at = m[:, CHUNK_BASE, None] + (m[:, FIRST_CHUNK, None] + slot_of[row, j, None]) * chunk_size
    entry = fixed_values.to(torch.int64)[at + positions].reshape(-1)
    for host, pool in ((host_k, k_entries), (host_v, v_entries)):
        chunks = host[host_id.to(host.device)].reshape(-1, host.shape[2])
        pool[entry] = chunks.to(pool.device)
