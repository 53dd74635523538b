"""Random decode metadata of every row kind (dense, in place static/dynamic, compact
static/dynamic), for the folded-table kernels' tests. Dynamic rows' bounds are 8-bit codes with
random offsets and scales, or values in the query dtype with identity parameters, over ``r``
random key channels; their retrieval scratch is laid out as the cost model charges it
(``ceil(NUM_CHUNKS / CANDIDATE_BLOCK) * NUM_SEL`` candidates, ``NUM_SEL`` selected ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    CAND_START,
    CANDIDATE_BLOCK,
    CHUNK_BASE,
    DIRECT,
    FIRST_CHUNK,
    FIXED_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    POST_LEN,
    POST_START,
    PRE_LEN,
    TAIL_START,
    TOP_START,
)

SCRATCH_PAD = 3
"""Scratch slots before the first row's (so offsets start past 0) and after the last one's:
the kernels must leave them alone."""


@dataclass
class RandomBatch:
    req_to_token: Tensor
    req_pool_indices: Tensor
    seq_lens: Tensor
    slot_of_row: Tensor
    row_meta: Tensor
    fixed_values: Tensor
    kmin: Tensor
    kmax: Tensor
    bound_channels: Tensor
    bound_affine: Tensor
    q: Tensor
    chunk_size: int
    candidate_slots: int
    """Candidate arena size: every dynamic row's slots plus ``SCRATCH_PAD`` on each side."""
    top_slots: int

    @property
    def num_layers(self) -> int:
        return self.row_meta.shape[1]


def random_batch(
    gen: torch.Generator,
    *,
    batch: int = 5,
    layers: int = 3,
    heads: int = 2,
    group: int = 3,
    dim: int = 16,
    chunk: int = 4,
    ctx: int = 160,
    padded: int = 1,
    dtype: torch.dtype = torch.float32,
    width: int | None = None,
    codes: bool = False,
    min_selected: int = 1,
) -> RandomBatch:
    """``batch`` requests (the first one dense, then random kinds) plus ``padded`` graph
    padding requests (pool row 0, length 1); bounds over ``width`` (default ``dim``) channels,
    uint8 ``codes`` or ``dtype`` values; a dynamic row selects at least ``min_selected`` of its
    chunks (or all of them)."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    r = width or dim

    def random_bounds(count: int) -> tuple[Tensor, Tensor]:
        if codes:
            lo = torch.randint(0, 200, (count, r), generator=gen)
            return lo, lo + torch.randint(0, 56, (count, r), generator=gen)
        lo = torch.randn(count, r, generator=gen)
        return lo, lo + torch.rand(count, r, generator=gen)

    def random_params() -> tuple[Tensor, Tensor]:
        channels = torch.randperm(dim, generator=gen)[:r].to(torch.int32)
        if not codes:
            return channels, torch.stack([torch.zeros(r), torch.ones(r)])
        scale = torch.rand(r, generator=gen) * 0.05
        return channels, torch.stack([torch.randn(r, generator=gen), scale])

    pool_rows = batch + 3
    slots = max(4096, pool_rows * ctx)
    req_to_token = torch.randperm(slots, generator=gen)[: pool_rows * ctx].to(torch.int32)
    req_to_token = req_to_token.reshape(pool_rows, ctx)
    rows_of = torch.randperm(pool_rows - 1, generator=gen)[:batch] + 1
    slot_of_row = torch.full((pool_rows,), -1, dtype=torch.int32)
    row_meta = torch.zeros(batch, layers, heads, NF, dtype=torch.int32)
    fixed: list[Tensor] = [torch.zeros(3, dtype=torch.int32)]  # offsets start past 0
    bounds: list[tuple[Tensor, Tensor]] = [random_bounds(2)]  # offsets start past 0
    params: list[tuple[Tensor, Tensor]] = [random_params()]
    used_fixed = 3
    used_cand = used_top = SCRATCH_PAD
    seq_lens = []
    for b in range(batch):
        prompt = randint(3 * chunk + 8, ctx - 12)
        seq = prompt + randint(1, 10)
        seq_lens.append(seq)
        if b == 0:
            continue
        compact = b % 2 == 0
        slot_of_row[rows_of[b]] = b
        for layer in range(layers):
            for h in range(heads):
                m = row_meta[b, layer, h]
                dynamic = randint(0, 2) == 1
                if not dynamic:
                    keep = randint(1, prompt)
                    values = torch.randperm(prompt, generator=gen)[:keep].sort().values
                    if compact:
                        values = torch.randint(0, slots * heads, (keep,), generator=gen)
                    fixed.append(values.to(torch.int32))
                    m[FIXED_START], m[PRE_LEN], m[TAIL_START] = used_fixed, keep, prompt
                    m[DIRECT] = int(compact)
                    used_fixed += keep
                    continue
                first = randint(0, 2)
                end = max(first + 1, (prompt - randint(1, 9)) // chunk)
                num_chunks = end - first
                nsel = randint(min(min_selected, num_chunks), num_chunks + 1)
                m[NUM_SEL], m[NUM_CHUNKS], m[FIRST_CHUNK] = nsel, num_chunks, first
                m[CAND_START], m[TOP_START] = used_cand, used_top
                used_cand += -(-num_chunks // CANDIDATE_BLOCK) * nsel
                used_top += nsel
                m[BOUNDS_START] = sum(pair[0].shape[0] for pair in bounds)
                m[PARAM_ROW] = len(params)
                bounds.append(random_bounds(num_chunks))
                params.append(random_params())
                prefix = first * chunk
                if compact:
                    region = torch.randint(0, slots * heads, (prompt,), generator=gen)
                    fixed.append(region.to(torch.int32))
                    m[FIXED_START], m[PRE_LEN] = used_fixed, prefix
                    m[POST_START], m[POST_LEN] = used_fixed + end * chunk, prompt - end * chunk
                    m[CHUNK_BASE], m[TAIL_START], m[DIRECT] = used_fixed, prompt, 1
                    used_fixed += prompt
                else:
                    fixed.append(torch.arange(prefix, dtype=torch.int32))
                    m[FIXED_START], m[PRE_LEN], m[TAIL_START] = used_fixed, prefix, end * chunk
                    used_fixed += prefix
    bound_dtype = torch.uint8 if codes else dtype
    kmin = torch.cat([pair[0] for pair in bounds]).to(bound_dtype)
    kmax = torch.cat([pair[1] for pair in bounds]).to(bound_dtype)
    pool_idx = torch.cat([rows_of, torch.zeros(padded, dtype=torch.int64)])
    lens = torch.tensor(seq_lens + [1] * padded, dtype=torch.int64)
    q = torch.randn(pool_idx.numel() * heads, group, dim, generator=gen).to(dtype)
    return RandomBatch(
        req_to_token,
        pool_idx,
        lens,
        slot_of_row,
        row_meta,
        torch.cat(fixed),
        kmin,
        kmax,
        torch.stack([pair[0] for pair in params]),
        torch.stack([pair[1] for pair in params]),
        q,
        chunk,
        used_cand + SCRATCH_PAD,
        used_top + SCRATCH_PAD,
    )
