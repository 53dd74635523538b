"""What hybridkv saw and did, per request, readable from SGLang's server-info surface.

Lives in the scheduler process (where the attention backend runs). An AFTER hook on the
scheduler's internal-state readback adds ``{"hybridkv": snapshot}`` to every entry of
``/server_info``'s ``internal_states`` (and ``Engine.get_server_info()``).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from hybridkv_sglang.runtime.activation import is_active

MAX_RECENT_REQUESTS = 256


@dataclass
class RequestStats:
    """One request's compression record, updated as it goes from prefill end to finish."""

    rid: str
    prompt_tokens: int
    visual_tokens: int
    visual_spans: list[tuple[int, int]]
    prefill_chunks: int
    compressed: bool
    dense_reason: str | None = None
    static_heads: int = 0
    dynamic_heads: int = 0
    kept_entries: int = 0
    prompt_entries: int = 0
    read_fraction: float = 1.0
    window_rows: int = 0
    decode_steps: int = 0
    storage: str = "in_place"
    compact_slots: int = 0
    host_chunks: int = 0
    dynamic_tier: str | None = None
    host_tier_full: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class HybridKVStats:
    """Bounded per-request records plus running totals; thread-safe for the readback thread."""

    def __init__(self, max_recent: int = MAX_RECENT_REQUESTS) -> None:
        self._lock = threading.Lock()
        self._max_recent = max_recent
        self._recent: OrderedDict[str, RequestStats] = OrderedDict()
        self._chunks: OrderedDict[str, int] = OrderedDict()
        self._totals: Counter[str] = Counter()

    def record_prefill_chunk(self, rid: str) -> None:
        """Count extends per request; bounded, since an aborted request never reaches its end."""
        with self._lock:
            self._chunks[rid] = self._chunks.get(rid, 0) + 1
            self._chunks.move_to_end(rid)
            while len(self._chunks) > self._max_recent:
                self._chunks.popitem(last=False)

    def record_prefill_end(self, stats: RequestStats) -> None:
        with self._lock:
            stats.prefill_chunks = self._chunks.pop(rid := stats.rid, 0)
            self._recent[rid] = stats
            self._recent.move_to_end(rid)
            while len(self._recent) > self._max_recent:
                self._recent.popitem(last=False)
            self._totals["requests"] += 1
            if stats.compressed:
                self._totals["compressed_requests"] += 1
                self._totals["kept_entries"] += stats.kept_entries
                self._totals["prompt_entries"] += stats.prompt_entries
            else:
                self._totals[f"dense_{stats.dense_reason}"] += 1

    def record_compaction(self, rid: str, done: Any, failure: str | None) -> None:
        """``done``: a ``Compaction`` (or ``None`` with the reason it stayed ``in_place``)."""
        with self._lock:
            record = self._recent.get(rid)
            if done is None:
                self._totals[f"not_compacted_{failure}"] += 1
                return
            self._totals["compacted_requests"] += 1
            if done.host_tier_full:
                self._totals["host_tier_full"] += 1
            if record is not None:
                record.storage = "compact"
                record.compact_slots = done.slots
                record.host_chunks = done.host_chunks
                record.dynamic_tier = done.dynamic_tier
                record.host_tier_full = done.host_tier_full

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a running total (e.g. decode steps over the fixed tables)."""
        with self._lock:
            self._totals[name] += n

    def record_decode_steps(self, rid: str, steps: int) -> None:
        """At release: the decode steps a request took (counted once, not per step)."""
        with self._lock:
            self._totals["decode_tokens"] += steps
            record = self._recent.get(rid)
            if record is not None:
                record.decode_steps = steps

    def snapshot(
        self, live_compressed: int = 0, memory: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self._lock:
            return {
                "live_compressed_requests": live_compressed,
                "memory": memory or {},
                "totals": dict(self._totals),
                "requests": {rid: asdict(s) for rid, s in self._recent.items()},
            }


STATS = HybridKVStats()


def add_to_internal_state(result: Any, controller: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of the scheduler's ``get_internal_state``: attach the hybridkv snapshot."""
    if not is_active():
        return result
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        from hybridkv_sglang.runtime.compressed_requests import COMPRESSED

        scheduler = getattr(controller, "scheduler", None)
        state["hybridkv"] = STATS.snapshot(
            live_compressed=len(COMPRESSED), memory=memory_snapshot(scheduler)
        )
    return result


def memory_snapshot(scheduler: Any) -> dict[str, Any]:
    """SGLang's own KV pool counts (tokens) plus what compact storage holds."""
    from hybridkv_sglang.runtime.activation import active_backend
    from hybridkv_sglang.runtime.compaction import installed

    memory: dict[str, Any] = {}
    tree = getattr(scheduler, "tree_cache", None)
    if tree is not None:
        memory["pool_tokens"] = int(scheduler.max_total_num_tokens)
        memory["available_tokens"] = int(tree.token_to_kv_pool_allocator.available_size())
        memory["evictable_tokens"] = int(tree.evictable_size())
        memory["protected_tokens"] = int(tree.protected_size())
        memory["running_requests"] = len(scheduler.running_batch.reqs)
        memory["waiting_requests"] = len(scheduler.waiting_queue)
    backend = active_backend()
    if backend is not None and backend.decode_meta is not None:
        memory["decode_metadata"] = backend.decode_meta.usage()
    storage = installed()
    if storage is not None:
        memory["compact_slots"] = storage.live_slots
        if storage.host_tier is not None:
            memory["host_chunks_capacity"] = storage.host_tier.capacity
            memory["host_chunks_used"] = storage.host_tier.capacity - storage.host_tier.free_chunks
            memory["staged_chunks"] = storage.stager.moved_chunks
            memory["reused_staged_chunks"] = storage.stager.reused_chunks
    return memory
