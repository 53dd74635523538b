"""``compact`` storage reads exactly what ``in_place`` reads: the same KV in the same order, from
compact entries in SGLang's real pool (and the host tier), even after the prompt's slots are
overwritten by someone else."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from hybridkv_sglang.policy import average_merge
from hybridkv_sglang.runtime.session.compact_storage import CompactStorage
from hybridkv_sglang.storage.compact_layout import (
    build_compact_layout,
    compact_shape,
    staging_slots,
)
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.host_tier import HostTier
from tests.unit.runtime.folded_steps import decode_layer, folded_for
from tests.unit.runtime.test_decode_layout import (
    BOUNDS,
    DIM,
    GROUP,
    HEADS,
    KERNELS,
    LAYERS,
    SM_SCALE,
    _plan,
)

POOL_SLOTS = 4000
CHUNK = 8


def _real_pool(seed: int) -> tuple[MHATokenToKVPool, TokenToKVPoolAllocator]:
    pool = MHATokenToKVPool(
        size=POOL_SLOTS,
        page_size=1,
        dtype=torch.float32,
        head_num=HEADS,
        head_dim=DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )
    gen = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        pool.get_key_buffer(layer).copy_(torch.randn(POOL_SLOTS + 1, HEADS, DIM, generator=gen))
        pool.get_value_buffer(layer).copy_(torch.randn(POOL_SLOTS + 1, HEADS, DIM, generator=gen))
    allocator = TokenToKVPoolAllocator(POOL_SLOTS, torch.float32, "cpu", pool, need_sort=False)
    return pool, allocator


def _request_rows(allocator, prompt_lens, tail):
    req_to_token = torch.zeros(len(prompt_lens) + 1, 1024, dtype=torch.int32)
    for i, n in enumerate(prompt_lens):
        req_to_token[i + 1, : n + tail] = allocator.alloc(n + tail).to(torch.int32)
    return req_to_token


def _outputs(layouts, pool, req_to_token, seq_lens, queries, host_tier=None, use_triton=False):
    """Every step's every layer through the device pipeline (pool rows 1..B), and the decode
    it ran."""
    compressed = {b + 1: lay for b, lay in enumerate(layouts) if lay is not None}
    folded = folded_for(
        compressed,
        pool_rows=req_to_token.shape[0],
        layers=LAYERS,
        heads=HEADS,
        group=GROUP,
        dim=DIM,
        chunk=CHUNK,
        use_triton=use_triton,
        host_tier=host_tier,
    )
    rows = torch.arange(1, len(layouts) + 1)
    outs = []
    for step_queries in queries:
        folded.begin_step(rows, torch.tensor(seq_lens))
        for layer in range(LAYERS):
            k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
            outs.append(
                decode_layer(
                    folded,
                    layer,
                    step_queries[layer],
                    k,
                    v,
                    req_to_token,
                    SM_SCALE,
                )
            )
    return outs, folded


@pytest.mark.parametrize("use_triton", KERNELS)
@pytest.mark.parametrize(("on_host", "slack"), [(False, 0.0), (True, 0.0), (True, 1.0)])
@pytest.mark.parametrize(("seed", "bounds"), list(enumerate(BOUNDS[:2])))
def test_compact_rows_equal_in_place_rows_after_the_prefix_is_overwritten(
    seed, bounds, on_host, slack, use_triton
):
    pool, allocator = _real_pool(seed)
    prompt_lens, tail = [150, 203, 97], 5
    req_to_token = _request_rows(allocator, prompt_lens, tail)
    keys = torch.stack([pool.get_key_buffer(layer) for layer in range(LAYERS)])
    index, dynamic_budget = bounds
    plans = [
        None,
        _plan("hybridkv", req_to_token[2], keys, 203, seed, budget=0.2, **index),
        _plan("all_dynamic", req_to_token[3], keys, 97, seed, budget=dynamic_budget, **index),
    ]
    assert bool(plans[2].is_dynamic.all())  # the chunk index stays on the device
    in_place = [None if p is None else CompressedLayout.from_plan(p, "cpu") for p in plans]
    seq_lens = [n + tail for n in prompt_lens]
    gen = torch.Generator().manual_seed(seed + 50)
    queries = [
        [torch.randn(3 * HEADS, GROUP, DIM, generator=gen) for _ in range(LAYERS)] for _ in range(3)
    ]
    queries.insert(2, queries[1])  # a repeated query: its chunks are staged already
    expected, _ = _outputs(in_place, pool, req_to_token, seq_lens, queries, use_triton=use_triton)

    tier = HostTier(400, CHUNK, DIM, DIM, torch.float32, pin_memory=False) if on_host else None
    storage = CompactStorage(pool, LAYERS, tier, decode_meta=None)
    compact = [None]
    for b in (1, 2):
        layout, n = in_place[b], prompt_lens[b]
        staging = (
            staging_slots(layout.dynamic_rows, layout.top_k_chunks, slack) if on_host else None
        )
        shape = compact_shape(layout, staging)
        host_ids = tier.alloc(shape.host_chunks) if on_host else None
        slots = allocator.alloc(shape.num_slots)
        built, copies = build_compact_layout(
            layout, req_to_token[b + 1, :n].to(torch.int64), slots, host_ids, staging
        )
        storage.fill(copies)
        compact.append(built)
        assert built.on_host == (on_host and shape.host_chunks > 0)
        # The tree evicts the prefix and hands its slots to someone else.
        prompt = req_to_token[b + 1, :n].long()
        for layer in range(LAYERS):
            pool.get_key_buffer(layer)[prompt] = torch.randn(n, HEADS, DIM, generator=gen)
            pool.get_value_buffer(layer)[prompt] = torch.randn(n, HEADS, DIM, generator=gen)
    got, folded = _outputs(
        compact, pool, req_to_token, seq_lens, queries, host_tier=tier, use_triton=use_triton
    )
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if on_host:
        moved, selected = folded.meta.moves.sum(dim=0).tolist()
        assert 0 < moved < selected  # the repeated step reuses staged chunks
        held = sum(c.host_chunk_ids.numel() for c in compact[1:])
        assert tier.free_chunks == tier.capacity - held
        for c in compact[1:]:
            tier.free(c.host_chunk_ids)
        assert tier.free_chunks == tier.capacity


def test_compact_layout_needs_about_the_budget_in_slots():
    pool, allocator = _real_pool(3)
    req_to_token = _request_rows(allocator, [400], 0)
    keys = torch.stack([pool.get_key_buffer(layer) for layer in range(LAYERS)])
    plan = _plan("hybridkv", req_to_token[1], keys, 400, 3, budget=0.1)
    layout = CompressedLayout.from_plan(plan, "cpu")
    shape = compact_shape(layout, staging_slots(layout.dynamic_rows, layout.top_k_chunks, 0.0))
    assert shape.num_slots <= 0.2 * 400
    assert compact_shape(layout, None).num_slots >= shape.num_slots


def test_host_tier_is_all_or_nothing_and_sized_in_mib():
    tier = HostTier.sized(1.0, CHUNK, DIM, DIM, torch.float16, pin=False)
    assert tier.capacity == 2**20 // (CHUNK * 2 * DIM * 2)
    ids = tier.alloc(tier.capacity - 1)
    assert tier.alloc(2) is None
    assert tier.free_chunks == 1
    tier.free(ids)
    assert tier.free_chunks == tier.capacity


def test_lookm_compaction_merges_each_heads_evicted_kv_into_its_kept_entries():
    pool, allocator = _real_pool(5)
    n, tail = 180, 3
    req_to_token = _request_rows(allocator, [n], tail)
    keys = torch.stack([pool.get_key_buffer(layer) for layer in range(LAYERS)])
    plan = _plan("lookm", req_to_token[1], keys, n, 5, budget=0.2)
    layout = CompressedLayout.from_plan(plan, "cpu")
    assert layout.merge_evicted
    prompt = req_to_token[1, :n].to(torch.int64)
    expected = {}
    for layer in range(LAYERS):
        k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
        for head in range(HEADS):
            kept = plan.kept_positions_of(layer, head).long()
            gone = torch.ones(n, dtype=torch.bool)
            gone[kept] = False
            expected[layer, head] = average_merge(
                k[prompt[kept], head],
                v[prompt[kept], head],
                k[prompt[gone], head],
                v[prompt[gone], head],
            )
    storage = CompactStorage(pool, LAYERS, None, decode_meta=None)
    slots = allocator.alloc(compact_shape(layout, None).num_slots)
    built, copies = build_compact_layout(layout, prompt, slots, None)
    storage.fill(copies)
    storage.merge_evicted(built, prompt)
    for layer in range(LAYERS):
        k_entries = pool.get_key_buffer(layer).view(-1, DIM)
        v_entries = pool.get_value_buffer(layer).view(-1, DIM)
        entries = built.layers[layer].static_entries
        bounds = entries.indptr_host.tolist()
        for i, head in enumerate(layout.layers[layer].static_heads.tolist()):
            dst = entries.positions[bounds[i] : bounds[i + 1]].long()
            merged_k, merged_v = expected[layer, head]
            assert dst.numel() == plan.budgets[layer, head]
            torch.testing.assert_close(k_entries[dst], merged_k)
            torch.testing.assert_close(v_entries[dst], merged_v)
            kept = plan.kept_positions_of(layer, head).long()
            assert not torch.allclose(merged_v, pool.get_value_buffer(layer)[prompt[kept], head])
