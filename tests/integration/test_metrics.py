"""With ``--enable-metrics`` SGLang's ``/metrics`` carries hybridkv's series, labelled as SGLang's
scheduler series and agreeing with ``/server_info``; an ``n > 1`` request reports once per
sample, under the ids its responses carry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hybridkv_sglang.testing.server import RunningServer
from tests.integration.client import chat_prompt, generate, images, plugin_failures
from tests.integration.conftest import (
    COMPRESSING,
    IMAGE_SIDE,
    SERVER_KWARGS,
    STRICT_MEMORY_CHECK,
    serve,
)

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 12
FAILURE_TOTALS = (
    "dense_compression_error",
    "dense_decode_metadata_full",
    "not_compacted_compaction_error",
    "not_compacted_no_free_slots",
)


@pytest.fixture(scope="module")
def metrics_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    overrides = {"extra_args": [*SERVER_KWARGS["extra_args"], "--enable-metrics"]}
    with serve(
        tiny_model, server_logs, "metrics", COMPRESSING, overrides, **STRICT_MEMORY_CHECK
    ) as server:
        yield server


def scrape(server: RunningServer) -> list[Sample]:
    response = requests.get(f"{server.base_url}/metrics", timeout=60)
    response.raise_for_status()
    return [s for f in text_string_to_metric_families(response.text) for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def kv_entry_bytes_of(model: Path) -> int:
    """K and V bytes of one (token, layer, kv head) entry of a float32 pool for this model."""
    text = json.loads((model / "config.json").read_text())["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * head_dim * 4


def test_metrics_agree_with_server_info(metrics_server, tiny_model):
    url = metrics_server.base_url
    samples_before = scrape(metrics_server)
    image = generate(url, chat_prompt("What is shown?", images=1), images(1, IMAGE_SIDE, seed=71))
    text = generate(url, chat_prompt("Hi?"), None)
    after, samples = metrics_server.hybridkv_stats(), scrape(metrics_server)

    entry_bytes = after["kv_entry_bytes"]
    assert entry_bytes == kv_entry_bytes_of(tiny_model)
    compressed = after["requests"][image["meta_info"]["id"]]
    dense = after["requests"][text["meta_info"]["id"]]
    assert compressed["compressed"] and not dense["compressed"]
    assert compressed["decode_steps"] == dense["decode_steps"] == MAX_NEW_TOKENS - 1

    def delta(name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(samples_before, name, **labels)

    # This test's two requests, one by one.
    assert delta("sglang:hybridkv_compressed_requests_total") == 1
    assert delta("sglang:hybridkv_dense_requests_total", reason=dense["dense_reason"]) == 1
    assert delta("sglang:hybridkv_dense_requests_total") == 1
    kept, prompt = compressed["kept_entries"], compressed["prompt_entries"]
    assert 0 < kept < prompt
    assert delta("sglang:hybridkv_kept_kv_bytes_total", storage="in_place") == kept * entry_bytes
    saved = (prompt - kept) * entry_bytes
    assert delta("sglang:hybridkv_saved_kv_bytes_total", storage="in_place") == saved
    assert delta("sglang:hybridkv_read_fraction_count") == 1
    assert delta("sglang:hybridkv_read_fraction_sum") == pytest.approx(compressed["read_fraction"])
    # Run alone, the image request decodes over the compressed tables, the text one dense.
    steps = compressed["decode_steps"]
    assert delta("sglang:hybridkv_decode_steps_total", path="sparse") == steps
    assert delta("sglang:hybridkv_decode_steps_total", path="dense") == dense["decode_steps"]

    # The whole server: /metrics and /server_info count the same.
    totals = after["totals"]
    assert (
        value(samples, "sglang:hybridkv_compressed_requests_total")
        == (totals["compressed_requests"])
    )
    dense_reasons = {
        s.labels["reason"]: s.value
        for s in samples
        if s.name == "sglang:hybridkv_dense_requests_total"
    }
    assert dense_reasons == {
        key.removeprefix("dense_"): n
        for key, n in totals.items()
        if key.startswith("dense_") and key != "dense_decode_steps"
    }
    assert value(samples, "sglang:hybridkv_kept_kv_bytes_total") == (
        totals["kept_entries"] * entry_bytes
    )
    assert value(samples, "sglang:hybridkv_saved_kv_bytes_total") == (
        (totals["prompt_entries"] - totals["kept_entries"]) * entry_bytes
    )
    for path in ("sparse", "dense"):
        assert (
            value(samples, "sglang:hybridkv_decode_steps_total", path=path)
            == (totals[f"{path}_decode_steps"])
        )
    assert value(samples, "sglang:hybridkv_graph_fallbacks_total") == totals.get(
        "graph_fallbacks", 0
    )
    failures = sum(totals.get(key, 0) for key in FAILURE_TOTALS)
    assert value(samples, "sglang:hybridkv_compression_failures_total") == failures == 0
    assert plugin_failures(metrics_server.log()) == []


def test_series_carry_the_scheduler_labels(metrics_server):
    generate(metrics_server.base_url, chat_prompt("Hello?"), None, max_new_tokens=2)
    samples = scrape(metrics_server)

    def labels_of(name: str, *own: str) -> list[dict[str, Any]]:
        found = [s.labels for s in samples if s.name == name]
        return [{k: v for k, v in labels.items() if k not in own} for labels in found]

    scheduler = labels_of("sglang:scheduler_idle_seconds_total")
    assert len(scheduler) == 1 and scheduler[0]["tp_rank"] == "0"
    assert labels_of("sglang:hybridkv_decode_steps_total", "path") == scheduler * 2
    assert labels_of("sglang:hybridkv_graph_fallbacks_total") == scheduler
    assert set(labels_of("sglang:hybridkv_dense_requests_total", "reason")[0]) == set(scheduler[0])


def test_parallel_samples_report_once_each(metrics_server):
    url = metrics_server.base_url
    before, samples_before = metrics_server.hybridkv_stats(), scrape(metrics_server)
    payload = {
        "text": chat_prompt("Which colour dominates?", images=1),
        "image_data": images(1, IMAGE_SIDE, seed=72),
        "sampling_params": {
            "max_new_tokens": 6,
            "temperature": 0.8,
            "ignore_eos": True,
            "n": 2,
        },
    }
    response = requests.post(f"{url}/generate", json=payload, timeout=300)
    response.raise_for_status()
    samples_out = response.json()
    after, samples = metrics_server.hybridkv_stats(), scrape(metrics_server)

    ids = {out["meta_info"]["id"] for out in samples_out}
    assert len(samples_out) == 2 and len(ids) == 2
    new = {rid: r for rid, r in after["requests"].items() if rid not in before["requests"]}
    assert set(new) == ids  # no record of SGLang's prefix-caching request
    assert all(r["compressed"] and r["decode_steps"] == 5 for r in new.values())
    grown = {key: after["totals"][key] - before["totals"].get(key, 0) for key in after["totals"]}
    assert grown["requests"] == grown["compressed_requests"] == 2
    assert grown["decode_tokens"] == 10
    for name in (
        "sglang:hybridkv_compressed_requests_total",
        "sglang:hybridkv_read_fraction_count",
    ):
        assert value(samples, name) - value(samples_before, name) == 2
    assert plugin_failures(metrics_server.log()) == []
