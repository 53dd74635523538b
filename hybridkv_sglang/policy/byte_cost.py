"""What a plan's heads cost in bytes: the one cost model budgets, stats and benchmarks use.

A budget is a promise in bytes (DESIGN §2): a request at ``budget`` reads at most that fraction of
its dense prompt KV bytes per decode step. What a decode step reads of the prompt is

* the K and V of every entry its tables list (``2·D`` values of the KV dtype each), and
* each dynamic head's chunk index (:mod:`hybridkv_sglang.policy.chunk_index`): ``2·r`` bound
  values per retrievable chunk at their stored precision, per bounded channel its id, offset and
  scale (``PARAM_BYTES_PER_CHANNEL``), and the retrieval's scratch: room for ``k`` candidates
  (score and id) per block of ``CANDIDATE_BLOCK`` chunks, and the ``k`` ids it selects
  (:meth:`ByteCosts.scratch_bytes`).

Both are held on the device for the request's life as well (in ``compact`` storage that is all
the request holds of its prompt, with the dynamic heads' prompt KV on the host tier). The planner
prices the index in entry-equivalents (:meth:`ByteCosts.index_entries`) and charges it to the
dynamic head that needs it. Not charged, and reported on its own (``index_bytes``): the 4-byte
kept position or compact entry id per resident entry the tables are built from, the per-head
counterpart of the page table every attention, dense included, reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch

CANDIDATE_BLOCK = 32
"""Chunks per block of the retrieval's first pass, which keeps each block's best ``k`` as
candidates (the kernel's blocks are at least this large)."""
CANDIDATE_BYTES = 8
"""A candidate: its score (float32) and chunk id (int32)."""
SELECTED_BYTES = 4
"""A selected chunk's id (int32)."""
PARAM_BYTES_PER_CHANNEL = 12
"""Per bounded channel of a dynamic head: its id (int32), offset and scale (float32)."""
POSITION_BYTES = 4
"""A resident entry's kept position or compact entry id (int32)."""

_Count = TypeVar("_Count", int, torch.Tensor)


def scratch_slots(num_chunks: _Count, num_selected: _Count) -> tuple[_Count, _Count]:
    """``(candidate, top)`` slots of a dynamic row's retrieval: ``num_selected`` candidates per
    block of ``CANDIDATE_BLOCK`` chunks, and the ``num_selected`` chunks selected (ints or
    elementwise over tensors; 0 for rows that select nothing)."""
    blocks = -(-num_chunks // CANDIDATE_BLOCK)
    return blocks * num_selected, num_selected


@dataclass(frozen=True)
class ByteCosts:
    """Bytes of one (token, kv head) KV entry and of a dynamic head's chunk index.

    Attributes:
        head_dim: ``D``.
        kv_bytes: bytes of one K or V value (the KV cache dtype).
        bound_channels: ``r``, the key channels each chunk bound covers.
        bound_bytes: bytes of one stored bound value (1 for uint8 codes, else ``kv_bytes``).
    """

    head_dim: int
    kv_bytes: int
    bound_channels: int
    bound_bytes: int

    def __post_init__(self) -> None:
        for name in ("head_dim", "kv_bytes", "bound_channels", "bound_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bound_channels > self.head_dim:
            raise ValueError(
                f"bound_channels must be <= head_dim {self.head_dim}, got {self.bound_channels}"
            )

    @classmethod
    def of(
        cls, head_dim: int, kv_dtype: torch.dtype, channels: int | None, precision: str
    ) -> ByteCosts:
        """The costs of a KV cache of ``kv_dtype`` with bounds over ``channels`` (``None``: all)
        at ``precision`` (``"kv"`` or ``"uint8"``)."""
        kv_bytes = torch.empty(0, dtype=kv_dtype).element_size()
        return cls(
            head_dim=head_dim,
            kv_bytes=kv_bytes,
            bound_channels=head_dim if channels is None else min(channels, head_dim),
            bound_bytes=1 if precision == "uint8" else kv_bytes,
        )

    @property
    def entry_bytes(self) -> int:
        """K and V of one token of one kv head."""
        return 2 * self.head_dim * self.kv_bytes

    @property
    def chunk_bytes(self) -> int:
        """Bound bytes per retrievable chunk (its minima and maxima)."""
        return 2 * self.bound_channels * self.bound_bytes

    @property
    def head_bytes(self) -> int:
        """Index bytes per dynamic head whatever its prompt: its channels' ids and affine maps."""
        return PARAM_BYTES_PER_CHANNEL * self.bound_channels

    @staticmethod
    def scratch_bytes(chunks: int, selected: int) -> int:
        """Retrieval scratch of a dynamic head selecting ``selected`` of ``chunks`` chunks."""
        candidates, tops = scratch_slots(chunks, min(selected, chunks))
        return CANDIDATE_BYTES * candidates + SELECTED_BYTES * tops

    def index_bytes(self, chunks: int, selected: int) -> int:
        """The chunk index of one dynamic head with ``chunks`` retrievable chunks that selects
        ``selected`` of them per step."""
        if chunks <= 0:
            return 0
        return chunks * self.chunk_bytes + self.head_bytes + self.scratch_bytes(chunks, selected)

    def index_entries(self, chunks: int, selected: int) -> int:
        """:meth:`index_bytes` in KV entries, rounded up: what stage 2 charges a dynamic head
        on top of the entries it reads."""
        return math.ceil(self.index_bytes(chunks, selected) / self.entry_bytes)
