"""Folded per-head FlashInfer page tables for one decode step (page size 1).

Each batch row is one (request, kv head) pair, request-major then head: row ``b * H_kv + h``.
In the folded view of the pool (``k_buffer[l].view(slots * H_kv, 1, 1, D)``) entry
``slot * H_kv + h`` is head h of that slot; a row lists the entries it attends over (DESIGN §3).

A row is described by positions in its request's ``req_to_token`` row (never slot ids: the radix
tree may re-point rows), as a CSR *selection* followed by one dense *tail* range:

- dense row: no selection, tail ``[0, seq_len)``;
- static compressed head: its kept prompt positions, tail ``[N, seq_len)`` (the decode tokens);
- dynamic head: see :class:`DynamicRowLayout`: the resident prefix ``[0, prefix_end)`` plus the
  positions of the chunks chosen this step, tail ``[tail_start, seq_len)``.

Host/device agreement (pitfall 2): every length is known on the host *before* the device work,
so ``kv_indptr_host`` is computed from host lengths and never read back from the device. Host
tensors reach the device with non-blocking copies only, so building a table never waits on the
GPU.

One layer of one decode step, sketched::

    lay = DynamicRowLayout.for_prompt(N, sink, window, C)          # per compressed request
    _, top = select_chunks(q_dyn, kmin, kmax, lay.first_chunk, num_chunks_dev, k)
    dyn = chunk_selection_positions(top, n_sel_host, C, prefix_host)  # n_sel = lay.num_selected(k)
    static = PositionsCSR.from_lists(kept_positions_per_static_row, device)  # cacheable
    selected = assemble_rows(B * H_kv, [(static, static_rows), (dyn, dyn_rows)], device)
    specs = FoldedRowSpecs.create(row_req, row_head, selected, tail_start, tail_end)
    table = build_folded_page_table(req_to_token, specs, H_kv)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.page_table_indices import (
    build_page_table_indices_auto,
    kv_indptr_from_lengths,
)

__all__ = [
    "DynamicRowLayout",
    "FoldedPageTable",
    "FoldedRowSpecs",
    "PositionsCSR",
    "append_ranges",
    "assemble_rows",
    "build_folded_page_table",
    "chunk_selection_positions",
    "concat_row_specs",
    "dense_row_specs",
    "prepend_entries",
    "take_from_regions",
]


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
    """Per-row position lists (the selections), CSR with a host mirror of the offsets.

    ``indptr_host`` is the source of truth for lengths; ``indptr`` is its device copy.
    """

    indptr_host: Tensor
    """``[R + 1]`` int64 CPU."""
    indptr: Tensor
    """``[R + 1]`` int32 device."""
    positions: Tensor
    """``[indptr_host[-1]]`` int32 device, positions in the request's ``req_to_token`` row."""

    @property
    def num_rows(self) -> int:
        return self.indptr_host.numel() - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr_host[-1])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def lengths_host(self) -> Tensor:
        """``[R]`` int64 CPU."""
        return self.indptr_host[1:] - self.indptr_host[:-1]

    def entry_rows(self) -> Tensor:
        """``[nnz]`` int64 device: the row each value belongs to (no host sync)."""
        return torch.repeat_interleave(
            torch.arange(self.num_rows, device=self.device),
            self.indptr.to(torch.int64).diff(),
            output_size=self.nnz,
        )

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


def assemble_rows(
    num_rows: int,
    parts: Sequence[tuple[PositionsCSR, Tensor | Sequence[int]]],
    device: torch.device | str,
) -> PositionsCSR:
    """Place the rows of several CSRs at given row ids of one ``num_rows``-row CSR.

    ``parts`` is a list of ``(csr, row_ids)``: row ``j`` of ``csr`` becomes row ``row_ids[j]``
    (host ints). Each target row is covered at most once; uncovered rows are empty. Runs on the
    device with no host sync (lengths come from the host mirrors).
    """
    lengths = torch.zeros(num_rows, dtype=torch.int64)
    placed = []
    for csr, ids in parts:
        ids_host = _host_int64(ids, "row_ids")
        if ids_host.numel() != csr.num_rows:
            raise ValueError(
                f"assemble_rows: expected {csr.num_rows} row ids for a {csr.num_rows}-row part, "
                f"got {ids_host.numel()}"
            )
        if ids_host.numel() and (int(ids_host.min()) < 0 or int(ids_host.max()) >= num_rows):
            raise ValueError(
                f"assemble_rows: expected row ids in [0, {num_rows}), got {ids_host.tolist()}"
            )
        if bool((lengths[ids_host] != 0).any()) or ids_host.unique().numel() != ids_host.numel():
            raise ValueError("assemble_rows: expected each row covered by at most one part")
        lengths[ids_host] = csr.lengths_host()
        placed.append((csr, ids_host))
    host = _indptr_host(lengths)
    out_indptr = _h2d(host, device, torch.int32)
    out = torch.empty(int(host[-1]), dtype=torch.int32, device=device)
    row_starts = out_indptr.to(torch.int64)
    for csr, ids_host in placed:
        if csr.nnz:
            _scatter_rows(out, row_starts[_h2d(ids_host, device)], csr)
    return PositionsCSR(host, out_indptr, out)


def append_ranges(
    csr: PositionsCSR, starts_host: Tensor | Sequence[int], ends_host: Tensor | Sequence[int]
) -> PositionsCSR:
    """Row ``r`` of ``csr`` followed by ``[starts[r], ends[r])``; no host sync."""
    starts = _host_int64(starts_host, "starts_host")
    ends = _host_int64(ends_host, "ends_host")
    if starts.numel() != csr.num_rows or ends.numel() != csr.num_rows:
        raise ValueError(
            f"append_ranges: expected {csr.num_rows} starts and ends, got {starts.numel()} and "
            f"{ends.numel()}"
        )
    extra = (ends - starts).clamp(min=0)
    ranges = PositionsCSR.from_device(extra, _range_values(starts, extra, csr.device))
    return _concat_rows(csr, ranges)


def take_from_regions(local: PositionsCSR, regions: Tensor) -> PositionsCSR:
    """Map row ``r``'s values ``j`` to ``regions[r, j]`` (e.g. region offsets to pool entries).

    Args:
        local: ``R`` rows of offsets into each row's region, all ``< W``.
        regions: ``[R, W]`` int device values.
    """
    if regions.dim() != 2 or regions.shape[0] != local.num_rows:
        raise ValueError(
            f"regions: expected shape ({local.num_rows}, W), got {tuple(regions.shape)}"
        )
    width = regions.shape[1]
    values = regions.reshape(-1)[local.entry_rows() * width + local.positions.to(torch.int64)]
    return PositionsCSR(local.indptr_host, local.indptr, values.to(torch.int32))


def _range_values(starts: Tensor, lengths: Tensor, device: torch.device) -> Tensor:
    """``cat(arange(s, s + n))`` over the rows, on ``device``, from host scalars."""
    total = int(lengths.sum())
    indptr = _indptr_host(lengths)
    packed = _h2d(torch.stack([starts, lengths, indptr[:-1]]), device)
    row = torch.repeat_interleave(
        torch.arange(starts.numel(), device=device), packed[1], output_size=total
    )
    return packed[0][row] + torch.arange(total, device=device) - packed[2][row]


def _concat_rows(first: PositionsCSR, second: PositionsCSR) -> PositionsCSR:
    """Row-wise concatenation ``first[r] ++ second[r]``; no host sync."""
    first_lengths = first.lengths_host()
    host = _indptr_host(first_lengths + second.lengths_host())
    device = first.device
    out = torch.empty(int(host[-1]), dtype=torch.int32, device=device)
    out_indptr = _h2d(host, device)
    row_starts = out_indptr[:-1]
    _scatter_rows(out, row_starts, first)
    _scatter_rows(out, row_starts + _h2d(first_lengths, device), second)
    return PositionsCSR(host, out_indptr.to(torch.int32), out)


def _scatter_rows(out: Tensor, row_starts: Tensor, csr: PositionsCSR) -> None:
    """Write row ``r`` of ``csr`` to ``out[row_starts[r]:]`` (``row_starts``: int64 device)."""
    if csr.nnz == 0:
        return
    row = csr.entry_rows()
    within = torch.arange(csr.nnz, device=out.device) - csr.indptr.to(torch.int64)[row]
    out[row_starts[row] + within] = csr.positions


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


def chunk_selection_positions(
    top: Tensor,
    num_selected_host: Tensor | Sequence[int],
    chunk_size: int,
    prefix_len_host: Tensor | Sequence[int] | None = None,
) -> PositionsCSR:
    """Dynamic rows' selections: ``[0, prefix_len)`` then the positions of the chosen chunks.

    Args:
        top: ``[R, k]`` int32/int64 device, absolute chunk ids by descending score, ``-1``
            padding at the end (``chunk_topk``'s ``top`` shifted by ``first_chunk``).
        num_selected_host: ``[R]`` host ints, valid ids per row: exactly
            ``min(k, num_chunks[r])`` for the ``num_chunks`` given to ``chunk_topk``
            (:meth:`DynamicRowLayout.num_selected`). The ids must be full chunks.
        chunk_size: ``C``; chunk ``c`` contributes ``[c*C, (c+1)*C)``.
        prefix_len_host: ``[R]`` host ints, resident prefix per row
            (:attr:`DynamicRowLayout.prefix_end`), or ``None`` for none.

    Returns:
        A CSR with ``prefix_len[r] + num_selected[r]*C`` positions in row r, built on the
        device of ``top`` with no host sync.
    """
    if top.dim() != 2:
        raise ValueError(f"top: expected a 2-D tensor [R, k], got shape {tuple(top.shape)}")
    rows, k = top.shape
    device = top.device
    n_sel = _host_int64(num_selected_host, "num_selected_host")
    prefix = (
        torch.zeros(rows, dtype=torch.int64)
        if prefix_len_host is None
        else _host_int64(prefix_len_host, "prefix_len_host")
    )
    if n_sel.numel() != rows or prefix.numel() != rows:
        raise ValueError(
            f"expected num_selected_host and prefix_len_host of {rows} rows, got "
            f"{n_sel.numel()} and {prefix.numel()}"
        )
    if rows and (int(n_sel.min()) < 0 or int(n_sel.max()) > k):
        raise ValueError(f"num_selected_host: expected values in [0, {k}], got {n_sel.tolist()}")
    lengths = prefix + n_sel * chunk_size
    host = _indptr_host(lengths)
    total = int(host[-1])
    packed = _h2d(torch.stack([host[:-1], prefix, lengths]), device)  # one copy
    start, prefix_dev = packed[0], packed[1]
    row = torch.repeat_interleave(torch.arange(rows, device=device), packed[2], output_size=total)
    j = torch.arange(total, device=device) - start[row]
    m = (j - prefix_dev[row]).clamp(min=0)
    top64 = top.to(torch.int64)
    chunk = top64[row, (m // chunk_size).clamp(max=max(k - 1, 0))] if k else m
    pos = torch.where(j < prefix_dev[row], j, chunk * chunk_size + m % chunk_size)
    return PositionsCSR(host, _h2d(host, device, torch.int32), pos.to(torch.int32))


# --------------------------------------------------------------------------- row specs
@dataclass(frozen=True)
class FoldedRowSpecs:
    """Per-row specs of one decode step's table: scalars on the host, selections on the device."""

    row_req: Tensor
    """``[R]`` int64 CPU, request pool index (the ``req_to_token`` row) of each row."""
    row_head: Tensor
    """``[R]`` int64 CPU, kv head of each row."""
    selected: PositionsCSR
    """Selected positions of each row."""
    tail_start: Tensor
    """``[R]`` int64 CPU, dense tail start."""
    tail_end: Tensor
    """``[R]`` int64 CPU, dense tail end (exclusive; normally the request's ``seq_len``)."""

    def __post_init__(self) -> None:
        rows = self.selected.num_rows
        for name in ("row_req", "row_head", "tail_start", "tail_end"):
            t = getattr(self, name)
            if t.device.type != "cpu" or t.shape != (rows,):
                raise ValueError(
                    f"FoldedRowSpecs.{name}: expected a CPU tensor of shape ({rows},), got "
                    f"shape {tuple(t.shape)} on {t.device}"
                )

    @property
    def num_rows(self) -> int:
        return self.selected.num_rows

    def row_lengths_host(self) -> Tensor:
        """``[R]`` int64 CPU: selection + tail length per row."""
        return self.selected.lengths_host() + (self.tail_end - self.tail_start).clamp(min=0)

    @classmethod
    def create(
        cls,
        row_req: Tensor | Sequence[int],
        row_head: Tensor | Sequence[int],
        selected: PositionsCSR,
        tail_start: Tensor | Sequence[int],
        tail_end: Tensor | Sequence[int],
    ) -> FoldedRowSpecs:
        """Build from host ints (lists or CPU tensors)."""
        return cls(
            _host_int64(row_req, "row_req"),
            _host_int64(row_head, "row_head"),
            selected,
            _host_int64(tail_start, "tail_start"),
            _host_int64(tail_end, "tail_end"),
        )


def dense_row_specs(
    req_pool_indices: Sequence[int] | Tensor,
    seq_lens: Sequence[int] | Tensor,
    num_kv_heads: int,
    device: torch.device | str,
) -> FoldedRowSpecs:
    """Dense requests: ``H_kv`` rows each, no selection, tail ``[0, seq_len)``."""
    req = _host_int64(req_pool_indices, "req_pool_indices")
    lens = _host_int64(seq_lens, "seq_lens")
    if req.numel() != lens.numel():
        raise ValueError(
            f"expected one seq_len per request, got {req.numel()} requests and "
            f"{lens.numel()} seq_lens"
        )
    rows = req.numel() * num_kv_heads
    return FoldedRowSpecs(
        req.repeat_interleave(num_kv_heads),
        torch.arange(num_kv_heads, dtype=torch.int64).repeat(req.numel()),
        PositionsCSR.empty(rows, device),
        torch.zeros(rows, dtype=torch.int64),
        lens.repeat_interleave(num_kv_heads),
    )


def concat_row_specs(specs: Sequence[FoldedRowSpecs]) -> FoldedRowSpecs:
    """Stack row specs in order (e.g. per-request specs into the batch's, request-major)."""
    if not specs:
        raise ValueError("concat_row_specs: expected at least one FoldedRowSpecs, got none")
    if len(specs) == 1:
        return specs[0]
    device = specs[0].selected.device
    offset = 0
    indptr_parts = [torch.zeros(1, dtype=torch.int64)]
    dev_indptr = [torch.zeros(1, dtype=torch.int32, device=device)]
    for s in specs:
        indptr_parts.append(s.selected.indptr_host[1:] + offset)
        dev_indptr.append(s.selected.indptr[1:] + offset)  # no sync: offset is a host int
        offset += s.selected.nnz
    selected = PositionsCSR(
        torch.cat(indptr_parts),
        torch.cat(dev_indptr),
        torch.cat([s.selected.positions for s in specs]),
    )
    return FoldedRowSpecs(
        torch.cat([s.row_req for s in specs]),
        torch.cat([s.row_head for s in specs]),
        selected,
        torch.cat([s.tail_start for s in specs]),
        torch.cat([s.tail_end for s in specs]),
    )


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class FoldedPageTable:
    """FlashInfer paged-KV metadata of one decode step, folded view, page size 1."""

    kv_indptr: Tensor
    """``[R + 1]`` int32 device."""
    kv_indices: Tensor
    """``[nnz]`` int32 device, folded entries ``slot * H_kv + h``."""
    kv_last_page_len: Tensor
    """``[R]`` int32 device, all ones (page size 1)."""
    kv_indptr_host: Tensor
    """``[R + 1]`` int32 CPU mirror of ``kv_indptr``, computed from host lengths (never a
    device-to-host copy): what ``plan()`` needs."""

    @property
    def num_rows(self) -> int:
        return self.kv_indptr_host.numel() - 1

    @property
    def nnz(self) -> int:
        return int(self.kv_indptr_host[-1])

    def row_lengths_host(self) -> Tensor:
        """``[R]`` int32 CPU."""
        return self.kv_indptr_host[1:] - self.kv_indptr_host[:-1]


def build_folded_page_table(
    req_to_token: Tensor,
    specs: FoldedRowSpecs,
    num_kv_heads: int,
    *,
    indices_out: Tensor | None = None,
) -> FoldedPageTable:
    """Fill one step's folded page table from row specs.

    The host indptr comes from the host lengths; the indices are filled by the
    ``build_page_table_indices`` kernel on CUDA (its torch twin elsewhere). No device-to-host
    copy on CUDA.

    Args:
        req_to_token: ``[P, ctx]`` int32, SGLang's ``req_to_token_pool.req_to_token``.
        specs: the rows, request-major then head.
        num_kv_heads: ``H_kv`` of the KV pool (entries are ``slot * H_kv + h``).
        indices_out: optional preallocated int32 buffer of at least ``nnz`` entries (CUDA
            graphs); the table's ``kv_indices`` is then a view of its first ``nnz`` entries.
    """
    device = req_to_token.device
    rows = specs.num_rows
    if rows and (int(specs.row_head.min()) < 0 or int(specs.row_head.max()) >= num_kv_heads):
        raise ValueError(
            f"row_head: expected heads in [0, {num_kv_heads}), got "
            f"{specs.row_head.unique().tolist()}"
        )
    if specs.selected.device != device:
        raise ValueError(
            f"selected positions: expected them on {device} (req_to_token's device), got "
            f"{specs.selected.device}"
        )
    tail_len = (specs.tail_end - specs.tail_start).clamp(min=0)
    indptr_host = kv_indptr_from_lengths(specs.selected.lengths_host(), tail_len)
    nnz = int(indptr_host[-1])
    # one host-to-device copy for the row scalars
    packed = _h2d(
        torch.stack([specs.row_req, specs.row_head, specs.tail_start, specs.tail_end]), device
    )
    kv_indptr = _h2d(indptr_host, device)
    if indices_out is None:
        out = torch.empty(nnz, dtype=torch.int32, device=device)
    else:
        if indices_out.dtype != torch.int32 or indices_out.dim() != 1 or indices_out.numel() < nnz:
            raise ValueError(
                f"indices_out: expected a 1-D int32 buffer of at least {nnz} entries, got "
                f"{indices_out.dtype} of shape {tuple(indices_out.shape)}"
            )
        out = indices_out[:nnz]
    kv_indices = build_page_table_indices_auto(
        req_to_token,
        packed[0],
        packed[1],
        specs.selected.indptr,
        specs.selected.positions,
        packed[2],
        packed[3],
        kv_indptr,
        num_kv_heads,
        out=out,
    )
    return FoldedPageTable(
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=torch.ones(rows, dtype=torch.int32, device=device),
        kv_indptr_host=indptr_host,
    )


def prepend_entries(direct: PositionsCSR, table: FoldedPageTable) -> FoldedPageTable:
    """Put ``direct`` (folded entry ids, e.g. compact entries) before each row of ``table``."""
    if direct.num_rows != table.num_rows:
        raise ValueError(
            f"prepend_entries: expected {table.num_rows} direct rows, got {direct.num_rows}"
        )
    if direct.nnz == 0:
        return table
    rows = PositionsCSR(table.kv_indptr_host.to(torch.int64), table.kv_indptr, table.kv_indices)
    merged = _concat_rows(direct, rows)
    return FoldedPageTable(
        kv_indptr=merged.indptr,
        kv_indices=merged.positions,
        kv_last_page_len=table.kv_last_page_len,
        kv_indptr_host=merged.indptr_host.to(table.kv_indptr_host.dtype),
    )
