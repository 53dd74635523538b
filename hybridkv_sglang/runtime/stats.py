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
    decode_steps: int = 0
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

    def record_decode_step(self, rids: list[str]) -> None:
        with self._lock:
            self._totals["decode_tokens"] += len(rids)
            for rid in rids:
                record = self._recent.get(rid)
                if record is not None:
                    record.decode_steps += 1

    def snapshot(self, live_compressed: int = 0) -> dict[str, Any]:
        with self._lock:
            return {
                "live_compressed_requests": live_compressed,
                "totals": dict(self._totals),
                "requests": {rid: asdict(s) for rid, s in self._recent.items()},
            }


STATS = HybridKVStats()


def add_to_internal_state(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of the scheduler's ``get_internal_state``: attach the hybridkv snapshot."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        from hybridkv_sglang.runtime.compressed_requests import COMPRESSED

        state["hybridkv"] = STATS.snapshot(live_compressed=len(COMPRESSED))
    return result
