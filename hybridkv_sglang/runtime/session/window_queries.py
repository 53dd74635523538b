"""Window queries that span prefill chunks.

The policy observes the queries of the last ``w`` prompt tokens. With chunked prefill the last
chunk may hold fewer than ``w`` tokens, and where chunk boundaries fall depends on what else the
scheduler batched. Keeping each request's last ``w`` query rows per layer between its chunks makes
the plan independent of chunking. (Tokens served from the prefix cache have no queries; the
prefix-match cap, ``prefill.requests.window_prefix_cap``, makes a compressed request prefill its
last ``w`` tokens.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor

from hybridkv_sglang.runtime.prefill.requests import PrefillChunk, PrefillEnd

MAX_REQUESTS = 256


class WindowQueryTails:
    """rid -> layer -> (pool row, end position, ``[<= w, H_q, D]`` query tail)."""

    def __init__(self, window: int, max_requests: int = MAX_REQUESTS) -> None:
        self.window = window
        self._max = max_requests
        self._lock = threading.Lock()
        self._tails: OrderedDict[str, dict[int, tuple[int, int, Tensor]]] = OrderedDict()

    def record(self, chunk: PrefillChunk, layer_id: int, q: Tensor) -> None:
        """Keep the last ``w`` query rows of ``chunk`` (``q``: this forward's rows)."""
        rows = q[chunk.query_start : chunk.query_start + chunk.extend_end - chunk.extend_start]
        with self._lock:
            earlier = self._earlier(chunk.rid, chunk.req_pool_idx, chunk.extend_start, layer_id)
            tail = rows if earlier is None else torch.cat([earlier, rows])
            layers = self._tails.setdefault(chunk.rid, {})
            layers[layer_id] = (chunk.req_pool_idx, chunk.extend_end, tail[-self.window :].clone())
            self._tails.move_to_end(chunk.rid)
            while len(self._tails) > self._max:
                self._tails.popitem(last=False)

    def window_queries(self, end: PrefillEnd, layer_id: int, rows: Tensor) -> Tensor:
        """The last ``w`` query rows of ``end``'s prompt: earlier chunks' tails, then ``rows``."""
        with self._lock:
            earlier = self._earlier(end.rid, end.req_pool_idx, end.extend_start, layer_id)
        if earlier is None:
            return rows[-self.window :]
        return torch.cat([earlier, rows])[-self.window :]

    def _earlier(self, rid: str, req_pool_idx: int, start: int, layer_id: int) -> Tensor | None:
        """The tail that ends exactly where this chunk starts, in the same pool row."""
        row, end, tail = self._tails.get(rid, {}).get(layer_id, (-1, -1, None))
        return tail if row == req_pool_idx and end == start else None

    def drop(self, rid: str) -> None:
        with self._lock:
            self._tails.pop(rid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tails)
