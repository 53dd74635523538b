"""The live compressed requests of this scheduler process, dropped when SGLang releases them.

Keyed by rid and checked against the request's pool row, so a reused row never picks up another
request's layout (pitfall 9). Finish, abort and retraction all end in SGLang's
``mem_cache.common.release_kv_cache``, whose hook calls the session's one release path: the
entry goes (and its compact storage is given back), so a retracted request is re-prefilled
densely and compressed afresh at its new prefill end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from hybridkv_sglang.storage.compact_layout import CompactLayout
from hybridkv_sglang.storage.compressed_layout import CompressedLayout

Placement = Literal["in_place", "compact"]


@dataclass(frozen=True)
class CompressedRequest:
    """A compressed request: its plan's layout, and where its kept KV lives."""

    rid: str
    req_pool_idx: int
    layout: CompressedLayout
    """The plan as positions in the request's row (what compaction lays out again)."""
    compact: CompactLayout | None = None
    """``compact`` placement: the kept KV moved into compact entries (``None``: in place)."""
    saved_skip_insert: bool = False
    """``compact``: the request's ``skip_radix_cache_insert`` before compaction set it."""

    @property
    def placement(self) -> Placement:
        return "in_place" if self.compact is None else "compact"


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

    def pop(self, rid: str) -> CompressedRequest | None:
        with self._lock:
            return self._by_rid.pop(rid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_rid)
