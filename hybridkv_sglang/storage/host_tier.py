"""Host tier of ``compact`` storage: dynamic heads' prompt KV, chunk-major, in (pinned) host memory.

One host chunk holds the K and V of ``C`` consecutive prompt positions of one (layer, kv head).
Decode stages the chunks a dynamic head selects into its staging slots on the device
(:mod:`hybridkv_sglang.kernels.host_staging`, inside the decode graph), reading only chunks the
slots do not already hold straight from this buffer: pinned memory is addressable from the GPU.
Pinned memory needs CUDA; elsewhere the buffer is ordinary memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class HostTier:
    """A fixed pool of host chunks with a free list (allocation is all-or-nothing)."""

    def __init__(
        self,
        capacity_chunks: int,
        chunk_size: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        pin_memory: bool,
    ) -> None:
        self.chunk_size = chunk_size
        self.k = torch.empty(capacity_chunks, chunk_size, k_dim, dtype=dtype, pin_memory=pin_memory)
        self.v = torch.empty(capacity_chunks, chunk_size, v_dim, dtype=dtype, pin_memory=pin_memory)
        self._free = torch.arange(capacity_chunks, dtype=torch.int64)

    @classmethod
    def sized(
        cls, mib: float, chunk_size: int, k_dim: int, v_dim: int, dtype: torch.dtype, pin: bool
    ) -> HostTier:
        """A tier of about ``mib`` MiB."""
        chunk_bytes = chunk_size * (k_dim + v_dim) * torch.empty((), dtype=dtype).element_size()
        return cls(int(mib * 2**20) // chunk_bytes, chunk_size, k_dim, v_dim, dtype, pin)

    @property
    def chunk_bytes(self) -> int:
        """K and V bytes of one host chunk."""
        return self.k[0].numel() * self.k.element_size() + self.v[0].numel() * self.v.element_size()

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    @property
    def free_chunks(self) -> int:
        return self._free.numel()

    def alloc(self, count: int) -> Tensor | None:
        """``count`` chunk ids, or ``None`` when the tier cannot hold them all."""
        if count > self._free.numel():
            return None
        ids, self._free = self._free[:count], self._free[count:]
        return ids

    def free(self, ids: Tensor) -> None:
        self._free = torch.cat([self._free, ids.to(torch.int64)])

    def write(self, ids: list[Tensor], entries: Callable[[int], tuple[Tensor, Tensor]]) -> None:
        """Copy part ``i``'s ``[m_i, C, D]`` device K/V (``entries(i)``, made when its copy is
        queued and dropped right after) into host chunks ``ids[i]`` (parts: the layers of a
        compaction).

        Every part's copy is queued into one pinned buffer, then the stream is waited on once:
        one sync per compaction, not one per layer. The copy completes before this returns, so
        the dense prefix may be released right after and staging never reads a half-written
        chunk.
        """
        total = sum(part.numel() for part in ids)
        if total == 0:
            return
        pinned = self.k.is_pinned()
        k_host = torch.empty((total, *self.k.shape[1:]), dtype=self.k.dtype, pin_memory=pinned)
        v_host = torch.empty((total, *self.v.shape[1:]), dtype=self.v.dtype, pin_memory=pinned)
        at = 0
        for i, part in enumerate(ids):
            k_entries, v_entries = entries(i)
            k_host[at : at + part.numel()].copy_(k_entries, non_blocking=pinned)
            v_host[at : at + part.numel()].copy_(v_entries, non_blocking=pinned)
            at += part.numel()
        if pinned:
            torch.cuda.current_stream().synchronize()
        every_id = torch.cat(ids).to(torch.int64)
        self.k[every_id] = k_host
        self.v[every_id] = v_host
