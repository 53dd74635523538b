"""The live compressed requests of this scheduler process, dropped when SGLang releases them.

Keyed by rid and checked against the request's pool row, so a reused row never picks up another
request's layout (pitfall 9). Finish, abort and retraction all end in SGLang's
``mem_cache.common.release_kv_cache``; an AFTER hook there drops the entry (and gives back
compact storage), so a retracted request is re-prefilled densely and compressed afresh at its
new prefill end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from hybridkv_sglang.storage.compact_layout import CompactLayout
from hybridkv_sglang.storage.compressed_layout import CompressedLayout


@dataclass(frozen=True)
class CompressedRequest:
    rid: str
    req_pool_idx: int
    layout: CompressedLayout | CompactLayout
    saved_skip_insert: bool = False
    """``compact``: the request's ``skip_radix_cache_insert`` before compaction set it."""


class CompressedRequests:
    """rid -> compressed state; thread-safe (release may run outside the forward thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_rid: dict[str, CompressedRequest] = {}

    def add(self, request: CompressedRequest) -> None:
        """Register (or replace: ``compact`` replaces the ``in_place`` entry) a request."""
        with self._lock:
            self._by_rid[request.rid] = request

    def entry(self, rid: str) -> CompressedRequest | None:
        with self._lock:
            return self._by_rid.get(rid)

    def layout_for(self, rid: str, req_pool_idx: int) -> CompressedLayout | CompactLayout | None:
        """The layout of ``rid`` if it is compressed and still owns ``req_pool_idx``."""
        entry = self.entry(rid)
        if entry is None or entry.req_pool_idx != req_pool_idx:
            return None
        return entry.layout

    def pop(self, rid: str) -> CompressedRequest | None:
        with self._lock:
            return self._by_rid.pop(rid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_rid)


COMPRESSED = CompressedRequests()
