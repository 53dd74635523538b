"""Stage 3b: dynamic heads retrieve the prompt chunks each decode query needs.

The prompt is cut into chunks of ``C`` tokens; per (layer, kv head, chunk) the element-wise min and
max of the keys bound every key's logit (Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference, Tang et al., ICML 2024). At each decode step the runtime scores the chunks with
``hybridkv_sglang.kernels.chunk_topk`` (the one implementation of the score) and attends over
sink + window + the top-k chunks + the decode tail.

Decision pinned here (the rule the runtime serves, ``storage.page_tables.DynamicRowLayout``):
only *full* chunks lying entirely inside ``[sink, N - w)`` are retrievable, chunks
``[ceil(sink / C), floor((N - w) / C))``; the partial chunks at the two borders are resident
instead. A dynamic head's resident set is therefore the sink and window rounded out to chunk
borders, ``[0, prefix_end) ∪ [tail_start, N)``, and its attended set at a decode step is the
disjoint union ``resident ∪ top-k chunks ∪ decode tail``: no position is read twice and every
row length is known on the host (``prefix_end + min(k, chunks)·C + N - tail_start + tail``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.policy.chunk_index import ChunkIndex


def chunk_bounds(keys: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Element-wise min and max of the keys of each chunk.

    Chunk ``c`` covers positions ``[c*C, min((c+1)*C, N))``; the last chunk may be partial.

    Args:
        keys: ``[N, H_kv, D]`` float, the prompt's keys of one layer.
        chunk_size: ``C >= 1``.

    Returns:
        ``(kmin, kmax)``, each ``[H_kv, ceil(N / C), D]`` in the dtype of ``keys`` (min and max
        are exact in any dtype).
    """
    if keys.dim() != 3:
        raise ValueError(f"expected keys [N, H_kv, D], got {tuple(keys.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, num_heads, dim = keys.shape
    k = keys.transpose(0, 1)  # [H, N, D]
    full = n // chunk_size
    body = k[:, : full * chunk_size].reshape(num_heads, full, chunk_size, dim)
    kmin, kmax = body.amin(dim=2), body.amax(dim=2)
    if full * chunk_size < n:
        tail = k[:, full * chunk_size :]
        kmin = torch.cat([kmin, tail.amin(dim=1, keepdim=True)], dim=1)
        kmax = torch.cat([kmax, tail.amax(dim=1, keepdim=True)], dim=1)
    return kmin.contiguous(), kmax.contiguous()


def retrievable_chunk_range(
    prompt_len: int, sink: int, window: int, chunk_size: int
) -> tuple[int, int]:
    """``[first, end)``: the full chunks inside ``[sink, N - w)``; empty when there is none.

    ``first = ceil(sink / C)``, ``end = max(first, floor((N - w) / C))``; a prompt whose first
    retrievable chunk would start at or beyond ``N`` has ``first = end = ceil(N / C)``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if prompt_len < 0 or sink < 0 or window < 0:
        raise ValueError(
            f"expected non-negative prompt_len, sink and window, got {prompt_len}, {sink}, {window}"
        )
    first = -(-sink // chunk_size)
    if first * chunk_size >= prompt_len:
        last = -(-prompt_len // chunk_size)
        return last, last
    return first, max(first, (prompt_len - window) // chunk_size)


def resident_bounds(prompt_len: int, sink: int, window: int, chunk_size: int) -> tuple[int, int]:
    """``(prefix_end, tail_start)``: a dynamic head always attends ``[0, prefix_end)`` and
    ``[tail_start, N)`` (sink and window rounded out to chunk borders; everything when no chunk
    is retrievable)."""
    first, end = retrievable_chunk_range(prompt_len, sink, window, chunk_size)
    prefix_end = min(first * chunk_size, prompt_len)
    return prefix_end, (end * chunk_size if end > first else prefix_end)


def resident_mask(
    prompt_len: int, sink: int, window: int, chunk_size: int, device: torch.device | str
) -> Tensor:
    """``[N]`` bool, the positions a dynamic head attends at every step (see resident_bounds)."""
    prefix_end, tail_start = resident_bounds(prompt_len, sink, window, chunk_size)
    pos = torch.arange(prompt_len, device=device)
    return (pos < prefix_end) | (pos >= tail_start)


def dynamic_head_budget(
    prompt_len: int, sink: int, window: int, chunk_size: int, top_k_chunks: int
) -> int:
    """``b_dyn``: prompt entries a dynamic head reads per decode step, at most ``N``.

    ``prefix_end + min(k, retrievable chunks) × C + (N - tail_start)``, the runtime's row length
    without the decode tail (``>= sink + w + min(k, chunks) × C``).
    """
    first, end = retrievable_chunk_range(prompt_len, sink, window, chunk_size)
    prefix_end, tail_start = resident_bounds(prompt_len, sink, window, chunk_size)
    return prefix_end + min(top_k_chunks, end - first) * chunk_size + prompt_len - tail_start


def budget_top_k(prompt_len: int, sink: int, window: int, chunk_size: int, head_budget: int) -> int:
    """The most chunks a dynamic head can retrieve per step and still read ``<= head_budget``.

    ``(head_budget - resident) // C`` clamped to ``[0, retrievable chunks]``: ``0`` when even the
    resident set (sink and window rounded out to chunk borders) exceeds the budget.
    """
    first, end = retrievable_chunk_range(prompt_len, sink, window, chunk_size)
    resident = dynamic_head_budget(prompt_len, sink, window, chunk_size, 0)
    return max(0, min(end - first, (head_budget - resident) // chunk_size))


def select_chunks(
    q: Tensor,
    index: ChunkIndex,
    first_chunk: int,
    num_chunks: Tensor,
    k: int,
    *,
    use_kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-k retrievable chunks of each dynamic row for one decode step.

    Args:
        q: ``[R, G, D]`` float, the decode query heads of each row's GQA group.
        index: the rows' chunk index, bounds ``[R, n_chunks, r]`` (chunk 0 = position 0); the
            score reads the query at the bounded channels and the bounds as key values.
        first_chunk: first retrievable chunk (``retrievable_chunk_range(...)[0]``, the same for
            every row since sink and chunk size are per-deployment).
        num_chunks: ``[R]`` int32, retrievable chunks of each row counted from ``first_chunk``.
        k: chunks per row.
        use_kernel: Triton ``chunk_topk`` (CUDA) instead of the torch reference.

    Returns:
        ``scores [R, n_chunks - first_chunk]`` float32 and ``top [R, k]`` int32 absolute chunk
        ids, ``-1`` padding.
    """
    from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_ref

    fn = chunk_topk if use_kernel else chunk_topk_ref
    lo, hi = index.dequantized()
    q_sel = index.query_channels(q).float()
    scores, top = fn(q_sel, lo[:, first_chunk:], hi[:, first_chunk:], num_chunks, k)
    return scores, torch.where(top >= 0, top + first_chunk, top)


def retrieved_mask(top: Tensor, prompt_len: int, chunk_size: int, lo: int, hi: int) -> Tensor:
    """Positions covered by the selected chunks, clipped to ``[lo, hi)`` (a no-op for chunks of
    :func:`retrievable_chunk_range` with ``lo, hi = resident_bounds(...)``).

    Args:
        top: ``[R, k]`` int chunk ids, ``-1`` = none.

    Returns:
        ``[R, N]`` bool.
    """
    if top.dim() != 2:
        raise ValueError(f"expected top [R, k], got {tuple(top.shape)}")
    rows = top.shape[0]
    n_chunks = math.ceil(prompt_len / chunk_size)
    picked = torch.zeros(rows, n_chunks + 1, dtype=torch.bool, device=top.device)
    # -1 lands in the spare last column, which no position maps to.
    picked.scatter_(1, torch.where(top >= 0, top, n_chunks).to(torch.int64), True)
    pos = torch.arange(prompt_len, device=top.device)
    mask = picked[:, pos // chunk_size]
    return mask & ((pos >= lo) & (pos < hi)).unsqueeze(0)


@dataclass(frozen=True)
class ChunkRetriever:
    """Dynamic heads: Quest-bound scoring of ``C``-token chunks, top ``k`` per decode step."""

    chunk_size: int = 16
    top_k_chunks: int = 8

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.top_k_chunks < 1:
            raise ValueError(f"top_k_chunks must be >= 1, got {self.top_k_chunks}")

    def bounds(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """``keys [N, H_kv, D]`` -> ``(kmin, kmax)`` ``[H_kv, n_chunks, D]``."""
        return chunk_bounds(keys, self.chunk_size)

    def attended_mask(
        self,
        q: Tensor,
        index: ChunkIndex,
        prompt_len: int,
        sink: int,
        window: int,
        *,
        use_kernel: bool = False,
    ) -> Tensor:
        """Prompt positions a dynamic row attends at one decode step (the decode tail aside).

        Args:
            q: ``[R, G, D]`` float; index: the rows' chunk index (bounds ``[R, n_chunks, r]``).

        Returns:
            ``[R, N]`` bool: the resident prefix and tail ∪ the top-k retrievable chunks.
        """
        first, end = retrievable_chunk_range(prompt_len, sink, window, self.chunk_size)
        prefix_end, tail_start = resident_bounds(prompt_len, sink, window, self.chunk_size)
        rows = q.shape[0]
        num = torch.full((rows,), end - first, dtype=torch.int32, device=q.device)
        _, top = select_chunks(q, index, first, num, self.top_k_chunks, use_kernel=use_kernel)
        mask = retrieved_mask(top, prompt_len, self.chunk_size, prefix_end, tail_start)
        resident = resident_mask(prompt_len, sink, window, self.chunk_size, q.device)
        return mask | resident.unsqueeze(0)
