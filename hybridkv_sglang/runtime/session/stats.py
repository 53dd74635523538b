"""What hybridkv saw and did, per request, readable from SGLang's server-info surface.

Lives in the scheduler process's session (where the attention backend runs). The hook on the
scheduler's internal-state readback adds ``{"hybridkv": snapshot}`` to every entry of
``/server_info``'s ``internal_states`` (and ``Engine.get_server_info()``). With
``--enable-metrics`` the same calls feed SGLang's Prometheus endpoint (``session.metrics``).

A request's record appears at its prefill end and is counted in the totals when SGLang releases
its KV (finish, abort or retraction; a retracted request is compressed afresh at its re-prefill
and counted again). A prefill-only request (``max_new_tokens=0``) decodes nothing and leaves no
record: that is the prefix-caching request SGLang sends ahead of the samples of an ``n > 1``
request, so such a request reports once per sample, under the ids its responses carry in
``meta_info["id"]``.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybridkv_sglang.runtime.session.metrics import HybridKVMetrics

MAX_RECENT_REQUESTS = 256
FAILURE_REASONS = frozenset({"compression_error", "decode_metadata_full"})
"""Dense reasons of a request whose compression was tried and failed (served dense)."""


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
    prompt_bytes: int = 0
    """Dense prompt KV bytes (K and V of every prompt token, layer and kv head)."""
    read_bytes_per_step: int = 0
    """Prompt bytes one decode step reads: listed KV entries and the chunk index."""
    index_bytes: int = 0
    """The dynamic heads' chunk index (bounds, scratch, channel parameters), on the device."""
    read_fraction: float = 1.0
    """``read_bytes_per_step / prompt_bytes``: what the budget promises."""
    read_entries_fraction: float = 1.0
    """The same in KV entries, the chunk index not counted."""
    index_fraction: float = 0.0
    device_fraction: float = 1.0
    """Prompt bytes the request holds on the device in its storage mode (in place: the dense
    prefix and the index, as planned; compact: its compact slots, every layer's K and V, and its
    decode metadata, staging state included, as taken)."""
    host_fraction: float = 0.0
    """Prompt bytes on the host tier (compact storage, dynamic heads)."""
    budget_fraction: float = 1.0
    over_budget: bool = False
    window_rows: int = 0
    decode_steps: int = 0
    storage: str = "in_place"
    compact_slots: int = 0
    host_chunks: int = 0
    dynamic_tier: str | None = None
    host_tier_full: bool = False
    staged_chunks_selected: int = 0
    """Host tier: chunks the dynamic heads selected over the request's decode steps."""
    staged_chunks_moved: int = 0
    """Of those, chunks copied from the host (not already in a staging slot)."""
    extra: dict[str, Any] = field(default_factory=dict)


class HybridKVStats:
    """Bounded per-request records plus running totals; thread-safe for the readback thread."""

    def __init__(
        self,
        kv_entry_bytes: int = 0,
        metrics: HybridKVMetrics | None = None,
        max_recent: int = MAX_RECENT_REQUESTS,
    ) -> None:
        self._lock = threading.Lock()
        self._max_recent = max_recent
        self._recent: OrderedDict[str, RequestStats] = OrderedDict()
        self._unreleased: dict[str, RequestStats] = {}
        """Records between prefill end and release: one per request holding KV, unbounded so
        none goes uncounted."""
        self._chunks: OrderedDict[str, int] = OrderedDict()
        self._totals: Counter[str] = Counter()
        self.kv_entry_bytes = kv_entry_bytes
        """K and V bytes of one (token, layer, kv head) entry of the KV pool."""
        self.metrics = metrics
        """SGLang's Prometheus series, when the server exports metrics."""

    def record_prefill_chunk(self, rid: str) -> None:
        """Count extends per request; bounded, since an aborted request never reaches its end."""
        with self._lock:
            self._chunks[rid] = self._chunks.get(rid, 0) + 1
            self._chunks.move_to_end(rid)
            while len(self._chunks) > self._max_recent:
                self._chunks.popitem(last=False)

    def record_prefill_end(self, stats: RequestStats) -> None:
        """The request's record, visible from now on; counted at :meth:`record_release`."""
        with self._lock:
            stats.prefill_chunks = self._chunks.pop(rid := stats.rid, 0)
            self._recent[rid] = stats
            self._recent.move_to_end(rid)
            while len(self._recent) > self._max_recent:
                self._recent.popitem(last=False)
            self._unreleased[rid] = stats

    def record_release(self, rid: str, decode_steps: int, prefill_only: bool) -> None:
        """At each release of a request's KV: count its last prefill end, with the decode steps
        it took (counted once, not per step); a prefill-only request's record is dropped."""
        with self._lock:
            record = self._unreleased.pop(rid, None)
            if record is None:
                return
            if prefill_only:
                if self._recent.get(rid) is record:
                    del self._recent[rid]
                return
            record.decode_steps = decode_steps
            self._count(record)

    def record_host_tier_moves(self, rid: str, moved: int, selected: int) -> None:
        """A released host-tier request's chunks selected and copied over its decode (they reach
        the host after its release)."""
        with self._lock:
            self._totals["staged_chunks_selected"] += selected
            self._totals["staged_chunks_moved"] += moved
            record = self._recent.get(rid)
            if record is not None:
                record.staged_chunks_selected = selected
                record.staged_chunks_moved = moved

    def _count(self, record: RequestStats) -> None:
        """Totals and Prometheus series for one released record (the caller holds the lock)."""
        totals = self._totals
        totals["requests"] += 1
        totals["decode_tokens"] += record.decode_steps
        if record.compressed:
            totals["compressed_requests"] += 1
            totals["kept_entries"] += record.kept_entries
            totals["prompt_entries"] += record.prompt_entries
            totals["read_bytes_per_step"] += record.read_bytes_per_step
            totals["prompt_bytes"] += record.prompt_bytes
            totals["index_bytes"] += record.index_bytes
            if record.over_budget:
                totals["over_budget_requests"] += 1
        else:
            totals[f"dense_{record.dense_reason}"] += 1
        metrics = self.metrics
        if metrics is None:
            return
        if record.compressed:
            kept = record.kept_entries * self.kv_entry_bytes
            saved = (record.prompt_entries - record.kept_entries) * self.kv_entry_bytes
            metrics.compressed(
                record.storage, kept, saved, record.index_bytes, record.read_fraction
            )
        else:
            metrics.dense(str(record.dense_reason))
            if record.dense_reason in FAILURE_REASONS:
                metrics.failure(str(record.dense_reason))

    def record_compaction(self, rid: str, done: Any, failure: str | None) -> None:
        """``done``: a ``Compaction`` (or ``None`` with the reason it stayed ``in_place``)."""
        with self._lock:
            record = self._unreleased.get(rid)
            if done is None:
                self._totals[f"not_compacted_{failure}"] += 1
                if self.metrics is not None:
                    self.metrics.failure(str(failure))
                return
            self._totals["compacted_requests"] += 1
            if done.host_tier_full:
                self._totals["host_tier_full"] += 1
            if record is not None:
                record.storage = "compact"
                dense = max(record.prompt_bytes, 1)
                record.device_fraction = done.device_bytes / dense
                record.host_fraction = done.host_bytes / dense
                record.read_bytes_per_step += done.staging_bytes
                record.index_bytes += done.staging_bytes
                record.read_fraction = record.read_bytes_per_step / dense
                record.index_fraction = record.index_bytes / dense
                record.compact_slots = done.slots
                record.host_chunks = done.host_chunks
                record.dynamic_tier = done.dynamic_tier
                record.host_tier_full = done.host_tier_full

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a running total (e.g. decode steps over the fixed tables)."""
        with self._lock:
            self._totals[name] += n
            if self.metrics is not None:
                self.metrics.count(name, n)

    def snapshot(
        self, live_compressed: int = 0, memory: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self._lock:
            return {
                "live_compressed_requests": live_compressed,
                "kv_entry_bytes": self.kv_entry_bytes,
                "memory": memory or {},
                "totals": dict(self._totals),
                "requests": {rid: asdict(s) for rid, s in self._recent.items()},
            }


def kv_entry_bytes(kv_pool: Any) -> int:
    """K and V bytes of one (token, layer, kv head) entry of SGLang's KV pool, from its buffers
    (``[slots, H_kv, D]`` each)."""
    key, value = kv_pool.get_key_buffer(0), kv_pool.get_value_buffer(0)
    return key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size()
