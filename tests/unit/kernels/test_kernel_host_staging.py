"""The staging twin, ``stage_host_chunks_ref`` (the definition the retrieval kernel's staging is
tested against bit for bit, in ``test_kernel_folded_tables``), against a plain-Python LRU model
of the staging rules over random churn and against what the index fill reads (the host tier's
chunks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from hybridkv_sglang.kernels.folded_tables import (
    CHUNK_BASE,
    DIRECT,
    FIRST_CHUNK,
    HOST_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    STAGE_SLOTS,
    STAGE_START,
    TOP_START,
)
from hybridkv_sglang.kernels.host_staging import HostStaging, stage_host_chunks_ref
from tests.unit.kernels.folded_meta_testlib import INT_OF, random_bits

PAD = 3
"""Arena values before the first row's range and after the last one's (must stay untouched)."""
MAX_AGE = 0x7FFFFFFF


def _seed() -> int:
    return time.time_ns() % 100_000


@dataclass
class Row:
    """One (request slot, layer, kv head) record that selects chunks, and its LRU model."""

    slot: int
    layer: int
    head: int
    n: int
    num_chunks: int
    stage_slots: int  # 0: chunks resident on the device (the kernel must leave it alone)
    model_staged: list[int] = field(default_factory=list)
    model_age: list[int] = field(default_factory=list)
    history: list[list[int]] = field(default_factory=list)

    def model_step(self, sel: list[int]) -> tuple[list[int], int]:
        """The staging rules, written out plainly: ``(slot of each selected chunk, misses)``."""
        held = self.model_staged
        hits = {c: held.index(c) for c in sel if c in held}  # index(): the lowest slot
        free = [s for s in range(self.stage_slots) if s not in hits.values()]
        free.sort(key=lambda s: (held[s] >= 0, -self.model_age[s], s))
        misses = [c for c in sel if c not in hits]
        slot_of = [hits[c] if c in hits else free[misses.index(c)] for c in sel]
        for c, s in zip(sel, slot_of, strict=True):
            held[s] = c
        self.model_age = [
            0 if s in slot_of else min(a + 1, MAX_AGE) for s, a in enumerate(self.model_age)
        ]
        return slot_of, len(misses)


@dataclass
class Staging:
    req_pool_indices: Tensor
    slot_of_row: Tensor
    row_meta: Tensor
    chunk_top: Tensor
    staged: Tensor
    stage_age: Tensor
    host_chunk_ids: Tensor
    fixed_values: Tensor
    host_k: Tensor
    host_v: Tensor
    k_entries: Tensor
    v_entries: Tensor
    moves: Tensor
    chunk_size: int
    rows: list[Row]

    def run(self, layer: int) -> None:
        meta = self.row_meta
        staging = HostStaging(
            self.staged,
            self.stage_age,
            self.host_chunk_ids,
            self.fixed_values,
            self.host_k,
            self.host_v,
            self.k_entries,
            self.v_entries,
            self.moves,
            chunk_size=self.chunk_size,
            max_slots=max(int(meta[..., STAGE_SLOTS].max()), 1),
        )
        stage_host_chunks_ref(
            self.req_pool_indices,
            self.slot_of_row,
            meta,
            layer,
            self.chunk_top,
            staging,
            max_selected=max(int(meta[..., NUM_SEL].max()), 1),
        )


def _random_staging(
    gen: torch.Generator,
    dtype: torch.dtype,
    *,
    batch: int = 5,
    layers: int = 2,
    heads: int = 2,
    chunk: int = 3,
    dim_k: int = 8,
    dim_v: int = 5,
    padded: int = 1,
) -> Staging:
    """``batch`` requests (the first with no slot) plus ``padded`` graph padding requests; each
    other row static, device-resident dynamic, or host-tier with ``S == n`` or ``S > n`` (the
    first request slots' layer 0 hold one of each, and one with ``S == 2 n``)."""

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    pool_rows = batch + 3
    rows_of = torch.randperm(pool_rows - 1, generator=gen)[:batch] + 1
    slot_of_row = torch.full((pool_rows,), -1, dtype=torch.int32)
    row_meta = torch.zeros(batch, layers, heads, NF, dtype=torch.int32)
    forced = {(1, 0, 0): 2, (1, 0, 1): 3, (2, 0, 0): 1, (2, 0, 1): 0, (3, 0, 0): 4}
    plans: list[tuple[int, int, int, int]] = []
    for b in range(1, batch):
        slot_of_row[rows_of[b]] = b
        for layer in range(layers):
            for h in range(heads):
                plans.append((b, layer, h, forced.get((b, layer, h), randint(0, 4))))
    host_rows = [p for p in plans if p[3] >= 2]
    fixed_need = sum(4 + 12 * chunk for _ in host_rows)
    entries = 2 * fixed_need + 17
    free_entries = torch.randperm(entries, generator=gen).to(torch.int32)
    capacity = 12 * len(host_rows) + 5
    free_host = torch.randperm(capacity, generator=gen).to(torch.int32)
    used = {"top": PAD, "stage": PAD, "host": PAD, "fixed": PAD, "entry": 0, "tier": 0}
    fixed: list[Tensor] = [torch.full((PAD,), -7, dtype=torch.int32)]
    staged: list[Tensor] = [torch.full((PAD,), -7, dtype=torch.int32)]
    stage_age: list[Tensor] = [torch.full((PAD,), -7, dtype=torch.int32)]
    host_ids: list[Tensor] = [torch.full((PAD,), -7, dtype=torch.int32)]
    rows: list[Row] = []
    for b, layer, h, kind in plans:
        m = row_meta[b, layer, h]
        if kind == 0:
            continue
        num_chunks = randint(2, 11)
        n = randint(1, min(num_chunks, 5) + 1)
        slots = 0 if kind == 1 else n if kind == 2 else n + randint(1, 5)
        if kind == 4:  # two steps' chunks always fit: re-selections two steps apart are hits
            n = randint(2, 4)
            slots, num_chunks = 2 * n, 2 * n + 1
        m[NUM_SEL], m[NUM_CHUNKS], m[TOP_START] = n, num_chunks, used["top"]
        used["top"] += n
        # a random earlier state: some slots empty, others holding distinct chunks, random
        # (tied) ages, so empty-first, oldest-first and lowest-index-first all decide
        held = torch.cat([torch.randperm(num_chunks, generator=gen), torch.full((slots,), -1)])
        held = held[:slots][torch.randperm(slots, generator=gen)]
        held[torch.rand(slots, generator=gen) < 0.4] = -1
        ages = torch.randint(0, 4, (slots,), generator=gen)
        rows.append(Row(b, layer, h, n, num_chunks, slots, held.tolist(), ages.tolist()))
        if kind == 1:
            continue
        staged.append(held.to(torch.int32))
        stage_age.append(ages.to(torch.int32))
        first = randint(0, 3)
        region = (first + slots) * chunk + randint(0, 3)  # what fill reads, then slack
        at = used["entry"]
        fixed.append(free_entries[at : at + region])
        m[FIRST_CHUNK], m[CHUNK_BASE], m[DIRECT] = first, used["fixed"], 1
        used["fixed"] += region
        used["entry"] += region
        host_ids.append(free_host[used["tier"] : used["tier"] + num_chunks])
        m[HOST_START] = used["host"]
        used["host"] += num_chunks
        used["tier"] += num_chunks
        m[STAGE_START], m[STAGE_SLOTS] = used["stage"], slots
        used["stage"] += slots
    row_meta[0] = row_meta[1]  # no pool row maps to slot 0: a kernel reading it double-stages
    for arena in (fixed, host_ids, staged, stage_age):
        arena.append(torch.full((PAD,), -7, dtype=torch.int32))
    state = Staging(
        req_pool_indices=torch.cat([rows_of, torch.zeros(padded, dtype=torch.int64)]),
        slot_of_row=slot_of_row,
        row_meta=row_meta,
        chunk_top=torch.full((used["top"] + PAD,), -7, dtype=torch.int32),
        staged=torch.cat(staged),
        stage_age=torch.cat(stage_age),
        host_chunk_ids=torch.cat(host_ids),
        fixed_values=torch.cat(fixed),
        host_k=random_bits((capacity, chunk, dim_k), dtype, gen),
        host_v=random_bits((capacity, chunk, dim_v), dtype, gen),
        k_entries=random_bits((entries, dim_k), dtype, gen),
        v_entries=random_bits((entries, dim_v), dtype, gen),
        moves=torch.zeros(batch, 2, dtype=torch.int64),
        chunk_size=chunk,
        rows=rows,
    )
    for row in rows:  # the KV of the chunks held at the start
        m = row_meta[row.slot, row.layer, row.head].tolist()
        for s, c in enumerate(row.model_staged):
            if c >= 0:
                host_id = int(state.host_chunk_ids[m[HOST_START] + c])
                at = m[CHUNK_BASE] + (m[FIRST_CHUNK] + s) * chunk
                entry = state.fixed_values[at : at + chunk].long()
                state.k_entries[entry] = state.host_k[host_id]
                state.v_entries[entry] = state.host_v[host_id]
    return state


def _bits(t: Tensor) -> Tensor:
    return t.view(INT_OF[t.dtype]) if t.is_floating_point() else t


def _select(state: Staging, layer: int, gen: torch.Generator) -> dict[int, list[int]]:
    """Random distinct chunks for every selecting row of ``layer``, written to ``chunk_top``."""
    picks = {}
    for i, row in enumerate(state.rows):
        if row.layer != layer:
            continue
        sel = torch.randperm(row.num_chunks, generator=gen)[: row.n]
        start = int(state.row_meta[row.slot, layer, row.head, TOP_START])
        state.chunk_top[start : start + row.n] = sel.to(torch.int32)
        picks[i] = sel.tolist()
    return picks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_churn_twin_matches_model_and_host_tier(dtype):
    """20 steps of random selections on every layer: twin == the plain model, the index fill's
    entries hold the host chunks, re-selections in reach are hits, and nothing outside the
    staging rows changes."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    ref = _random_staging(gen, dtype)
    layers, c = ref.row_meta.shape[1], ref.chunk_size
    reach_hits = long_reach_hits = 0
    for step in range(20):
        for layer in range(layers):
            picks = _select(ref, layer, gen)
            staged_before = ref.staged.clone()
            moves_before = ref.moves.clone()
            ref.run(layer)
            expected_moves = torch.zeros_like(ref.moves)
            for i, sel in picks.items():
                row = ref.rows[i]
                m = ref.row_meta[row.slot, layer, row.head].tolist()
                top = ref.chunk_top[m[TOP_START] : m[TOP_START] + row.n].tolist()
                if row.stage_slots == 0:  # not a host-tier row: untouched
                    assert top == sel, (seed, step, layer)
                    continue
                # the plain model of the rules (hits, LRU ties, ages)
                span = slice(m[STAGE_START], m[STAGE_START] + row.stage_slots)
                held_before = set(staged_before[span].tolist())
                slot_of, misses = row.model_step(sel)
                assert top == slot_of, (seed, step, layer, i)
                assert ref.staged[span].tolist() == row.model_staged, (seed, step, layer, i)
                assert ref.stage_age[span].tolist() == row.model_age, (seed, step, layer, i)
                assert misses == len(set(sel) - held_before)
                expected_moves[row.slot] += torch.tensor([misses, row.n])
                # (c) a chunk still within the cache's reach is not moved again: every chunk
                # chosen since its last use, that step included, fits the slots
                for chunk in sel:
                    last = [t for t, past in enumerate(row.history) if chunk in past]
                    if last and len({x for past in row.history[last[-1] :] for x in past}) <= (
                        row.stage_slots
                    ):
                        assert chunk in held_before, (seed, step, layer, i)
                        if row.stage_slots > row.n:
                            reach_hits += 1
                            long_reach_hits += last[-1] < len(row.history) - 1
                row.history.append(sel)
                # (a) what the index fill reads for each selected chunk is that host chunk
                for chunk, s in zip(sel, top, strict=True):
                    host_id = int(ref.host_chunk_ids[m[HOST_START] + chunk])
                    at = m[CHUNK_BASE] + (m[FIRST_CHUNK] + s) * c
                    entry = ref.fixed_values[at : at + c].long()
                    assert torch.equal(_bits(ref.k_entries[entry]), _bits(ref.host_k[host_id]))
                    assert torch.equal(_bits(ref.v_entries[entry]), _bits(ref.host_v[host_id]))
            assert torch.equal(ref.moves - moves_before, expected_moves), (seed, step, layer)
    assert reach_hits > 0 and long_reach_hits > 0, (seed, reach_hits, long_reach_hits)
    # untouched: arena padding, request slot 0 (no request) and graph padding
    for arena in (ref.chunk_top, ref.staged, ref.stage_age):
        assert bool((arena[:PAD] == -7).all()) and bool((arena[-PAD:] == -7).all())
    assert ref.moves[0].tolist() == [0, 0]


def test_twin_rejects_more_selected_than_slots():
    gen = torch.Generator().manual_seed(0)
    state = _random_staging(gen, torch.float32)
    row = next(r for r in state.rows if r.stage_slots > 0)
    state.row_meta[row.slot, row.layer, row.head, STAGE_SLOTS] = row.n - 1 if row.n > 1 else 0
    state.row_meta[row.slot, row.layer, row.head, NUM_SEL] = max(row.n, 2)
    with pytest.raises(ValueError, match="NUM_SEL <= STAGE_SLOTS"):
        state.run(row.layer)


def test_staging_rejects_mismatched_dtypes():
    """The check the retrieval kernel's wrapper and the twin share."""
    gen = torch.Generator().manual_seed(0)
    state = _random_staging(gen, torch.float32)
    state.host_v = state.host_v.to(torch.bfloat16)
    with pytest.raises(ValueError, match="expected one dtype"):
        state.run(0)
