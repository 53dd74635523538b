"""``compact`` storage, scheduler side: after a request's prefill checkpoint, move its kept KV into
compact entries, then hand its dense prefix back to the radix tree.

Protocol (``notes/compact-mode.md``, pitfalls 3-5 and 9), driven by the scheduler session:

1. AFTER ``common.checkpoint_kv_cache`` for a request the forward planned (``in_place`` in the
   session): take the slots from SGLang's allocator (evicting cold tree nodes if needed),
   copy static kept KV and dynamic regions into them on the forward stream, copy the retrievable
   chunks to the host tier, then ``unlock`` the prefix lock once, clear ``req.lock`` and set
   ``skip_radix_cache_insert`` so release never inserts stale slot ids. The dense prefix stays in
   the tree as an ordinary evictable node. Any failure leaves the request ``in_place``.
2. AFTER ``common.release_kv_cache`` (finish, abort, retract): free the compact slots and host
   chunks and restore the saved insert flag. Release itself frees only the decode tail, which
   the request still owns.
3. AFTER ``SchedulerInvariantChecker._get_total_uncached_sizes``: live compact slots count as
   the requests' own memory, so SGLang's strict memory check stays exact.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from hybridkv_sglang.kernels.gather_entries import gather_entries_auto
from hybridkv_sglang.policy.lookm import average_merge
from hybridkv_sglang.runtime.session.stats import kv_entry_bytes
from hybridkv_sglang.storage.compact_layout import (
    CompactCopies,
    CompactLayout,
    build_compact_layout,
    compact_shape,
    staging_slots,
)
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_metadata import (
    STAGE_SLOT_BYTES,
    DecodeMetadata,
    request_rows,
)
from hybridkv_sglang.storage.host_tier import HostTier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compaction:
    """What compaction made of one request, and what it took."""

    layout: CompactLayout
    saved_skip_insert: bool
    """The request's ``skip_radix_cache_insert`` before compaction set it (restored at release)."""
    slots: int
    host_chunks: int
    dynamic_tier: str
    host_tier_full: bool
    device_bytes: int
    """What the request holds on the device now: its compact slots (every layer's K and V)
    and its decode metadata."""
    host_bytes: int
    """Its chunks on the host tier."""
    staging_bytes: int
    """Host tier: its staging slots' state, which every decode step reads beyond the plan."""


class CompactStorage:
    """Compact entries and the host tier of one scheduler process."""

    def __init__(
        self,
        kv_pool: Any,
        num_layers: int,
        host_tier: HostTier | None,
        decode_meta: DecodeMetadata,
        staging_slack: float = 1.0,
    ) -> None:
        self.kv_pool = kv_pool
        self.host_tier = host_tier
        self.num_layers = num_layers
        self.staging_slack = staging_slack
        self.forward_stream: Any = None
        self.decode_meta = decode_meta
        self._lock = threading.Lock()
        self.live_slots = 0
        heads = kv_pool.get_key_buffer(0).shape[1]
        self.slot_bytes = num_layers * heads * kv_entry_bytes(kv_pool)
        """K and V bytes of one pool slot over every layer and kv head."""

    def compact(self, req: Any, tree_cache: Any, layout: CompressedLayout) -> Compaction | None:
        """Move ``req``'s kept KV into compact entries; ``None`` if it cannot (stays in_place)."""
        on_host = self.host_tier is not None and any(
            lay.dynamic_heads.numel() for lay in layout.layers
        )
        host_tier_full = False
        host_ids = None
        staging = None
        if on_host:
            staging = staging_slots(layout.dynamic_rows, layout.top_k_chunks, self.staging_slack)
            host_ids = self.host_tier.alloc(compact_shape(layout, staging).host_chunks)
            host_tier_full = host_ids is None
            on_host = host_ids is not None
            staging = staging if on_host else None
        shape = compact_shape(layout, staging)
        slots = _alloc_slots(tree_cache, shape.num_slots)
        if slots is None:
            if host_ids is not None:
                self.host_tier.free(host_ids)
            return None
        try:
            row = req.kv.req_pool_idx
            prompt_slots = tree_cache.req_to_token_pool.req_to_token[row, : layout.prompt_len]
            compact, copies = build_compact_layout(
                layout, prompt_slots.to(torch.int64), slots.to(torch.int64), host_ids, staging
            )
            rows = request_rows(layout, compact)
            with self._on_forward_stream():
                self.fill(copies)
                if layout.merge_evicted:
                    self.merge_evicted(compact, prompt_slots.to(torch.int64))
                if not self.decode_meta.add(row, rows):
                    raise RuntimeError("the decode metadata pools are full")
        except Exception:
            tree_cache.token_to_kv_pool_allocator.free(slots)
            if host_ids is not None:
                self.host_tier.free(host_ids)
            raise
        saved_flag = req.skip_radix_cache_insert
        tree_cache.unlock(req.lock)
        req.lock = None
        req.skip_radix_cache_insert = True
        taken, host_chunks = int(slots.numel()), int(compact.host_chunk_ids.numel())
        with self._lock:
            self.live_slots += taken
        return Compaction(
            layout=compact,
            saved_skip_insert=saved_flag,
            slots=taken,
            host_chunks=host_chunks,
            dynamic_tier="host" if on_host else "device",
            host_tier_full=host_tier_full,
            device_bytes=taken * self.slot_bytes + rows.device_bytes,
            host_bytes=host_chunks * self.host_tier.chunk_bytes if on_host else 0,
            staging_bytes=STAGE_SLOT_BYTES * rows.stage_slots,
        )

    def release(self, layout: CompactLayout, tree_cache: Any) -> None:
        """Give back what compaction took (inside the caller's free group)."""
        tree_cache.token_to_kv_pool_allocator.free(layout.slots)
        if layout.on_host:
            self.host_tier.free(layout.host_chunk_ids)
        with self._lock:
            self.live_slots -= int(layout.slots.numel())

    def fill(self, copies: CompactCopies) -> None:
        """Run the copies that fill a compact layout (current stream; the host tier's copies of
        every layer waited on once)."""
        for layer in range(self.num_layers):
            k_entries, v_entries = self._entries(layer)
            src, dst = copies.entry_src[layer], copies.entry_dst[layer]
            if src.numel():
                gather_entries_auto(k_entries, v_entries, k_entries, v_entries, src, dst)
        to_host = [layer for layer in range(self.num_layers) if copies.chunk_src[layer].numel()]
        if to_host:

            def chunk_entries(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                k_entries, v_entries = self._entries(to_host[i])
                chunk_src = copies.chunk_src[to_host[i]]
                return k_entries[chunk_src], v_entries[chunk_src]

            self.host_tier.write([copies.chunk_dst[layer] for layer in to_host], chunk_entries)

    def _entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s K and V buffers as folded entries ``[slots * H_kv, D]``."""
        k = self.kv_pool.get_key_buffer(layer)
        v = self.kv_pool.get_value_buffer(layer)
        return k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])

    def merge_evicted(self, compact: CompactLayout, prompt_slots: torch.Tensor) -> None:
        """Fold each static head's evicted prompt KV into its compact entries (LOOK-M's merge,
        ``policy.average_merge``); the prompt slots must still hold the prompt."""
        plan = compact.plan
        for layer, (lay, stored) in enumerate(zip(plan.layers, compact.layers, strict=True)):
            k = self.kv_pool.get_key_buffer(layer)
            v = self.kv_pool.get_value_buffer(layer)
            k_entries, v_entries = self._entries(layer)
            bounds = lay.static_kept.indptr_host.tolist()
            for i, head in enumerate(lay.static_heads.tolist()):
                kept = lay.static_kept.positions[bounds[i] : bounds[i + 1]].to(torch.int64)
                evicted = torch.ones(plan.prompt_len, dtype=torch.bool, device=kept.device)
                evicted[kept] = False
                gone = prompt_slots[evicted.to(prompt_slots.device)]
                dst = stored.static_entries.positions[bounds[i] : bounds[i + 1]].to(torch.int64)
                merged_k, merged_v = average_merge(
                    k_entries[dst], v_entries[dst], k[gone, head], v[gone, head]
                )
                k_entries[dst] = merged_k
                v_entries[dst] = merged_v

    def _on_forward_stream(self) -> Any:
        """Copies join the forward stream, ordered after the forwards that still read the slots."""
        if self.forward_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.forward_stream)


def _alloc_slots(tree_cache: Any, count: int) -> torch.Tensor | None:
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    allocator = tree_cache.token_to_kv_pool_allocator
    slots = allocator.alloc(count)
    if slots is None:
        evict_from_tree_cache(tree_cache, count)
        slots = allocator.alloc(count)
    return slots
