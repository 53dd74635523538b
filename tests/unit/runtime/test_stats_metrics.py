"""Per-request stats are counted once, at release; the Prometheus series agree with the totals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from hybridkv_sglang.runtime.session.metrics import HybridKVMetrics
from hybridkv_sglang.runtime.session.stats import HybridKVStats, RequestStats, kv_entry_bytes

LABELS = {"model_name": "tiny", "engine_type": "unified", "tp_rank": "0"}
ENTRY_BYTES = 256
STORE = ("in_place", "compact")


def _record(rid: str, compressed: bool = True, reason: str | None = None) -> RequestStats:
    return RequestStats(
        rid=rid,
        prompt_tokens=300,
        visual_tokens=256,
        visual_spans=[(10, 266)],
        prefill_chunks=0,
        compressed=compressed,
        dense_reason=reason,
        kept_entries=120 if compressed else 0,
        prompt_entries=1200 if compressed else 0,
        prompt_bytes=1200 * ENTRY_BYTES if compressed else 0,
        read_bytes_per_step=120 * ENTRY_BYTES if compressed else 0,
        index_bytes=300 if compressed else 0,
        read_fraction=0.1 if compressed else 1.0,
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def stats(registry: CollectorRegistry) -> HybridKVStats:
    return HybridKVStats(ENTRY_BYTES, HybridKVMetrics(LABELS, registry=registry))


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if value is None else value


def test_a_request_is_visible_at_prefill_end_and_counted_once_at_release(stats, registry):
    stats.record_prefill_end(_record("a"))
    seen = stats.snapshot()
    assert seen["requests"]["a"]["compressed"] and seen["totals"] == {}
    stats.record_release("a", decode_steps=11, prefill_only=False)
    stats.record_release("a", decode_steps=11, prefill_only=False)  # a second release: no record
    seen = stats.snapshot()
    assert seen["requests"]["a"]["decode_steps"] == 11
    assert seen["totals"] == {
        "requests": 1,
        "decode_tokens": 11,
        "compressed_requests": 1,
        "kept_entries": 120,
        "prompt_entries": 1200,
        "read_bytes_per_step": 120 * ENTRY_BYTES,
        "prompt_bytes": 1200 * ENTRY_BYTES,
        "index_bytes": 300,
    }
    assert _sample(registry, "sglang:hybridkv_compressed_requests_total") == 1


def test_a_compacted_record_holds_what_compaction_took(stats):
    """Device bytes as taken (slots and metadata), staging state read each step, host moves
    counted when their counters reach the host (after the release)."""
    stats.record_prefill_end(_record("c"))
    done = SimpleNamespace(
        slots=40,
        host_chunks=9,
        dynamic_tier="host",
        host_tier_full=False,
        device_bytes=150 * ENTRY_BYTES,
        host_bytes=600 * ENTRY_BYTES,
        staging_bytes=64,
    )
    stats.record_compaction("c", done, None)
    stats.record_release("c", decode_steps=8, prefill_only=False)
    stats.record_host_tier_moves("c", moved=12, selected=80)
    seen = stats.snapshot()
    record = seen["requests"]["c"]
    assert record["storage"] == "compact"
    assert record["device_fraction"] == pytest.approx(150 / 1200)
    assert record["host_fraction"] == pytest.approx(600 / 1200)
    assert record["read_bytes_per_step"] == 120 * ENTRY_BYTES + 64
    assert record["staged_chunks_moved"] == 12 and record["staged_chunks_selected"] == 80
    assert seen["totals"]["staged_chunks_moved"] == 12
    assert seen["totals"]["read_bytes_per_step"] == 120 * ENTRY_BYTES + 64


def test_a_prefill_only_request_leaves_no_record_and_no_count(stats, registry):
    """The prefix-caching request SGLang sends ahead of an ``n > 1`` request's samples."""
    stats.record_prefill_end(_record("warmup"))
    stats.record_release("warmup", decode_steps=0, prefill_only=True)
    seen = stats.snapshot()
    assert seen["requests"] == {} and seen["totals"] == {}
    assert _sample(registry, "sglang:hybridkv_compressed_requests_total") == 0
    assert _sample(registry, "sglang:hybridkv_read_fraction_count") == 0


def test_a_retracted_request_counts_each_prefill_end(stats):
    stats.record_prefill_end(_record("r"))
    stats.record_release("r", decode_steps=5, prefill_only=False)  # retraction
    stats.record_prefill_end(_record("r"))  # the re-prefill is compressed afresh
    stats.record_release("r", decode_steps=23, prefill_only=False)
    seen = stats.snapshot()
    assert seen["totals"]["requests"] == seen["totals"]["compressed_requests"] == 2
    assert list(seen["requests"]) == ["r"] and seen["requests"]["r"]["decode_steps"] == 23


def test_prometheus_series_agree_with_the_totals(stats, registry):
    compaction = SimpleNamespace(
        slots=64,
        host_chunks=0,
        dynamic_tier="device",
        host_tier_full=0,
        device_bytes=130 * ENTRY_BYTES,
        host_bytes=0,
        staging_bytes=0,
    )
    for rid in ("in_place", "compact", "not_compacted"):
        stats.record_prefill_end(_record(rid))
    stats.record_compaction("compact", compaction, None)
    stats.record_compaction("not_compacted", None, "no_free_slots")
    stats.record_prefill_end(_record("short", compressed=False, reason="short_prompt"))
    stats.record_prefill_end(_record("failed", compressed=False, reason="compression_error"))
    for rid in ("in_place", "compact", "not_compacted", "short", "failed"):
        stats.record_release(rid, decode_steps=3, prefill_only=False)
    stats.count("sparse_decode_steps", 7)
    stats.count("dense_decode_steps", 2)
    stats.count("graph_fallbacks")
    stats.count("unmerged_requests")  # a total without a series

    totals = stats.snapshot()["totals"]
    assert _sample(registry, "sglang:hybridkv_compressed_requests_total") == 3
    for reason in ("short_prompt", "compression_error"):
        assert (
            _sample(registry, "sglang:hybridkv_dense_requests_total", reason=reason)
            == (totals[f"dense_{reason}"])
        )
    kept = {s: _sample(registry, "sglang:hybridkv_kept_kv_bytes_total", storage=s) for s in STORE}
    saved = {s: _sample(registry, "sglang:hybridkv_saved_kv_bytes_total", storage=s) for s in STORE}
    assert kept == {"in_place": 2 * 120 * ENTRY_BYTES, "compact": 120 * ENTRY_BYTES}
    assert sum(kept.values()) == totals["kept_entries"] * ENTRY_BYTES
    assert sum(saved.values()) == (totals["prompt_entries"] - totals["kept_entries"]) * ENTRY_BYTES
    index = {s: _sample(registry, "sglang:hybridkv_index_bytes_total", storage=s) for s in STORE}
    assert index == {"in_place": 600, "compact": 300} and totals["index_bytes"] == 900
    assert totals["read_bytes_per_step"] == 3 * 120 * ENTRY_BYTES
    assert totals["prompt_bytes"] == 3 * 1200 * ENTRY_BYTES
    assert _sample(registry, "sglang:hybridkv_read_fraction_count") == 3
    assert _sample(registry, "sglang:hybridkv_read_fraction_sum") == pytest.approx(0.3)
    assert _sample(registry, "sglang:hybridkv_read_fraction_bucket", le="0.1") == 3
    for path in ("sparse", "dense"):
        assert (
            _sample(registry, "sglang:hybridkv_decode_steps_total", path=path)
            == (totals[f"{path}_decode_steps"])
        )
    assert _sample(registry, "sglang:hybridkv_graph_fallbacks_total") == totals["graph_fallbacks"]
    failures = {
        reason: _sample(registry, "sglang:hybridkv_compression_failures_total", reason=reason)
        for reason in ("compression_error", "no_free_slots", "short_prompt")
    }
    assert failures == {"compression_error": 1, "no_free_slots": 1, "short_prompt": 0}


def test_stats_without_metrics_count_the_same_totals():
    stats = HybridKVStats()
    stats.record_prefill_end(_record("a"))
    stats.record_release("a", decode_steps=4, prefill_only=False)
    stats.count("dense_decode_steps")
    assert stats.snapshot()["totals"]["compressed_requests"] == 1
    assert stats.snapshot()["kv_entry_bytes"] == 0


@pytest.mark.parametrize(
    ("dtype", "head_dim", "v_head_dim"),
    [(torch.float32, 16, None), (torch.bfloat16, 64, None), (torch.float16, 24, 8)],
)
def test_kv_entry_bytes_of_sglang_pool(dtype, head_dim, v_head_dim):
    heads, layers, size = 3, 2, 50
    pool = MHATokenToKVPool(
        size=size,
        page_size=1,
        dtype=dtype,
        head_num=heads,
        head_dim=head_dim,
        layer_num=layers,
        device="cpu",
        enable_memory_saver=False,
        v_head_dim=v_head_dim,
    )
    per_entry = kv_entry_bytes(pool)
    assert per_entry == (head_dim + (v_head_dim or head_dim)) * dtype.itemsize
    slots = pool.get_key_buffer(0).shape[0]  # the pool's padding slot included
    assert per_entry * slots * heads * layers == sum(pool.get_kv_size_bytes())


def test_a_request_over_its_budget_is_counted_as_such(stats):
    """A plan reading more than its budget fraction plus half a point is counted; others are
    not (the key appears only once one is over)."""
    within, over = _record("within"), _record("over")
    within.budget_fraction, over.budget_fraction = 0.1, 0.05
    over.over_budget = True
    for record in (within, over):
        stats.record_prefill_end(record)
        stats.record_release(record.rid, decode_steps=3, prefill_only=False)
    seen = stats.snapshot()
    assert seen["totals"]["over_budget_requests"] == 1
    assert seen["requests"]["over"]["over_budget"] and not seen["requests"]["within"]["over_budget"]
