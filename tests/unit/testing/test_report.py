"""Stats of a data-parallel server are added up over its schedulers."""

from __future__ import annotations

from hybridkv_sglang.report import merge_snapshots


def _snapshot(requests: dict, compressed: int, available: int, live: int) -> dict:
    return {
        "live_compressed_requests": live,
        "kv_entry_bytes": 128,
        "memory": {
            "pool_tokens": 1000,
            "available_tokens": available,
            "decode_metadata": {"requests": live, "slots": 10},
        },
        "totals": {"requests": len(requests), "compressed_requests": compressed},
        "requests": requests,
    }


def test_counts_add_up_and_records_unite() -> None:
    merged = merge_snapshots(
        [
            _snapshot({"a": {"compressed": True}}, 1, 900, 1),
            _snapshot({"b": {"compressed": False}, "c": {"compressed": True}}, 1, 1000, 0),
        ]
    )
    assert merged["totals"] == {"requests": 3, "compressed_requests": 2}
    assert set(merged["requests"]) == {"a", "b", "c"}
    assert merged["live_compressed_requests"] == 1
    assert merged["kv_entry_bytes"] == 128
    assert merged["memory"] == {
        "pool_tokens": 2000,
        "available_tokens": 1900,
        "decode_metadata": {"requests": 1, "slots": 20},
    }


def test_one_scheduler_is_its_own_snapshot() -> None:
    one = _snapshot({"a": {"compressed": True}}, 1, 900, 1)
    assert merge_snapshots([one]) == one
    assert merge_snapshots([]) == {}
