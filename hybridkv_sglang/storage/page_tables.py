"""Positions of a decode row, and the exact layout of a dynamic head's row.

Each decode batch row is one (request, kv head) pair, request-major then head. A row is described
by positions in its request's ``req_to_token`` row (never slot ids: the radix tree may re-point
rows):

- dense row: ``[0, seq_len)``;
- static compressed head: its kept prompt positions (a :class:`PositionsCSR` row), then
  ``[N, seq_len)`` (the decode tokens);
- dynamic head: see :class:`DynamicRowLayout`: the resident prefix ``[0, prefix_end)``, the
  positions of the chunks chosen this step, then ``[tail_start, seq_len)``.

The decode table itself (folded entries ``slot * H_kv + h``) is built on the device from
per-request row records by :mod:`hybridkv_sglang.kernels.folded_tables`
(:mod:`hybridkv_sglang.storage.decode_metadata` writes the records from these layouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DynamicRowLayout", "PositionsCSR"]


def _host_int64(x: Tensor | Sequence[int], name: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.int64)
    if t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a host (CPU) tensor or a list of ints, got a tensor on {t.device} "
            "(host lengths must never come from a device-to-host copy)"
        )
    return t.reshape(-1)


def _h2d(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """Host-to-device copy that never synchronises the stream (a blocking copy would wait for
    all queued GPU work); from pageable memory the source is staged before the call returns."""
    return t.to(device=device, dtype=dtype, non_blocking=True)


def _indptr_host(lengths: Tensor) -> Tensor:
    indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=indptr[1:])
    return indptr


# --------------------------------------------------------------------------- positions CSR
@dataclass(frozen=True)
class PositionsCSR:
    """Per-row value lists (kept positions, or compact entry ids), CSR with a host mirror of the
    offsets.

    ``indptr_host`` is the source of truth for lengths; ``indptr`` is its device copy.
    """

    indptr_host: Tensor
    """``[R + 1]`` int64 CPU."""
    indptr: Tensor
    """``[R + 1]`` int32 device."""
    positions: Tensor
    """``[indptr_host[-1]]`` int32 device, positions in the request's ``req_to_token`` row
    (compact storage: folded entry ids)."""

    @property
    def num_rows(self) -> int:
        return self.indptr_host.numel() - 1

    @property
    def nnz(self) -> int:
        """``indptr_host[-1]``, read from the shape: no tensor value is read."""
        return self.positions.numel()

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def lengths_host(self) -> Tensor:
        """``[R]`` int64 CPU."""
        return self.indptr_host[1:] - self.indptr_host[:-1]

    @classmethod
    def empty(cls, num_rows: int, device: torch.device | str) -> PositionsCSR:
        """``num_rows`` rows with no positions."""
        host = torch.zeros(num_rows + 1, dtype=torch.int64)
        return cls(
            host,
            torch.zeros(num_rows + 1, dtype=torch.int32, device=device),
            torch.empty(0, dtype=torch.int32, device=device),
        )

    @classmethod
    def from_device(cls, lengths_host: Tensor | Sequence[int], positions: Tensor) -> PositionsCSR:
        """Wrap device ``positions`` (rows back to back) given the host row lengths."""
        lengths = _host_int64(lengths_host, "lengths_host")
        host = _indptr_host(lengths)
        if positions.dim() != 1 or positions.numel() != int(host[-1]):
            raise ValueError(
                f"positions: expected a 1-D tensor of {int(host[-1])} entries (the sum of the "
                f"host lengths), got shape {tuple(positions.shape)}"
            )
        device = positions.device
        return cls(host, _h2d(host, device, torch.int32), positions.to(torch.int32))

    @classmethod
    def from_lists(
        cls, rows: Sequence[Tensor | Sequence[int]], device: torch.device | str
    ) -> PositionsCSR:
        """Build from per-row position lists (host or device tensors, or lists of ints).

        Row lengths are taken from the shapes (no device read).
        """
        if not rows:
            return cls.empty(0, device)
        parts = [_h2d(torch.as_tensor(r).reshape(-1), device, torch.int32) for r in rows]
        lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        return cls.from_device(lengths, torch.cat(parts))


# --------------------------------------------------------------------------- dynamic rows
@dataclass(frozen=True)
class DynamicRowLayout:
    """Exact host-side layout of a dynamic head's row, so its length is known without a sync.

    Chunk ``c`` covers positions ``[c*C, (c+1)*C)``. Only *full* chunks lying entirely inside
    ``[sink, N - w)`` are retrievable: chunks ``[first_chunk, end_chunk)`` with
    ``first_chunk = ceil(sink / C)`` and ``end_chunk = floor((N - w) / C)``. The partial chunks at
    the two borders are always counted as resident instead, so a row is the disjoint union::

        [0, prefix_end)  ∪  selected chunks  ∪  [tail_start, seq_len)

    with ``prefix_end = first_chunk*C >= sink`` and ``tail_start = end_chunk*C <= N - w`` (the
    window and the decode tokens are in the tail). Every selected chunk has exactly C positions,
    hence ``row_length = prefix_end + min(k, num_chunks)*C + (seq_len - tail_start)`` exactly.
    The resident part is at most ``2*(C-1)`` larger than ``sink + w``. Pass
    ``kmin[:, first_chunk:]`` and ``num_chunks`` to ``chunk_topk`` and shift the ids back by
    ``first_chunk`` (or use :func:`hybridkv_sglang.policy.select_chunks`, which does). This is
    the rule the runtime serves: policy-side simulations of retrieval should use it too.
    """

    prompt_len: int
    chunk_size: int
    first_chunk: int
    end_chunk: int

    @classmethod
    def for_prompt(
        cls, prompt_len: int, sink: int, window: int, chunk_size: int
    ) -> DynamicRowLayout:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if prompt_len < 0 or sink < 0 or window < 0:
            raise ValueError(
                f"expected non-negative prompt_len, sink and window, got {prompt_len}, {sink}, "
                f"{window}"
            )
        first = -(-sink // chunk_size)
        if first * chunk_size >= prompt_len:  # tiny prompt: all of it is the resident prefix
            last = -(-prompt_len // chunk_size)
            return cls(prompt_len, chunk_size, last, last)
        end = max(first, (prompt_len - window) // chunk_size)
        return cls(prompt_len, chunk_size, first, end)

    @property
    def num_chunks(self) -> int:
        """Retrievable chunks, ``end_chunk - first_chunk``."""
        return self.end_chunk - self.first_chunk

    @property
    def prefix_end(self) -> int:
        """End of the resident prefix (sink rounded up to a chunk border, at most N)."""
        return min(self.first_chunk * self.chunk_size, self.prompt_len)

    @property
    def tail_start(self) -> int:
        """Start of the dense tail (window rounded down to a chunk border)."""
        if self.num_chunks == 0:
            return self.prefix_end
        return self.end_chunk * self.chunk_size

    def num_selected(self, k: int) -> int:
        """Chunks actually selected by a top-``k``: ``min(k, num_chunks)``."""
        return min(k, self.num_chunks)

    def row_length(self, seq_len: int, k: int) -> int:
        """Entries of the row at dense length ``seq_len`` (``>= N``) with top-``k`` chunks."""
        return self.prefix_end + self.num_selected(k) * self.chunk_size + seq_len - self.tail_start
