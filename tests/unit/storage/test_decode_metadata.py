"""The decode metadata pools: records written once, capacity back after every release, a full
pool refusing (the request is then served dense), host mirrors in step with the device."""

from __future__ import annotations

import numpy as np
import torch

from hybridkv_sglang.kernels.folded_tables import NUM_SEL, PRE_LEN, TAIL_START
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RangeAllocator, RequestRows


def _rows(fixed: int, bounds: int, prompt: int = 100, seed: int = 0) -> RequestRows:
    gen = torch.Generator().manual_seed(seed)
    meta = torch.zeros(2, 2, 11, dtype=torch.int32)
    meta[..., PRE_LEN] = fixed // 4
    meta[..., TAIL_START] = prompt
    meta[0, 0, NUM_SEL] = 1 if bounds else 0
    values = torch.randint(0, prompt, (fixed,), generator=gen, dtype=torch.int32)
    kmin = torch.randn(bounds, 8, generator=gen)
    return RequestRows(meta, values, kmin, kmin + 1, prompt_len=prompt, chunk_size=4)


def _pools(fixed: int = 100, bounds: int = 20, slots: int = 3) -> DecodeMetadata:
    return DecodeMetadata(
        2,
        2,
        8,
        max_requests=slots,
        pool_rows=6,
        fixed_capacity=fixed,
        bound_capacity=bounds,
        bound_dtype=torch.float32,
        device="cpu",
    )


def test_records_land_at_their_offsets_and_capacity_comes_back():
    pools = _pools()
    first, second = _rows(40, 8, seed=1), _rows(32, 0, seed=2)
    assert pools.add(2, first) and pools.add(4, second)
    slot = int(pools.slot_of_row[4])
    start = int(pools.row_meta[slot, 0, 0, 0])
    assert torch.equal(pools.fixed_values[start : start + 32], second.fixed_values)
    assert pools.compressed_rows.tolist() == [False, False, True, False, True, False]
    assert pools.batch_has_compressed(np.array([1, 4])) and not pools.batch_has_compressed([3])
    assert pools.table_entries(np.array([2, 3]), np.array([110, 50])) == (
        first.prompt_entries + 2 * 10 + 2 * 50
    )
    pools.release(2)
    pools.release(4)
    pools.release(4)  # twice (finish after abort): no-op
    assert int(pools.slot_of_row[2]) >= 0  # cleared on the device only at the next step
    pools.apply_releases()
    assert bool((pools.slot_of_row == -1).all())
    usage = pools.usage()
    assert usage["requests"] == 0 and usage["free_slots"] == usage["slots"] == 3
    assert usage["free_fixed_values"] == 100 and usage["free_chunk_bounds"] == 20


def test_a_full_pool_refuses_and_keeps_what_it_holds():
    pools = _pools(fixed=50, slots=2)
    assert pools.add(1, _rows(40, 4))
    assert not pools.add(2, _rows(20, 4))  # fixed values do not fit
    assert not pools.compressed_rows[2] and int(pools.slot_of_row[2]) == -1
    assert pools.add(2, _rows(10, 4)) and not pools.add(3, _rows(0, 0))  # slots exhausted
    assert pools.usage()["requests"] == 2


def test_rewriting_a_row_frees_its_old_record():
    pools = _pools()
    assert pools.add(1, _rows(60, 10))
    assert pools.add(1, _rows(30, 5))  # compaction rewrites the request's records
    usage = pools.usage()
    assert usage["requests"] == 1 and usage["free_fixed_values"] == 70
    assert usage["free_chunk_bounds"] == 15


def test_range_allocator_coalesces_freed_ranges():
    ranges = RangeAllocator(10)
    a, b, c = ranges.alloc(3), ranges.alloc(3), ranges.alloc(4)
    assert (a, b, c) == (0, 3, 6) and ranges.alloc(1) is None
    ranges.free(a, 3)
    ranges.free(c, 4)
    ranges.free(b, 3)
    assert ranges.alloc(10) == 0
