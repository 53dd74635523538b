"""The live compressed requests of this scheduler process, dropped when SGLang releases them.

Keyed by rid and checked against the request's pool row, so a reused row never picks up another
request's layout (pitfall 9). Finish, abort and retraction all end in SGLang's
``mem_cache.common.release_kv_cache``; an AFTER hook there drops the entry, so a retracted
request is re-prefilled densely and compressed afresh at its new prefill end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from hybridkv_sglang.storage.decode_layout import CompressedLayout


@dataclass(frozen=True)
class CompressedRequest:
    rid: str
    req_pool_idx: int
    layout: CompressedLayout


class CompressedRequests:
    """rid -> compressed state; thread-safe (release may run outside the forward thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_rid: dict[str, CompressedRequest] = {}

    def add(self, request: CompressedRequest) -> None:
        with self._lock:
            self._by_rid[request.rid] = request

    def layout_for(self, rid: str, req_pool_idx: int) -> CompressedLayout | None:
        """The layout of ``rid`` if it is compressed and still owns ``req_pool_idx``."""
        with self._lock:
            entry = self._by_rid.get(rid)
        if entry is None or entry.req_pool_idx != req_pool_idx:
            return None
        return entry.layout

    def drop(self, rid: str) -> None:
        with self._lock:
            self._by_rid.pop(rid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_rid)


COMPRESSED = CompressedRequests()


def drop_on_release(result: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``release_kv_cache(req, tree_cache, ...)``: forget the request's layout."""
    COMPRESSED.drop(req.rid)
    return result
