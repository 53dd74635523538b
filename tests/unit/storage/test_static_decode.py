"""Fixed-buffer decode tables (the CUDA-graph path) equal the eager tables entry for entry."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from hybridkv_sglang.storage.static_decode import (
    StaticDecodeTables,
    StaticTableLimits,
    layer_row_lengths,
    static_table_misfit,
)
from tests.unit.runtime.test_decode_layout import DIM, GROUP, HEADS, LAYERS, _plan, _pool

LIMITS = StaticTableLimits(
    max_rows=6 * HEADS,
    max_entries=4096,
    max_bound_chunks=256,
    max_row_chunks=128,
    top_k=4,
    chunk_size=8,
)


def _requests(seed: int):
    """Pool rows 1..4: dense, hybridkv at 20 %, all_dynamic at 30 %, dense."""
    prompt_lens, tail = [150, 203, 97, 61], 6
    req_to_token, keys, _ = _pool(prompt_lens, tail, seed)
    plans = [
        None,
        _plan("hybridkv", req_to_token[2], keys, 203, seed, budget=0.2, dynamic_top_k="fixed"),
        _plan("all_dynamic", req_to_token[3], keys, 97, seed, budget=0.3),
        None,
    ]
    layouts = [None if p is None else CompressedLayout.from_plan(p, "cpu") for p in plans]
    assert any(lay.dynamic_heads.numel() for lay in layouts[1].layers)
    return req_to_token, prompt_lens, layouts


def _assert_same_tables(static: StaticDecodeTables, batch, req_to_token, gen):
    rows = len(batch.req_pool_indices) * HEADS
    for layer in range(LAYERS):
        q = torch.randn(rows, GROUP, DIM, generator=gen)
        expected = batch.layer_table(layer, q, req_to_token)
        static.fill_chunks(layer, q, req_to_token)
        got = static.layer_table(layer)
        assert torch.equal(got.kv_indptr_host, expected.kv_indptr_host)
        assert torch.equal(got.kv_indptr, expected.kv_indptr)
        assert torch.equal(got.kv_indices, expected.kv_indices)
        assert got.row_lengths_host().tolist() == layer_row_lengths(batch, layer).tolist()
        # rows past the batch read exactly one entry: slot 0, head 0
        tail = static.kv_indptr_host[layer, rows:]
        assert bool((tail.diff() == 1).all())
        padded = static.kv_indices[layer, int(tail[0]) : int(tail[-1])]
        assert bool((padded == 0).all())
        assert torch.equal(static.kv_indptr[layer], static.kv_indptr_host[layer])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filled_static_tables_equal_eager_tables_over_steps_and_batch_changes(seed):
    req_to_token, prompt_lens, layouts = _requests(seed)
    static = StaticDecodeTables(LAYERS, HEADS, DIM, LIMITS, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed + 50)
    seq_lens = [n + 3 for n in prompt_lens]
    for step in range(3):  # the same requests decode: bounds stay, tails grow
        batch = DecodeBatchLayout([1, 2, 3, 4], [s + step for s in seq_lens], layouts, HEADS)
        assert static_table_misfit(batch, LIMITS) is None
        static.stage(batch, req_to_token)
        _assert_same_tables(static, batch, req_to_token, gen)
    # a request leaves and the order changes: the bounds are re-laid out
    batch = DecodeBatchLayout(
        [3, 1, 2], [seq_lens[2], seq_lens[0], seq_lens[1]], [layouts[2], None, layouts[1]], HEADS
    )
    static.stage(batch, req_to_token)
    _assert_same_tables(static, batch, req_to_token, gen)
    # an all-dense batch still runs the fixed-shape chunk step (as a captured graph would)
    batch = DecodeBatchLayout([4], [seq_lens[3]], [None], HEADS)
    static.stage(batch, req_to_token)
    _assert_same_tables(static, batch, req_to_token, gen)


def test_misfits_name_the_limit():
    req_to_token, prompt_lens, layouts = _requests(0)
    seq_lens = [n + 3 for n in prompt_lens]
    batch = DecodeBatchLayout([1, 2, 3, 4], seq_lens, layouts, HEADS)
    padding = LIMITS.max_rows - len(seq_lens) * HEADS
    needed = max(int(layer_row_lengths(batch, layer).sum()) for layer in range(LAYERS)) + padding
    small = {
        "rows": dict(max_rows=3 * HEADS),
        "entries in layer": dict(max_entries=needed - 1),
        "chunk bounds": dict(max_bound_chunks=8),
        "top_k": dict(top_k=2),
        "chunks in a row": dict(max_row_chunks=3),
    }
    base = LIMITS.__dict__
    for words, change in small.items():
        limits = StaticTableLimits(**{**base, **change})
        reason = static_table_misfit(batch, limits)
        assert reason is not None and words in reason, (words, reason)
        static = StaticDecodeTables(LAYERS, HEADS, DIM, limits, torch.float32, "cpu")
        with pytest.raises(ValueError, match="does not fit"):
            static.stage(batch, req_to_token)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        StaticTableLimits(**{**base, "max_rows": 0})
