"""Host tier of ``compact`` storage: dynamic heads' prompt KV, chunk-major, in (pinned) host memory.

One host chunk holds the K and V of ``C`` consecutive prompt positions of one (layer, kv head).
Decode stages the chunks a dynamic head selects into its staging slots on the device, moving
only chunks that slot set does not already hold. Pinned memory needs CUDA; elsewhere the buffer
is ordinary memory and the copies are plain copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hybridkv_sglang.storage.page_tables import DynamicRowLayout

if TYPE_CHECKING:
    from hybridkv_sglang.storage.compact_layout import CompactLayerLayout


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

    def write(self, ids: Tensor, k_entries: Tensor, v_entries: Tensor) -> None:
        """Copy ``[m, C, D]`` device K/V into host chunks ``ids``.

        The copy completes before this returns (one stream sync per compaction), so the dense
        prefix may be released right after and staging never reads a half-written chunk.
        """
        if ids.numel() == 0:
            return
        self.k[ids] = k_entries.cpu()
        self.v[ids] = v_entries.cpu()

    def stage(self, ids: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """``[m, C, D]`` K and V of host chunks ``ids`` on ``device`` (non-blocking from pinned)."""
        k, v = self.k[ids], self.v[ids]
        if device.type == "cpu":
            return k, v
        return (
            k.pin_memory().to(device, non_blocking=True),
            v.pin_memory().to(device, non_blocking=True),
        )


def assign_staging_slots(staged: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """Place this step's chunks into staging slots, keeping chunks that are already staged.

    Args:
        staged: ``[R, n]`` int64 CPU, chunk held by each slot (``-1`` empty); updated in place.
        selected: ``[R, n]`` int64 CPU, this step's distinct chunk ids per row, by score.

    Returns:
        ``(slot_of, missing)``: ``[R, n]`` the slot each selected chunk is read from, and
        ``[R, n]`` bool, True where the chunk must be copied into its slot this step.
    """
    if selected.shape[1] == 0:
        return selected.clone(), torch.zeros_like(selected, dtype=torch.bool)
    match = selected.unsqueeze(2) == staged.unsqueeze(1)  # [R, sel, slot]
    hit = match.any(dim=2)
    slot_of = match.to(torch.int64).argmax(dim=2)
    slot_kept = match.any(dim=1)
    free_slots = torch.sort(slot_kept.to(torch.int8), dim=1, stable=True).indices
    miss_rank = torch.cumsum(~hit, dim=1) - 1
    slot_of = torch.where(hit, slot_of, free_slots.gather(1, miss_rank.clamp(min=0)))
    missing = ~hit
    staged.scatter_(1, slot_of, selected)
    return slot_of, missing


class ChunkStager:
    """Per decode step and layer: bring host-tier chunks into compact requests' staging slots."""

    def __init__(self, tier: HostTier, k_buffers: list[Tensor], v_buffers: list[Tensor]) -> None:
        """``k_buffers[l]`` / ``v_buffers[l]``: layer ``l``'s pool ``[slots, H_kv, D]``."""
        self.tier = tier
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.moved_chunks = 0
        self.reused_chunks = 0

    def stage(
        self, layer: int, compact: CompactLayerLayout, rows: DynamicRowLayout, chunks: Tensor
    ) -> Tensor:
        """Make ``chunks`` (``[n_d, n_sel]`` absolute ids, device) resident in staging slots.

        Returns, per selected chunk, the region chunk it is read from (staging slot ``j`` is
        region chunk ``first_chunk + j``). Reads this step's chunk ids back to the host: which
        chunks move is a host decision.
        """
        assert compact.staged is not None and compact.host_chunks is not None
        device = chunks.device
        selected = chunks.cpu()
        slot_of, missing = assign_staging_slots(compact.staged, selected)
        region_chunk = rows.first_chunk + slot_of
        row, pick = missing.nonzero(as_tuple=True)
        moved = int(row.numel())
        self.moved_chunks += moved
        self.reused_chunks += int(selected.numel()) - moved
        if moved:
            size = rows.chunk_size
            host_ids = compact.host_chunks[row, selected[row, pick] - rows.first_chunk]
            k, v = self.tier.stage(host_ids, device)
            offsets = region_chunk[row, pick].unsqueeze(1) * size + torch.arange(size)
            dst = compact.dynamic_regions[row.to(device).unsqueeze(1), offsets.to(device)]
            dst = dst.reshape(-1)
            k_buffer, v_buffer = self.k_buffers[layer], self.v_buffers[layer]
            k_buffer.view(-1, k_buffer.shape[-1])[dst] = k.reshape(-1, k_buffer.shape[-1])
            v_buffer.view(-1, v_buffer.shape[-1])[dst] = v.reshape(-1, v_buffer.shape[-1])
        return region_chunk.to(device)
