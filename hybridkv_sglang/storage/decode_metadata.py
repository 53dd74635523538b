"""Per-request decode metadata on the device, written once per request.

When a request's compression finishes (and again when compact storage moves its KV), what its
decode rows read is written into pools allocated at start-up: one record of
:data:`~hybridkv_sglang.kernels.folded_tables.ROW_FIELDS` per (slot, layer, kv head), the
request's fixed values (kept positions, or compact entry ids) in an int32 arena, its dynamic
heads' chunk key bounds (``r`` columns per chunk, uint8 codes or KV-dtype values) in a bounds
arena, one row per dynamic head of bound parameters (each column's key channel, offset and
scale) in two parameter arenas, and each dynamic head's retrieval scratch (its candidates'
scores and ids, its selected chunk ids) in a candidate and a top arena, exactly what the cost
model charges (:meth:`~hybridkv_sglang.policy.byte_cost.ByteCosts.scratch_bytes`).
:class:`PoolSizing` sizes the arenas per entry of SGLang's KV pool, and counts them in its
bytes per token. ``slot_of_row`` maps SGLang's ``req_to_token`` rows to
slots, so a decode step finds its requests' metadata from ``req_pool_indices`` alone, on the
device, inside a CUDA graph (:mod:`hybridkv_sglang.kernels.folded_tables`).

Host mirrors (numpy, never a device read) say which pool rows are compressed and how many table
entries they add, so the host can pick the graph variant and check the table buffer's fit in
microseconds. A released row is cleared on the device at the next forward's metadata step, on
the forward stream, after every forward already queued has read it (pitfalls 5 and 9).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    CAND_START,
    CHUNK_BASE,
    DIRECT,
    FIRST_CHUNK,
    FIXED_START,
    HOST_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    POST_LEN,
    POST_START,
    PRE_LEN,
    STAGE_SLOTS,
    STAGE_START,
    TAIL_START,
    TOP_START,
)
from hybridkv_sglang.policy.byte_cost import (
    CANDIDATE_BLOCK,
    CANDIDATE_BYTES,
    SELECTED_BYTES,
    ByteCosts,
    scratch_slots,
)
from hybridkv_sglang.storage.compact_layout import CompactLayout, dynamic_row_locals
from hybridkv_sglang.storage.compressed_layout import CompressedLayout

STAGE_SLOT_BYTES = 8
"""A host-tier staging slot's state on the device: the chunk it holds and its age (int32 each)."""
HOST_ID_BYTES = 4
"""A host-tier row's host chunk id per retrievable chunk (int32)."""


@dataclass(frozen=True)
class RequestRows:
    """One request's decode rows, ready to be written (offsets relative to its own ranges)."""

    meta: Tensor
    """``[L, H_kv, NF]`` int32 CPU; ``FIXED_START``/``POST_START``/``CHUNK_BASE`` index
    :attr:`fixed_values`, ``BOUNDS_START`` indexes :attr:`kmin`, ``PARAM_ROW``
    :attr:`bound_channels` and :attr:`bound_affine`, ``CAND_START`` and ``TOP_START`` the
    request's :attr:`candidate_slots` and :attr:`top_slots` (scratch: no values to write),
    ``STAGE_START`` its :attr:`stage_slots` (host-tier staging state, written empty) and
    ``HOST_START`` :attr:`host_chunk_ids`."""
    fixed_values: Tensor
    """``[F]`` int32 device."""
    kmin: Tensor
    """``[J, r]`` device, the dynamic rows' chunk key minima (codes or values), row after row."""
    kmax: Tensor
    bound_channels: Tensor
    """``[P, r]`` int32 device, one row per dynamic row: the key channel of each column."""
    bound_affine: Tensor
    """``[P, 2, r]`` float32 device: each column's offset (``[:, 0]``) and scale (``[:, 1]``)."""
    prompt_len: int
    chunk_size: int
    host_chunk_ids: Tensor = dataclasses.field(
        default_factory=lambda: torch.empty(0, dtype=torch.int32)
    )
    """``[M]`` int32 device: the host-tier chunk of each retrievable chunk of each host-tier
    dynamic row, row after row (empty: no row on the host tier)."""

    @property
    def device_bytes(self) -> int:
        """What the request's rows take in the pools: fixed values, chunk bounds and their
        parameters, retrieval scratch, staging state and host chunk ids (records aside)."""
        tensors = (self.fixed_values, self.kmin, self.kmax, self.bound_channels, self.bound_affine)
        held = sum(t.numel() * t.element_size() for t in tensors)
        scratch = CANDIDATE_BYTES * self.candidate_slots + SELECTED_BYTES * self.top_slots
        host_ids = HOST_ID_BYTES * self.host_chunk_ids.numel()
        return held + scratch + STAGE_SLOT_BYTES * self.stage_slots + host_ids

    @property
    def stage_slots(self) -> int:
        """Staging slots of the request's host-tier dynamic rows (the end of their ranges)."""
        m = self.meta.to(torch.int64)
        return int((m[..., STAGE_START] + m[..., STAGE_SLOTS]).max()) if m.numel() else 0

    @property
    def prompt_entries(self) -> int:
        """Table entries of the prompt part (all but the decode tail) in the widest layer."""
        m = self.meta.to(torch.int64)
        prompt = m[..., PRE_LEN] + m[..., NUM_SEL] * self.chunk_size + m[..., POST_LEN]
        prompt = prompt - m[..., TAIL_START] + self.prompt_len
        return int(prompt.sum(dim=1).max()) if m.numel() else 0

    @property
    def candidate_slots(self) -> int:
        """Candidate scratch slots the request's dynamic rows need (the end of their ranges)."""
        m = self.meta.to(torch.int64)
        candidates, _ = scratch_slots(m[..., NUM_CHUNKS], m[..., NUM_SEL])
        return int((m[..., CAND_START] + candidates).max()) if m.numel() else 0

    @property
    def top_slots(self) -> int:
        """``chunk_top`` slots the request's dynamic rows need (the end of their ranges)."""
        m = self.meta.to(torch.int64)
        return int((m[..., TOP_START] + m[..., NUM_SEL]).max()) if m.numel() else 0


def request_rows(plan: CompressedLayout, compact: CompactLayout | None = None) -> RequestRows:
    """The decode rows of a request's layout, in place or over its ``compact`` entries (once
    per request)."""
    dyn = plan.dynamic_rows
    heads, layers = plan.num_kv_heads, len(plan.layers)
    meta = torch.zeros(layers, heads, NF, dtype=torch.int32)
    values: list[Tensor] = []
    kmins: list[Tensor] = []
    kmaxs: list[Tensor] = []
    channels: list[Tensor] = []
    affines: list[Tensor] = []
    used = bounds = candidates = tops = stages = host_at = 0
    host_ids: list[Tensor] = []
    staging = 0 if compact is None else compact.staging_slots
    n_sel = dyn.num_selected(plan.top_k_chunks)
    row_candidates, row_tops = scratch_slots(dyn.num_chunks, n_sel)
    for layer, lay in enumerate(plan.layers):
        stored = None if compact is None else compact.layers[layer]
        kept = lay.static_kept if stored is None else stored.static_entries
        bounds_host = kept.indptr_host.tolist()  # host mirror: one read per layer, no sync
        for i, h in enumerate(lay.static_heads.tolist()):
            lo, hi = bounds_host[i], bounds_host[i + 1]
            values.append(kept.positions[lo:hi])
            row = meta[layer, h]
            row[FIXED_START], row[PRE_LEN], row[TAIL_START] = used, hi - lo, plan.prompt_len
            row[DIRECT] = int(compact is not None)
            used += hi - lo
        for j, h in enumerate(lay.dynamic_heads.tolist()):
            assert lay.chunk_kmin is not None and lay.chunk_kmax is not None
            assert lay.bound_channels is not None and lay.bound_offset is not None
            assert lay.bound_scale is not None
            row = meta[layer, h]
            row[NUM_SEL], row[NUM_CHUNKS], row[FIRST_CHUNK] = n_sel, dyn.num_chunks, dyn.first_chunk
            row[BOUNDS_START], row[PARAM_ROW] = bounds, len(channels)
            row[CAND_START], row[TOP_START] = candidates, tops
            candidates += row_candidates
            tops += row_tops
            kmins.append(lay.chunk_kmin[j])
            kmaxs.append(lay.chunk_kmax[j])
            channels.append(lay.bound_channels[j])
            affines.append(torch.stack([lay.bound_offset[j], lay.bound_scale[j]]))
            bounds += dyn.num_chunks
            row[FIXED_START], row[PRE_LEN] = used, dyn.prefix_end
            if stored is None:
                values.append(torch.arange(dyn.prefix_end, device=kept.device))
                row[TAIL_START] = dyn.tail_start
                used += dyn.prefix_end
                continue
            region = stored.dynamic_regions[j]
            on_host = stored.host_chunks is not None
            _, window_start, window_end = dynamic_row_locals(dyn, staging if on_host else None)
            if on_host:
                row[STAGE_START], row[STAGE_SLOTS], row[HOST_START] = stages, staging, host_at
                host_ids.append(stored.host_chunks[j])
                stages += staging
                host_at += dyn.num_chunks
            values.append(region)
            row[POST_START], row[POST_LEN] = used + window_start, window_end - window_start
            row[CHUNK_BASE], row[TAIL_START], row[DIRECT] = used, plan.prompt_len, 1
            used += region.numel()
    device = plan.layers[0].static_kept.device if layers else torch.device("cpu")
    fixed = (
        torch.cat([v.to(device=device, dtype=torch.int32) for v in values])
        if values
        else torch.empty(0, dtype=torch.int32, device=device)
    )
    if not kmins:
        kmin = torch.empty(0, 0, device=device)
        no_params = torch.empty(0, 0, dtype=torch.int32, device=device)
        no_affine = torch.empty(0, 2, 0, device=device)
        return RequestRows(
            meta, fixed, kmin, kmin, no_params, no_affine, plan.prompt_len, dyn.chunk_size
        )
    return RequestRows(
        meta,
        fixed,
        torch.cat(kmins),
        torch.cat(kmaxs),
        torch.stack(channels).to(device=device, dtype=torch.int32),
        torch.stack(affines).to(device=device, dtype=torch.float32),
        plan.prompt_len,
        dyn.chunk_size,
        torch.cat(host_ids).to(device=device, dtype=torch.int32)
        if host_ids
        else torch.empty(0, dtype=torch.int32, device=device),
    )


class RangeAllocator:
    """First-fit ranges of ``[0, capacity)`` (host bookkeeping of one arena)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []

    def alloc(self, size: int) -> int | None:
        """Start of a free range of ``size``, or ``None`` when none is left."""
        if size == 0:
            return 0
        for i, (start, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, length - size)
                return start
        return None

    def free(self, start: int, size: int) -> None:
        if size == 0:
            return
        self._free.append((start, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    @property
    def free_size(self) -> int:
        return sum(n for _, n in self._free)


def _alloc_all(arenas: tuple[RangeAllocator, ...], sizes: tuple[int, ...]) -> list[int] | None:
    """A range of each size from its arena, all or none."""
    starts: list[int] = []
    for arena, size in zip(arenas, sizes, strict=True):
        at = arena.alloc(size)
        if at is None:
            for taken, n, start in zip(arenas, sizes, starts, strict=False):  # the ones taken
                taken.free(start, n)
            return None
        starts.append(at)
    return starts


@dataclass(frozen=True)
class _Held:
    slot: int
    fixed: tuple[int, int]
    bounds: tuple[int, int]
    params: tuple[int, int]
    candidates: tuple[int, int]
    tops: tuple[int, int]
    stages: tuple[int, int]
    host_ids: tuple[int, int]


class DecodeMetadata:
    """The device pools of one scheduler process (sizes fixed at start-up).

    ``bound_width`` (``r``) and ``bound_dtype`` (uint8 codes or the KV dtype) are the server's
    (the config's), the same for every request; ``bound_capacity`` counts chunks,
    ``param_capacity`` dynamic rows, ``candidate_capacity`` and ``top_capacity`` the retrieval
    scratch's slots (:func:`~hybridkv_sglang.policy.byte_cost.scratch_slots` per dynamic row).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        bound_width: int,
        *,
        max_requests: int,
        pool_rows: int,
        fixed_capacity: int,
        bound_capacity: int,
        param_capacity: int,
        candidate_capacity: int,
        top_capacity: int,
        bound_dtype: torch.dtype,
        device: torch.device | str,
        stage_capacity: int = 0,
        host_id_capacity: int = 0,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.device = torch.device(device)
        self.slot_of_row = torch.full((pool_rows,), -1, dtype=torch.int32, device=device)
        self.row_meta = torch.zeros(
            max_requests, num_layers, num_kv_heads, NF, dtype=torch.int32, device=device
        )
        self.fixed_values = torch.zeros(max(fixed_capacity, 1), dtype=torch.int32, device=device)
        self.kmin = torch.zeros(
            max(bound_capacity, 1), bound_width, dtype=bound_dtype, device=device
        )
        self.kmax = torch.zeros_like(self.kmin)
        params = max(param_capacity, 1)
        self.bound_channels = torch.zeros(params, bound_width, dtype=torch.int32, device=device)
        self.bound_affine = torch.zeros(params, 2, bound_width, dtype=torch.float32, device=device)
        candidates = max(candidate_capacity, 1)
        self.chunk_scores = torch.zeros(candidates, dtype=torch.float32, device=device)
        self.chunk_ids = torch.zeros(candidates, dtype=torch.int32, device=device)
        self.chunk_top = torch.zeros(max(top_capacity, 1), dtype=torch.int32, device=device)
        stages = max(stage_capacity, 1)
        self.staged = torch.full((stages,), -1, dtype=torch.int32, device=device)
        """Host-tier rows: the chunk each staging slot holds (-1: empty)."""
        self.stage_age = torch.zeros(stages, dtype=torch.int32, device=device)
        """Host-tier rows: steps since each staging slot was last read."""
        self.host_chunk_ids = torch.zeros(
            max(host_id_capacity, 1), dtype=torch.int32, device=device
        )
        self.moves = torch.zeros(max_requests, 2, dtype=torch.int64, device=device)
        """Per request slot: host-tier chunks moved and chunks selected, over its decode."""
        self.prompt_lens = np.zeros(pool_rows, dtype=np.int64)
        """Host mirror: each compressed row's prompt length (0: the row is dense)."""
        self.num_chunks = np.zeros(pool_rows, dtype=np.int64)
        """Host mirror: each row's most retrievable chunks of a dynamic row (0: none)."""
        self.num_selected = np.zeros(pool_rows, dtype=np.int64)
        """Host mirror: each row's most chunks retrieved per step by a dynamic row."""
        self.compact_rows = np.zeros(pool_rows, dtype=np.bool_)
        """Host mirror: rows whose request reads compact entries (no dense prefix to fall back
        on)."""
        self.version = 0
        """Bumped whenever a host mirror changes: lookups over a batch hold while it stays."""
        self._lock = threading.Lock()
        self._free_slots = list(range(max_requests - 1, -1, -1))
        self._fixed = RangeAllocator(fixed_capacity)
        self._bounds = RangeAllocator(bound_capacity)
        self._params = RangeAllocator(param_capacity)
        self._candidates = RangeAllocator(candidate_capacity)
        self._tops = RangeAllocator(top_capacity)
        self._stages = RangeAllocator(stage_capacity)
        self._host_ids = RangeAllocator(host_id_capacity)
        self._held: dict[int, _Held] = {}
        self._pending_clear: list[int] = []

    @property
    def nbytes(self) -> int:
        tensors = (
            self.slot_of_row,
            self.row_meta,
            self.fixed_values,
            self.kmin,
            self.kmax,
            self.bound_channels,
            self.bound_affine,
            self.chunk_scores,
            self.chunk_ids,
            self.chunk_top,
            self.staged,
            self.stage_age,
            self.host_chunk_ids,
            self.moves,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def live_requests(self) -> int:
        """Requests held (read without the lock: a dict's length is one atomic read, and a
        decode batch asks every step)."""
        return len(self._held)

    def usage(self) -> dict[str, int]:
        """Live requests and free / total capacity of each pool (stats; leak checks)."""
        with self._lock:
            return {
                "requests": len(self._held),
                "free_slots": len(self._free_slots),
                "slots": self.row_meta.shape[0],
                "free_fixed_values": self._fixed.free_size,
                "fixed_values": self._fixed.capacity,
                "free_chunk_bounds": self._bounds.free_size,
                "chunk_bounds": self._bounds.capacity,
                "free_param_rows": self._params.free_size,
                "param_rows": self._params.capacity,
                "free_candidate_slots": self._candidates.free_size,
                "candidate_slots": self._candidates.capacity,
                "free_top_slots": self._tops.free_size,
                "top_slots": self._tops.capacity,
                "free_stage_slots": self._stages.free_size,
                "stage_slots": self._stages.capacity,
                "free_host_chunk_ids": self._host_ids.free_size,
                "host_chunk_ids": self._host_ids.capacity,
            }

    def add(self, pool_row: int, rows: RequestRows) -> bool:
        """Write ``rows`` for ``pool_row`` (replacing what it held); ``False`` when the pools
        are full (the request is then served dense). Device writes go on the current stream:
        call on the forward stream."""
        fixed, bounds = rows.fixed_values.numel(), rows.kmin.shape[0]
        params = rows.bound_channels.shape[0]
        width = self.kmin.shape[1]
        if bounds and (rows.kmin.dtype != self.kmin.dtype or rows.kmin.shape[1] != width):
            raise ValueError(
                f"chunk bounds: expected {self.kmin.dtype} [chunks, {width}] (the server's), got "
                f"{rows.kmin.dtype} {tuple(rows.kmin.shape)}"
            )
        candidates, tops, stages = rows.candidate_slots, rows.top_slots, rows.stage_slots
        host_ids = rows.host_chunk_ids.numel()
        sizes = (fixed, bounds, params, candidates, tops, stages, host_ids)
        arenas = (
            self._fixed,
            self._bounds,
            self._params,
            self._candidates,
            self._tops,
            self._stages,
            self._host_ids,
        )
        with self._lock:
            if not self._free_slots:
                return False
            starts = _alloc_all(arenas, sizes)
            if starts is None:
                return False
            fixed_at, bounds_at, params_at, candidates_at, tops_at, stages_at, host_at = starts
            slot = self._free_slots.pop()
            old = self._held.pop(pool_row, None)
            self._held[pool_row] = _Held(
                slot,
                (fixed_at, fixed),
                (bounds_at, bounds),
                (params_at, params),
                (candidates_at, candidates),
                (tops_at, tops),
                (stages_at, stages),
                (host_at, host_ids),
            )
            if old is not None:
                self._give_back(old)
            if pool_row in self._pending_clear:
                self._pending_clear.remove(pool_row)
        meta = rows.meta.clone()
        for field, shift in (
            (FIXED_START, fixed_at),
            (POST_START, fixed_at),
            (CHUNK_BASE, fixed_at),
            (BOUNDS_START, bounds_at),
            (PARAM_ROW, params_at),
            (CAND_START, candidates_at),
            (TOP_START, tops_at),
            (STAGE_START, stages_at),
            (HOST_START, host_at),
        ):
            meta[..., field] += shift
        self.row_meta[slot].copy_(meta, non_blocking=True)
        self.fixed_values[fixed_at : fixed_at + fixed].copy_(rows.fixed_values)
        if bounds:
            self.kmin[bounds_at : bounds_at + bounds].copy_(rows.kmin)
            self.kmax[bounds_at : bounds_at + bounds].copy_(rows.kmax)
        if params:
            self.bound_channels[params_at : params_at + params].copy_(rows.bound_channels)
            self.bound_affine[params_at : params_at + params].copy_(rows.bound_affine)
        if stages:
            self.staged[stages_at : stages_at + stages].fill_(-1)
            self.stage_age[stages_at : stages_at + stages].zero_()
        if host_ids:
            self.host_chunk_ids[host_at : host_at + host_ids].copy_(rows.host_chunk_ids)
        self.moves[slot].zero_()
        self.slot_of_row[pool_row] = slot
        self.prompt_lens[pool_row] = rows.prompt_len
        self.num_chunks[pool_row] = int(rows.meta[..., NUM_CHUNKS].max())
        self.num_selected[pool_row] = int(rows.meta[..., NUM_SEL].max())
        self.compact_rows[pool_row] = bool(rows.meta[..., DIRECT].any())
        self.version += 1
        return True

    def release(self, pool_row: int) -> None:
        """Forget ``pool_row`` (host now; the device row is cleared by :meth:`apply_releases`)."""
        with self._lock:
            held = self._held.pop(pool_row, None)
            if held is None:
                return
            self._give_back(held)
            self._pending_clear.append(pool_row)
            self.prompt_lens[pool_row] = 0
            self.num_chunks[pool_row] = 0
            self.num_selected[pool_row] = 0
            self.compact_rows[pool_row] = False
            self.version += 1

    def table_bounds(self, pool_row: int) -> tuple[int, int]:
        """Host mirror: a row's most chunks and most selected chunks of a dynamic row (both 0
        for a dense row)."""
        return int(self.num_chunks[pool_row]), int(self.num_selected[pool_row])

    def set_table_bounds(self, pool_row: int, num_chunks: int, num_selected: int) -> None:
        """Raise a compressed row's host-mirror bounds to values agreed across tensor-parallel
        ranks (the max over their heads), so every rank sizes a batch, and so picks graph or
        eager, alike. Upper bounds: the tables are built from the device records."""
        with self._lock:
            if pool_row not in self._held:
                raise ValueError(f"pool row {pool_row} holds no compressed request")
        self.num_chunks[pool_row] = max(num_chunks, int(self.num_chunks[pool_row]))
        self.num_selected[pool_row] = max(num_selected, int(self.num_selected[pool_row]))
        self.version += 1

    def apply_releases(self) -> None:
        """Clear released rows on the device (one op, only when there are any)."""
        if not self._pending_clear:  # the common case: no lock, no op
            return
        with self._lock:
            rows, self._pending_clear = self._pending_clear, []
        if rows:
            index = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
            self.slot_of_row.index_fill_(0, index, -1)

    def _give_back(self, held: _Held) -> None:
        self._free_slots.append(held.slot)
        self._fixed.free(*held.fixed)
        self._bounds.free(*held.bounds)
        self._params.free(*held.params)
        self._candidates.free(*held.candidates)
        self._tops.free(*held.tops)
        self._stages.free(*held.stages)
        self._host_ids.free(*held.host_ids)

    @property
    def compressed_rows(self) -> np.ndarray:
        """Host mirror: pool rows whose request decodes over these tables."""
        return self.prompt_lens > 0

    def batch_has_compressed(self, pool_rows: np.ndarray) -> bool:
        """Host only: whether any of these pool rows decodes over the folded tables."""
        return bool(self.prompt_lens[pool_rows].any())

    def retrieval_bounds(self, pool_rows: np.ndarray) -> tuple[int, int]:
        """Host only: the most chunks and selected chunks of any dynamic row of this batch."""
        return int(self.num_chunks[pool_rows].max()), int(self.num_selected[pool_rows].max())

    def host_tier_moves(self, pool_row: int) -> PendingMoves | None:
        """The request on ``pool_row``'s host-tier ``(moved, selected)`` chunk counters, copied
        to the host without waiting (the step that wrote them may still run; a later add on
        the same slot clears them after this copy, in stream order). ``None``: no host tier."""
        with self._lock:
            held = self._held.get(pool_row)
        if held is None or held.stages[1] == 0:
            return None
        on_cuda = self.device.type == "cuda"
        counts = torch.empty(2, dtype=torch.int64, pin_memory=on_cuda)
        counts.copy_(self.moves[held.slot], non_blocking=on_cuda)
        done = None
        if on_cuda:
            done = torch.cuda.Event()
            done.record()
        return PendingMoves(counts, done)


@dataclass(frozen=True)
class PendingMoves:
    """A request's host-tier counters on their way to the host."""

    counts: Tensor
    """``[2]`` int64 host: chunks moved, chunks selected (valid once :attr:`done` is)."""
    done: Any
    """The CUDA event after the copy (``None``: the copy is complete)."""

    def ready(self, wait: bool) -> bool:
        if self.done is None:
            return True
        if wait:
            self.done.synchronize()
            return True
        return bool(self.done.query())


@dataclass(frozen=True)
class PoolSizing:
    """How large the pools are per (token, layer, kv head) entry of SGLang's KV pool, so the
    pools and SGLang's per-token memory count agree."""

    fixed_fraction: float
    """Fixed values per entry: every kept position or compact entry is one of the pool's."""
    bound_fraction: float
    """Dynamic prompt entries per entry (their chunk bounds stay on the device)."""
    chunk_size: int
    bound_channels: int | None
    """``r``, the key channels a chunk bound covers (``None``: all ``D``)."""
    uint8_bounds: bool
    """Bounds stored as 8-bit codes (else in the KV dtype)."""
    row_entries: int
    """Fewest prompt entries of a dynamic row: each holds one parameter row, so there are at
    most ``dynamic entries / row_entries`` of them (shorter prompts stay dense)."""
    top_k_chunks: int
    """``k``, the most chunks a dynamic row selects (its scratch grows with it)."""
    staging_slack: float | None = None
    """Host tier: staging slots per dynamic row beyond one step's selection, as a multiple of
    it (``None``: no host tier, no staging state)."""

    @classmethod
    def of(
        cls,
        fixed_fraction: float,
        max_dynamic_fraction: float,
        chunk_size: int,
        storage: str,
        budget: float,
        budget_tokens: int | None,
        *,
        bound_channels: int | None,
        uint8_bounds: bool,
        min_prompt_tokens: int,
        top_k_chunks: int,
        staging_slack: float | None = None,
    ) -> PoolSizing:
        """In place every prompt stays in the pool; with compact storage, whose requests hand
        their prompts back to the tree, they hold up to ``1 / budget`` prompts per pool entry
        (at most 10). A dynamic row spans a compressed prompt (at least ``min_prompt_tokens``)
        and at least one chunk."""
        held = 1.0 if storage != "compact" or budget_tokens is not None else min(10.0, 1 / budget)
        return cls(
            fixed_fraction,
            max_dynamic_fraction * held,
            chunk_size,
            bound_channels,
            uint8_bounds,
            max(min_prompt_tokens, chunk_size),
            top_k_chunks,
            staging_slack if storage == "compact" else None,
        )

    def bound_width(self, head_dim: int) -> int:
        """``r`` for keys of ``head_dim`` channels."""
        return min(self.bound_channels or head_dim, head_dim)

    def bound_dtype(self, kv_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8 if self.uint8_bounds else kv_dtype

    def fixed_values(self, prompt_entries: int) -> int:
        return int(prompt_entries * self.fixed_fraction)

    def bound_chunks(self, prompt_entries: int) -> int:
        return int(prompt_entries * self.bound_fraction) // self.chunk_size + 1

    def param_rows(self, prompt_entries: int) -> int:
        return int(prompt_entries * self.bound_fraction) // self.row_entries + 1

    def candidate_slots(self, prompt_entries: int) -> int:
        """Candidate scratch for the dynamic rows of ``prompt_entries``: a row of ``n`` chunks
        needs ``ceil(n / B) * min(k, n) <= k n / B + k`` (``B = CANDIDATE_BLOCK``), so all of
        them at most ``k / B`` per chunk plus ``k`` per row (:meth:`param_rows` bounds those)."""
        chunks = int(prompt_entries * self.bound_fraction) // self.chunk_size
        k = self.top_k_chunks
        return k * chunks // CANDIDATE_BLOCK + k * self.param_rows(prompt_entries)

    def top_slots(self, prompt_entries: int) -> int:
        """Selected-id scratch: ``min(k, n)`` per row, so at most ``k`` per row and one per
        chunk."""
        return min(
            self.top_k_chunks * self.param_rows(prompt_entries), self.bound_chunks(prompt_entries)
        )

    def stage_slots(self, prompt_entries: int) -> int:
        """Host-tier staging slots: ``min(n, ceil((1 + slack) k))`` per row, so at most one
        per chunk and ``(1 + slack) k + 1`` per row."""
        if self.staging_slack is None:
            return 0
        per_row = math.ceil((1 + self.staging_slack) * self.top_k_chunks)
        return min(per_row * self.param_rows(prompt_entries), self.bound_chunks(prompt_entries))

    def host_chunk_ids(self, prompt_entries: int) -> int:
        """Host-tier rows' host chunk ids: one per retrievable chunk."""
        return 0 if self.staging_slack is None else self.bound_chunks(prompt_entries)

    def bytes_per_entry(self, head_dim: int, kv_bytes: int) -> float:
        """Device bytes reserved per KV pool entry: a fixed value, and per dynamic prompt entry
        its share of a chunk's ``2 r`` bounds, of a parameter row (channel id, offset and scale
        per bounded channel) and of the retrieval scratch (:meth:`candidate_slots`,
        :meth:`top_slots`)."""
        costs = ByteCosts(
            head_dim, kv_bytes, self.bound_width(head_dim), 1 if self.uint8_bounds else kv_bytes
        )
        chunk, params = costs.chunk_bytes, costs.head_bytes
        k, c, rows = self.top_k_chunks, self.chunk_size, self.row_entries
        candidates = k / (CANDIDATE_BLOCK * c) + k / rows
        tops = min(k / rows, 1 / c)
        scratch = CANDIDATE_BYTES * candidates + SELECTED_BYTES * tops
        dynamic = chunk / c + params / rows + scratch
        if self.staging_slack is not None:
            stages = min(math.ceil((1 + self.staging_slack) * k) / rows, 1 / c)
            dynamic += STAGE_SLOT_BYTES * stages + HOST_ID_BYTES / c
        return 4 * self.fixed_fraction + dynamic * self.bound_fraction

    def bytes_per_token(
        self, num_layers: int, num_kv_heads: int, head_dim: int, kv_bytes: int
    ) -> int:
        """Bytes reserved per KV token (every layer and kv head of it), rounded up."""
        return math.ceil(self.bytes_per_entry(head_dim, kv_bytes) * num_layers * num_kv_heads)


def reserve_fraction(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    kv_bytes: int,
    *,
    bound_channels: int | None,
    uint8_bounds: bool,
    chunk_size: int,
    max_dynamic_fraction: float,
    storage: str,
    budget: float,
    min_prompt_tokens: int = 256,
    fixed_fraction: float = 1.0,
    top_k_chunks: int = 8,
    staging_slack: float | None = 1.0,
) -> float:
    """The decode metadata's reserve over the KV pool's own bytes, per token, at these shapes
    and settings (the defaults are the config's; ``staging_slack=None``: no host tier)."""
    sizing = PoolSizing.of(
        fixed_fraction,
        max_dynamic_fraction,
        chunk_size,
        storage,
        budget,
        None,
        bound_channels=bound_channels,
        uint8_bounds=uint8_bounds,
        min_prompt_tokens=min_prompt_tokens,
        top_k_chunks=top_k_chunks,
        staging_slack=staging_slack,
    )
    kv = 2 * head_dim * kv_bytes * num_layers * num_kv_heads
    return sizing.bytes_per_token(num_layers, num_kv_heads, head_dim, kv_bytes) / kv
