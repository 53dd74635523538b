"""The decode metadata pools: records written once, capacity back after every release, a full
pool refusing (the request is then served dense), host mirrors in step with the device; the
sizing's bytes per token count every arena."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    CAND_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    PRE_LEN,
    TAIL_START,
    TOP_START,
)
from hybridkv_sglang.storage.decode_metadata import (
    DecodeMetadata,
    PoolSizing,
    RangeAllocator,
    RequestRows,
    reserve_fraction,
)

WIDTH = 4
"""Bound columns (r) of these pools."""


def _rows(
    fixed: int, bounds: int, prompt: int = 100, seed: int = 0, dtype: torch.dtype = torch.uint8
) -> RequestRows:
    """One dynamic row (layer 0, head 0) with ``bounds`` chunks selecting up to 2 of them
    when ``bounds``, else none."""
    gen = torch.Generator().manual_seed(seed)
    meta = torch.zeros(2, 2, NF, dtype=torch.int32)
    meta[..., PRE_LEN] = fixed // 4
    meta[..., TAIL_START] = prompt
    meta[0, 0, NUM_SEL], meta[0, 0, NUM_CHUNKS] = min(2, bounds), bounds
    values = torch.randint(0, prompt, (fixed,), generator=gen, dtype=torch.int32)
    kmin = torch.randint(0, 200, (bounds, WIDTH), generator=gen).to(dtype)
    params = 1 if bounds else 0
    channels = torch.randint(0, 16, (params, WIDTH), generator=gen, dtype=torch.int32)
    affine = torch.rand(params, 2, WIDTH, generator=gen)
    return RequestRows(meta, values, kmin, kmin + 1, channels, affine, prompt, chunk_size=4)


def _pools(
    fixed: int = 100, bounds: int = 20, slots: int = 3, params: int = 4, scratch: int = 10
) -> DecodeMetadata:
    """Pools of these capacities, ``scratch`` slots in both the candidate and the top arena."""
    return DecodeMetadata(
        2,
        2,
        WIDTH,
        max_requests=slots,
        pool_rows=6,
        fixed_capacity=fixed,
        bound_capacity=bounds,
        param_capacity=params,
        candidate_capacity=scratch,
        top_capacity=scratch,
        bound_dtype=torch.uint8,
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
    pools.release(2)
    pools.release(4)
    pools.release(4)  # twice (finish after abort): no-op
    assert int(pools.slot_of_row[2]) >= 0  # cleared on the device only at the next step
    pools.apply_releases()
    assert bool((pools.slot_of_row == -1).all())
    usage = pools.usage()
    assert usage["requests"] == 0 and usage["free_slots"] == usage["slots"] == 3
    assert usage["free_fixed_values"] == 100 and usage["free_chunk_bounds"] == 20
    assert usage["free_param_rows"] == usage["param_rows"] == 4
    assert usage["free_candidate_slots"] == usage["candidate_slots"] == 10
    assert usage["free_top_slots"] == usage["top_slots"] == 10


def test_dynamic_rows_hold_their_own_scratch():
    """Each dynamic row's candidates (a block of 32 chunks or fewer: ``NUM_SEL`` of them) and
    selected ids get ranges of their own; a static row holds none."""
    pools = _pools()
    first, second, static = _rows(8, 5, seed=1), _rows(8, 1, seed=2), _rows(8, 0, seed=3)
    assert (first.candidate_slots, first.top_slots) == (2, 2)
    assert (second.candidate_slots, second.top_slots) == (1, 1)
    assert (static.candidate_slots, static.top_slots) == (0, 0)
    assert pools.add(1, first) and pools.add(2, second) and pools.add(3, static)
    ranges = set()
    for row in (1, 2):
        record = pools.row_meta[int(pools.slot_of_row[row]), 0, 0]
        ranges |= {(int(record[CAND_START]) + i, "cand") for i in range(int(record[NUM_SEL]))}
        ranges |= {(int(record[TOP_START]) + i, "top") for i in range(int(record[NUM_SEL]))}
    assert len(ranges) == 6
    usage = pools.usage()
    assert usage["free_candidate_slots"] == usage["free_top_slots"] == 7


def test_full_scratch_refuses_and_gives_the_other_ranges_back():
    pools = _pools(scratch=3)
    assert pools.add(1, _rows(10, 4))
    assert not pools.add(2, _rows(10, 4))
    usage = pools.usage()
    assert usage["requests"] == 1 and usage["free_fixed_values"] == 90
    assert usage["free_chunk_bounds"] == 16 and usage["free_param_rows"] == 3
    assert usage["free_candidate_slots"] == usage["free_top_slots"] == 1


def test_dynamic_rows_point_at_their_bounds_and_parameters():
    pools = _pools()
    first, second = _rows(8, 5, seed=1), _rows(8, 3, seed=2)
    assert pools.add(1, first) and pools.add(2, second)
    for row, rows in ((1, first), (2, second)):
        record = pools.row_meta[int(pools.slot_of_row[row]), 0, 0]
        start, param = int(record[BOUNDS_START]), int(record[PARAM_ROW])
        assert torch.equal(pools.kmin[start : start + rows.kmin.shape[0]], rows.kmin)
        assert torch.equal(pools.kmax[start : start + rows.kmin.shape[0]], rows.kmax)
        assert torch.equal(pools.bound_channels[param], rows.bound_channels[0])
        assert torch.equal(pools.bound_affine[param], rows.bound_affine[0])
    assert pools.usage()["free_param_rows"] == 2


def test_bounds_of_another_dtype_or_width_are_refused():
    pools = _pools()
    with pytest.raises(ValueError, match=r"chunk bounds: expected torch\.uint8"):
        pools.add(1, _rows(8, 2, dtype=torch.float32))
    wide = _rows(8, 2)
    wide = RequestRows(
        wide.meta,
        wide.fixed_values,
        torch.zeros(2, WIDTH + 1, dtype=torch.uint8),
        torch.zeros(2, WIDTH + 1, dtype=torch.uint8),
        torch.zeros(1, WIDTH + 1, dtype=torch.int32),
        torch.zeros(1, 2, WIDTH + 1),
        wide.prompt_len,
        wide.chunk_size,
    )
    with pytest.raises(ValueError, match=rf"\[chunks, {WIDTH}\]"):
        pools.add(1, wide)


def test_a_full_pool_refuses_and_keeps_what_it_holds():
    pools = _pools(fixed=50, slots=2)
    assert pools.add(1, _rows(40, 4))
    assert not pools.add(2, _rows(20, 4))  # fixed values do not fit
    assert not pools.compressed_rows[2] and int(pools.slot_of_row[2]) == -1
    assert pools.add(2, _rows(10, 4)) and not pools.add(3, _rows(0, 0))  # slots exhausted
    assert pools.usage()["requests"] == 2


def test_full_parameter_rows_refuse_and_give_the_other_ranges_back():
    pools = _pools(params=1)
    assert pools.add(1, _rows(10, 4))
    assert not pools.add(2, _rows(10, 4))
    usage = pools.usage()
    assert usage["requests"] == 1 and usage["free_fixed_values"] == 90
    assert usage["free_chunk_bounds"] == 16 and usage["free_param_rows"] == 0


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


def test_sizing_counts_every_arena_per_kv_token():
    """Bounds (2 r values a chunk), parameters (12 bytes per channel of each dynamic row, at
    most one per min_prompt_tokens dynamic entries) and scratch (8 bytes per candidate: k per
    32 chunks and k per row; 4 per selected id: k per row, at most one per chunk)."""
    sizing = PoolSizing.of(
        1.0, 0.5, 16, "in_place", 0.1, None,
        bound_channels=16, uint8_bounds=True, min_prompt_tokens=256, top_k_chunks=8,
    )  # fmt: skip
    assert sizing.bound_width(128) == 16 and sizing.bound_dtype(torch.bfloat16) == torch.uint8
    scratch = 8 * (8 / (32 * 16) + 8 / 256) + 4 * 8 / 256
    assert sizing.bytes_per_entry(128, 2) == pytest.approx(
        4 + 0.5 * (32 / 16 + 192 / 256 + scratch)
    )
    assert sizing.bound_chunks(1 << 20) == (1 << 19) // 16 + 1
    assert sizing.param_rows(1 << 20) == (1 << 19) // 256 + 1
    assert sizing.candidate_slots(1 << 20) == 8 * ((1 << 19) // 16) // 32 + 8 * (
        (1 << 19) // 256 + 1
    )
    assert sizing.top_slots(1 << 20) == 8 * ((1 << 19) // 256 + 1)
    plain = PoolSizing.of(
        1.0, 0.5, 16, "compact", 0.1, None,
        bound_channels=None, uint8_bounds=False, min_prompt_tokens=0, top_k_chunks=8,
    )  # fmt: skip
    assert plain.bound_width(128) == 128 and plain.bound_dtype(torch.bfloat16) == torch.bfloat16
    # compact at 10 %: up to 10 prompts per pool entry; short prompts: one row per chunk, so
    # one selected id per chunk
    scratch = 8 * (8 / (32 * 16) + 8 / 16) + 4 / 16
    assert plain.bytes_per_entry(128, 2) == pytest.approx(4 + 5 * (512 / 16 + 1536 / 16 + scratch))
    assert plain.top_slots(1 << 20) == plain.bound_chunks(1 << 20)
    assert PoolSizing.of(
        1.0, 0.5, 16, "compact", 0.1, None,
        bound_channels=300, uint8_bounds=True, min_prompt_tokens=256, top_k_chunks=8,
    ).bound_width(128) == 128  # fmt: skip


@pytest.mark.parametrize("top_k", [1, 8, 40])
def test_sized_scratch_holds_every_request_the_bounds_hold(top_k):
    """Requests of dynamic rows of any chunk count (at least ``min_prompt_tokens`` prompt
    entries each) that fill the bounds arena fit the scratch arenas sized for it."""
    sizing = PoolSizing.of(
        1.0, 1.0, 16, "in_place", 0.1, None,
        bound_channels=4, uint8_bounds=True, min_prompt_tokens=64, top_k_chunks=top_k,
    )  # fmt: skip
    entries = 1 << 14
    for chunks_per_row in (4, 31, 33, 64, 100, 1024):
        rows = min(entries // (chunks_per_row * 16), entries // 64)
        candidates = rows * -(-chunks_per_row // 32) * min(top_k, chunks_per_row)
        assert rows * chunks_per_row <= sizing.bound_chunks(entries)
        assert candidates <= sizing.candidate_slots(entries), chunks_per_row
        assert rows * min(top_k, chunks_per_row) <= sizing.top_slots(entries)


@pytest.mark.parametrize(("storage", "most"), [("in_place", 0.012), ("compact", 0.048)])
def test_codes_over_16_channels_reserve_under_5_percent_at_7b_shapes(storage, most):
    """Qwen2.5-VL-7B (28 layers, 4 kv heads, D 128, bf16) at budget 0.1, chunks of 16, half
    the heads dynamic, k = 8: 1.1 % in place, 4.7 % compact with the host tier's staging state
    (plain bounds: 4.5 % and 39.1 %)."""
    shapes = {"num_layers": 28, "num_kv_heads": 4, "head_dim": 128, "kv_bytes": 2}
    common = {"chunk_size": 16, "max_dynamic_fraction": 0.5, "storage": storage, "budget": 0.1}
    codes = reserve_fraction(**shapes, bound_channels=16, uint8_bounds=True, **common)
    plain = reserve_fraction(**shapes, bound_channels=None, uint8_bounds=False, **common)
    assert codes <= most < 0.05 and plain > 3 * codes
