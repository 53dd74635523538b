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
    HOST_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    POST_LEN,
    POST_START,
    PRE_LEN,
    STAGE_SLOTS,
    STAGE_START,
    TAIL_START,
    TOP_START,
)
from hybridkv_sglang.kernels.host_staging import HostStaging

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
    exact: bool = False,
) -> RandomBatch:
    """``batch`` requests (the first one dense, then random kinds) plus ``padded`` graph
    padding requests (pool row 0, length 1); bounds over ``width`` (default ``dim``) channels,
    uint8 ``codes`` or ``dtype`` values; a dynamic row selects at least ``min_selected`` of its
    chunks (or all of them). ``exact``: queries, bounds, offsets and scales are short dyadic
    numbers, so every score is exact in float32 whatever the order of its sums (kernel and
    twin then rank the same scores, ties included)."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    r = width or dim

    def dyadic(shape: tuple[int, ...], bound: int, step: float) -> Tensor:
        return torch.randint(-bound, bound + 1, shape, generator=gen) * step

    def random_bounds(count: int) -> tuple[Tensor, Tensor]:
        if codes:
            lo = torch.randint(0, 200, (count, r), generator=gen)
            return lo, lo + torch.randint(0, 56, (count, r), generator=gen)
        if exact:
            lo = dyadic((count, r), 32, 0.125)
            return lo, lo + torch.randint(0, 9, (count, r), generator=gen) * 0.125
        lo = torch.randn(count, r, generator=gen)
        return lo, lo + torch.rand(count, r, generator=gen)

    def random_params() -> tuple[Tensor, Tensor]:
        channels = torch.randperm(dim, generator=gen)[:r].to(torch.int32)
        if not codes:
            return channels, torch.stack([torch.zeros(r), torch.ones(r)])
        if exact:
            scale = 2.0 ** -torch.randint(4, 9, (r,), generator=gen).float()
            return channels, torch.stack([dyadic((r,), 8, 0.25), scale])
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
    q_shape = (pool_idx.numel() * heads, group, dim)
    q = dyadic(q_shape, 16, 0.125) if exact else torch.randn(q_shape, generator=gen)
    q = q.to(dtype)
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


INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Every bit pattern of ``dtype`` (NaN payloads, -0, infinities): copies must move bits."""
    info = torch.iinfo(INT_OF[dtype])
    bits = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    return bits.to(INT_OF[dtype]).view(dtype)


def attach_host_tier(
    batch: RandomBatch, gen: torch.Generator, kv_dtype: torch.dtype = torch.bfloat16, dim_v: int = 5
) -> HostStaging:
    """The first and about two thirds of the other compact dynamic rows of ``batch`` moved to a
    host tier (``NUM_SEL``
    to ``NUM_SEL + 3`` staging slots, some empty, some holding random chunks at random ages;
    fresh entries of their own, so no two rows share one), and the staging state over them;
    ``batch.row_meta`` and ``batch.fixed_values`` are updated in place."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    pad = torch.full((SCRATCH_PAD,), -7, dtype=torch.int32)
    meta, c = batch.row_meta, batch.chunk_size
    fixed, staged, ages, host_ids = [batch.fixed_values], [pad], [pad], [pad]
    used_fixed, used_stage, used_host = batch.fixed_values.numel(), SCRATCH_PAD, SCRATCH_PAD
    entries = tier = max_slots = 0
    for record in meta.view(-1, NF):
        eligible = int(record[DIRECT]) and int(record[NUM_SEL]) > 0
        if not eligible or (max_slots > 0 and randint(0, 3) == 0):  # the first always moves
            continue
        n, num_chunks = int(record[NUM_SEL]), int(record[NUM_CHUNKS])
        slots = n + randint(0, 4)
        held = torch.cat([torch.randperm(num_chunks, generator=gen), torch.full((slots,), -1)])
        held = held[:slots][torch.randperm(slots, generator=gen)]
        held[torch.rand(slots, generator=gen) < 0.4] = -1
        staged.append(held.to(torch.int32))
        ages.append(torch.randint(0, 4, (slots,), generator=gen, dtype=torch.int32))
        region = (int(record[FIRST_CHUNK]) + slots) * c
        fixed.append((entries + torch.randperm(region, generator=gen)).to(torch.int32))
        host_ids.append((tier + torch.randperm(num_chunks, generator=gen)).to(torch.int32))
        record[CHUNK_BASE], record[STAGE_START], record[STAGE_SLOTS] = used_fixed, used_stage, slots
        record[HOST_START] = used_host
        used_fixed, used_stage = used_fixed + region, used_stage + slots
        used_host += num_chunks
        entries, tier, max_slots = entries + region, tier + num_chunks, max(max_slots, slots)
    batch.fixed_values = torch.cat(fixed)
    dim_k = batch.q.shape[2]
    return HostStaging(
        staged=torch.cat([*staged, pad]),
        stage_age=torch.cat([*ages, pad]),
        host_chunk_ids=torch.cat([*host_ids, pad]),
        fixed_values=batch.fixed_values,
        host_k=random_bits((tier + 2, c, dim_k), kv_dtype, gen),
        host_v=random_bits((tier + 2, c, dim_v), kv_dtype, gen),
        k_entries=random_bits((entries + 5, dim_k), kv_dtype, gen),
        v_entries=random_bits((entries + 5, dim_v), kv_dtype, gen),
        moves=torch.zeros(meta.shape[0], 2, dtype=torch.int64),
        chunk_size=c,
        max_slots=max_slots,
    )
