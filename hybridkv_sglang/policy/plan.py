"""CompressionPlan: one request's decisions for every (layer, kv head), as the runtime reads them.

The plan is the only thing that crosses from the policy to the runtime and the page-table builder.
Rows are (layer, kv head) pairs in layer-major order: row ``l * H_kv + h``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybridkv_sglang.policy.byte_cost import POSITION_BYTES, ByteCosts
from hybridkv_sglang.policy.chunk_index import ChunkIndex
from hybridkv_sglang.policy.chunk_retrieval import (
    dynamic_head_budget,
    resident_bounds,
    retrievable_chunk_range,
)

OVER_BUDGET_SLACK = 0.005
"""A request reading more than its budget fraction (in bytes) plus this is reported as over
budget."""


@dataclass(frozen=True)
class CompressionPlan:
    """One request's compression decisions for every (layer, kv head)."""

    prompt_len: int
    """``N``, the dense prompt length the plan was made for."""
    is_dynamic: Tensor
    """``[L, H_kv]`` bool, ``True`` = dynamic head (chunk retrieval at decode)."""
    budgets: Tensor
    """``[L, H_kv]`` int64, prompt entries each head reads per decode step (static: kept
    positions; dynamic: ``b_dyn = prefix_end + min(k, retrievable chunks)·C + N - tail_start``,
    see :func:`dynamic_head_budget`)."""
    focus_size: Tensor
    """``[L, H_kv]`` int64, ``|U|`` per head, for stats."""
    kept_indptr: Tensor
    """``[L*H_kv + 1]`` int64, CSR over rows (layer-major, then head)."""
    kept_positions: Tensor
    """``[nnz]`` int32, ascending within a row, in ``[0, N)``. Static head: its kept positions;
    dynamic head: its resident positions ``[0, prefix_end) ∪ [tail_start, N)``, the sink and
    window rounded out to chunk borders (the retrieved chunks vary per step)."""
    chunk_kmin: Tensor | None
    """``[L, H_kv, n_chunks, r]`` chunk minima over the bounded channels, key-dtype values or
    uint8 codes (:mod:`~hybridkv_sglang.policy.chunk_index`; only dynamic rows are meaningful
    to read); ``None`` when no head is dynamic."""
    chunk_kmax: Tensor | None
    """Same as ``chunk_kmin``, chunk maxima."""
    chunk_size: int
    top_k_chunks: int
    sink: int = 0
    """Sink actually kept (clamped so that ``sink + window <= b_mean``)."""
    window: int = 0
    """Window the dynamic heads keep resident; in a plan without dynamic heads, the window the
    static heads keep (each clamped to ``b_mean``; the observation may have used more rows)."""
    policy: str = "hybridkv"
    """Name of the policy that made the plan (a key of ``POLICIES``)."""
    merge_evicted: bool = False
    """Static heads' evicted KV is to be merged into their kept KV (LOOK-M); only compact
    storage can hold merged KV."""
    head_budget: int | None = None
    """``b_mean``, the per-head entries the request is entitled to (``None``: not recorded)."""
    bound_channels: Tensor | None = None
    """``[L, H_kv, r]`` int32, the key channel of each bound column (``None`` with no bounds)."""
    bound_offset: Tensor | None = None
    """``[L, H_kv, r]`` float32: a bound column's value is ``offset + scale * stored``."""
    bound_scale: Tensor | None = None
    """``[L, H_kv, r]`` float32, see ``bound_offset``."""
    costs: ByteCosts | None = None
    """Bytes of a KV entry and of a dynamic head's chunk index (``None``: stats in entries
    only, as if KV entries were all a step reads)."""
    model_stats: dict[str, Any] | None = None
    """:meth:`stats` of the plan over all the model's kv heads when this plan is one
    tensor-parallel rank's share of it (``None``: this plan covers every head)."""

    def __post_init__(self) -> None:
        num_layers, num_heads = self.is_dynamic.shape
        rows = num_layers * num_heads
        assert self.is_dynamic.dtype == torch.bool
        assert self.budgets.shape == self.is_dynamic.shape == self.focus_size.shape
        assert self.kept_indptr.shape == (rows + 1,)
        assert self.kept_positions.dim() == 1
        assert (self.chunk_kmin is None) == (self.chunk_kmax is None) == (self.bound_scale is None)
        assert self.sink >= 0 and self.window >= 0 and self.sink + self.window <= self.prompt_len

    # ----------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return int(self.is_dynamic.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.is_dynamic.shape[1])

    @property
    def num_rows(self) -> int:
        """``L * H_kv``."""
        return self.num_layers * self.num_kv_heads

    @property
    def has_dynamic(self) -> bool:
        return bool(self.is_dynamic.any())

    @property
    def retrievable_chunks(self) -> tuple[int, int]:
        """``[first, end)`` chunk ids a dynamic head may retrieve: the full chunks inside
        ``[sink, N - window)`` (:func:`retrievable_chunk_range`)."""
        return retrievable_chunk_range(self.prompt_len, self.sink, self.window, self.chunk_size)

    # ------------------------------------------------------------------ rows
    def row(self, layer: int, head: int) -> int:
        """Row index of (layer, kv head)."""
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
            raise ValueError(
                f"expected layer in [0, {self.num_layers}) and head in [0, {self.num_kv_heads}), "
                f"got ({layer}, {head})"
            )
        return layer * self.num_kv_heads + head

    def rows_for_layer(self, layer: int) -> slice:
        """Slice of rows (into ``kept_indptr[:-1]``, ``budgets.view(-1)``...) of one layer."""
        start = self.row(layer, 0)
        return slice(start, start + self.num_kv_heads)

    def layer_csr(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's kept positions: ``indptr [H_kv + 1]`` int64 (rebased to 0) and
        ``positions [nnz_l]`` int32."""
        rows = self.rows_for_layer(layer)
        bounds = self.kept_indptr[rows.start : rows.stop + 1]
        start, stop = int(bounds[0]), int(bounds[-1])
        return bounds - start, self.kept_positions[start:stop]

    def kept_positions_of(self, layer: int, head: int) -> Tensor:
        """``[n]`` int32 kept positions of one head (dynamic head: sink + window)."""
        r = self.row(layer, head)
        return self.kept_positions[int(self.kept_indptr[r]) : int(self.kept_indptr[r + 1])]

    @property
    def chunk_index(self) -> ChunkIndex | None:
        """The dynamic heads' chunk index, ``[L, H_kv, ...]`` (``None`` with no bounds)."""
        if self.chunk_kmin is None:
            return None
        assert self.chunk_kmax is not None and self.bound_channels is not None
        assert self.bound_offset is not None and self.bound_scale is not None
        return ChunkIndex(
            self.chunk_kmin,
            self.chunk_kmax,
            self.bound_channels,
            self.bound_offset,
            self.bound_scale,
        )

    def resident_bounds(self) -> tuple[int, int]:
        """``(prefix_end, tail_start)`` of the dynamic heads' resident positions."""
        return resident_bounds(self.prompt_len, self.sink, self.window, self.chunk_size)

    def kept_counts(self) -> Tensor:
        """``[L, H_kv]`` int64 resident (always-attended) prompt positions per head."""
        return (self.kept_indptr[1:] - self.kept_indptr[:-1]).view(
            self.num_layers, self.num_kv_heads
        )

    def kept_entries(self) -> int:
        """Resident prompt entries over all heads (static kept + dynamic resident)."""
        return int(self.kept_positions.numel())

    # ----------------------------------------------------------------- stats
    def dynamic_read_per_step(self) -> int:
        """Prompt entries one dynamic head reads per decode step (``b_dyn``)."""
        return dynamic_head_budget(
            self.prompt_len, self.sink, self.window, self.chunk_size, self.top_k_chunks
        )

    def digest(self) -> str:
        """Fingerprint of which heads are dynamic and which positions every head keeps: two
        servers (at different TP sizes, say) made the same plan iff the digests match."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in (self.is_dynamic.to(torch.uint8), self.kept_indptr, self.kept_positions):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def reported_stats(self) -> dict[str, Any]:
        """The stats users see: those of the model-wide plan (every rank's heads)."""
        return self.stats() if self.model_stats is None else self.model_stats

    def stats(self) -> dict[str, Any]:
        """Plain numbers for logs and metrics; fractions are of the dense prompt KV bytes.

        ``read_fraction``: bytes read per decode step (the KV of every listed entry, static kept
        and ``n_dyn · b_dyn``, plus every dynamic head's chunk index, ``index_fraction`` of
        them); ``budget_fraction`` the fraction the request is entitled to (``b_mean / N``), and
        ``over_budget`` says it read more than that plus half a point
        (``OVER_BUDGET_SLACK``). ``device_fraction_in_place`` / ``device_fraction_compact``:
        what the request holds on the device in each storage mode (in place: the dense prefix
        and the index; compact: the entries a step reads and the index), ``host_fraction_compact``
        the dynamic heads' prompt KV on the host tier. ``positions_fraction``: the 4-byte kept
        positions the tables are built from (reported, not charged; see
        :mod:`~hybridkv_sglang.policy.byte_cost`). The same figures in entries keep their own
        names (``read_entries_per_step``, ``read_entries_fraction``).
        """
        counts = self.kept_counts()
        dyn = self.is_dynamic
        n_dyn = int(dyn.sum())
        static_kept = int(counts[~dyn].sum())
        dense = self.num_rows * self.prompt_len
        read = static_kept + n_dyn * self.dynamic_read_per_step()
        entry_bytes = 1 if self.costs is None else self.costs.entry_bytes
        first, end = self.retrievable_chunks
        index_bytes = (
            0
            if self.costs is None
            else n_dyn * self.costs.index_bytes(end - first, self.top_k_chunks)
        )
        dense_bytes = dense * entry_bytes
        read_bytes = read * entry_bytes + index_bytes
        positions_bytes = POSITION_BYTES * self.kept_entries() if self.costs is not None else 0
        read_fraction = read_bytes / dense_bytes if dense else 0.0
        budget_fraction = 1.0 if self.head_budget is None else self.head_budget / self.prompt_len
        host_bytes = n_dyn * self.prompt_len * entry_bytes if self.costs is not None else 0
        return {
            "policy": self.policy,
            "prompt_len": self.prompt_len,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "static_heads": self.num_rows - n_dyn,
            "dynamic_heads": n_dyn,
            "kept_entries": self.kept_entries(),
            "kept_entries_static": static_kept,
            "kept_entries_dynamic": int(counts[dyn].sum()),
            "read_entries_per_step": read,
            "read_entries_fraction": read / dense if dense else 0.0,
            "dense_entries": dense,
            "entry_bytes": entry_bytes,
            "dense_bytes": dense_bytes,
            "read_bytes_per_step": read_bytes,
            "index_bytes": index_bytes,
            "read_fraction": read_fraction,
            "index_fraction": index_bytes / dense_bytes if dense else 0.0,
            "positions_fraction": positions_bytes / dense_bytes if dense else 0.0,
            "device_fraction_in_place": (dense_bytes + index_bytes) / dense_bytes if dense else 0.0,
            "device_fraction_compact": read_fraction,
            "host_fraction_compact": host_bytes / dense_bytes if dense else 0.0,
            "budget_fraction": budget_fraction,
            "over_budget": read_fraction > budget_fraction + OVER_BUDGET_SLACK,
            "plan_digest": self.digest(),
        }
