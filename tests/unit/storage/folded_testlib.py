"""Shared builders for the folded page-table tests: random pools, random mixed batches (dense,
static and dynamic heads) built through the public API, and naive per-row definitions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.storage.page_tables import (
    DynamicRowLayout,
    FoldedRowSpecs,
    PositionsCSR,
    assemble_rows,
    chunk_selection_positions,
)


@dataclass
class Pool:
    """A fake SGLang KV pool of one layer: ``req_to_token [P, ctx]`` int32 with distinct slots."""

    req_to_token: Tensor
    k_buffer: Tensor  # [slots, H_kv, D]
    v_buffer: Tensor  # [slots, H_kv, D]

    @property
    def num_kv_heads(self) -> int:
        return self.k_buffer.shape[1]


def make_pool(
    gen: torch.Generator,
    num_reqs: int,
    ctx: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    spare_slots: int = 7,
) -> Pool:
    slots = num_reqs * ctx + spare_slots
    perm = torch.randperm(slots, generator=gen)[: num_reqs * ctx]
    req_to_token = perm.view(num_reqs, ctx).to(torch.int32)
    k = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    return Pool(req_to_token, k, v)


@dataclass
class Batch:
    """A decode batch: the specs built through the public API and the expected rows."""

    specs: FoldedRowSpecs
    req_pool_indices: list[int]
    seq_lens: list[int]
    row_positions: list[list[int]]  # expected positions per row, in order
    kinds: list[str]  # per row: "dense" | "static" | "dynamic"


def random_batch(
    gen: torch.Generator,
    pool: Pool,
    num_reqs: int,
    *,
    sink: int = 2,
    window: int = 5,
    chunk_size: int = 4,
    top_k: int = 3,
    full_selection: bool = False,
    device: str = "cpu",
) -> Batch:
    """Random mixed batch: some dense requests, compressed ones with static and dynamic heads.

    ``full_selection``: static heads keep every prompt position and dynamic heads select every
    retrievable chunk, so each row attends over the whole dense row.
    """
    num_pool, ctx = pool.req_to_token.shape
    heads = pool.num_kv_heads
    reqs = torch.randperm(num_pool, generator=gen)[:num_reqs].tolist()
    row_req: list[int] = []
    row_head: list[int] = []
    tail_start: list[int] = []
    tail_end: list[int] = []
    row_positions: list[list[int]] = []
    kinds: list[str] = []
    static_rows: list[int] = []
    static_lists: list[list[int]] = []
    dyn_rows: list[int] = []
    dyn_top: list[list[int]] = []
    dyn_nsel: list[int] = []
    dyn_prefix: list[int] = []
    seq_lens: list[int] = []
    for b, req in enumerate(reqs):
        prompt_len = int(torch.randint(1, ctx - 2, (1,), generator=gen))
        seq_len = prompt_len + int(torch.randint(0, ctx - prompt_len + 1, (1,), generator=gen))
        seq_lens.append(seq_len)
        dense_request = bool(torch.rand(1, generator=gen) < 0.3)
        layout = DynamicRowLayout.for_prompt(prompt_len, sink, window, chunk_size)
        for h in range(heads):
            r = b * heads + h
            row_req.append(req)
            row_head.append(h)
            tail_end.append(seq_len)
            if dense_request:
                kinds.append("dense")
                tail_start.append(0)
                row_positions.append(list(range(seq_len)))
            elif bool(torch.rand(1, generator=gen) < 0.5):
                kinds.append("static")
                if full_selection:
                    kept = torch.randperm(prompt_len, generator=gen)
                else:
                    n_keep = int(torch.randint(1, prompt_len + 1, (1,), generator=gen))
                    kept = torch.randperm(prompt_len, generator=gen)[:n_keep]
                static_rows.append(r)
                static_lists.append(kept.tolist())
                tail_start.append(prompt_len)
                row_positions.append(kept.tolist() + list(range(prompt_len, seq_len)))
            else:
                kinds.append("dynamic")
                k = top_k if not full_selection else max(top_k, layout.num_chunks)
                n_sel = layout.num_selected(k)
                chosen = (
                    layout.first_chunk + torch.randperm(layout.num_chunks, generator=gen)[:n_sel]
                ).tolist()
                dyn_rows.append(r)
                dyn_top.append(chosen)
                dyn_nsel.append(n_sel)
                dyn_prefix.append(layout.prefix_end)
                tail_start.append(layout.tail_start)
                positions = list(range(layout.prefix_end))
                for c in chosen:
                    positions += list(range(c * chunk_size, (c + 1) * chunk_size))
                positions += list(range(layout.tail_start, seq_len))
                row_positions.append(positions)
                assert len(positions) == layout.row_length(seq_len, k)
    num_rows = num_reqs * heads
    parts: list[tuple[PositionsCSR, list[int]]] = []
    if static_rows:
        parts.append((PositionsCSR.from_lists(static_lists, device), static_rows))
    if dyn_rows:
        width = max(max(dyn_nsel), 1) + 1  # one spare column of -1 padding
        top = torch.full((len(dyn_rows), width), -1, dtype=torch.int32)
        for i, chosen in enumerate(dyn_top):
            top[i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
        csr = chunk_selection_positions(top.to(device), dyn_nsel, chunk_size, dyn_prefix)
        parts.append((csr, dyn_rows))
    selected = assemble_rows(num_rows, parts, device)
    specs = FoldedRowSpecs.create(row_req, row_head, selected, tail_start, tail_end)
    for positions in row_positions:
        assert len(set(positions)) == len(positions), "a row must not repeat a position"
    return Batch(specs, reqs, seq_lens, row_positions, kinds)


def naive_indices(pool: Pool, batch: Batch) -> list[list[int]]:
    """Per-row folded entries by the definition, one Python loop per row."""
    r2t = pool.req_to_token
    heads = pool.num_kv_heads
    out = []
    for r, positions in enumerate(batch.row_positions):
        req = int(batch.specs.row_req[r])
        h = int(batch.specs.row_head[r])
        out.append([int(r2t[req, p]) * heads + h for p in positions])
    return out


def masked_dense_attention(q: Tensor, pool: Pool, batch: Batch, sm_scale: float) -> Tensor:
    """Dense attention of each request over its whole row, masked to each head's positions.

    Args:
        q: ``[B, H_q, D]``, query head ``j`` in the GQA group of kv head ``j // G``.

    Returns:
        ``[B, H_q, D]`` float64.
    """
    num_reqs, num_q_heads, _ = q.shape
    heads = pool.num_kv_heads
    group = num_q_heads // heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(num_reqs):
        seq_len = batch.seq_lens[b]
        slots = pool.req_to_token[batch.req_pool_indices[b], :seq_len].long()
        keys = pool.k_buffer[slots].double()  # [L, H_kv, D]
        values = pool.v_buffer[slots].double()
        for h in range(heads):
            mask = torch.zeros(seq_len, dtype=torch.bool)
            mask[batch.row_positions[b * heads + h]] = True
            qh = q[b, h * group : (h + 1) * group].double()  # [G, D]
            logits = qh @ keys[:, h].T * sm_scale  # [G, L]
            logits = logits.masked_fill(~mask, -math.inf)
            out[b, h * group : (h + 1) * group] = torch.softmax(logits, dim=-1) @ values[:, h]
    return out
