"""The CUDA-graph decode path without a graph: servers whose decode steps read the fixed decode
tables (``static_tables_eager``) and fill the retrieved chunks with fixed shapes, exactly as a
captured graph replays them, must answer as the eager path does (and, keeping every token, as
stock SGLang does)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing.server import RunningServer
from tests.integration.client import (
    chat_prompt,
    generate,
    images,
    plugin_failures,
    run_mixed_requests_with_aborts,
    wait_for_idle_snapshot,
)
from tests.integration.conftest import COMPRESSING, IMAGE_SIDE, STRICT_MEMORY_CHECK, serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def static_keep_all_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    config = HybridKVConfig(budget=1.0, min_prompt_tokens=64, static_tables_eager=True)
    with serve(tiny_model, server_logs, "static_keep_all", config) as server:
        yield server


@pytest.fixture(scope="module")
def static_compressing_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    config = COMPRESSING.model_copy(update={"static_tables_eager": True})
    with serve(
        tiny_model, server_logs, "static_compressing", config, **STRICT_MEMORY_CHECK
    ) as server:
        yield server


def _concurrent(base_url: str, jobs: list[tuple[str, list[str] | None]]) -> list[list[int]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(generate, base_url, text, data) for text, data in jobs]
        return [f.result()["output_ids"] for f in futures]


MIXED = [
    (chat_prompt(f"Question {i} about the pictures?", images=1 + i % 2), images(2, IMAGE_SIDE, i))
    if i % 3
    else (chat_prompt(f"Plain question number {i}."), None)
    for i in range(6)
]


def test_static_tables_keeping_every_token_equal_stock(stock_server, static_keep_all_server):
    assert _concurrent(static_keep_all_server.base_url, MIXED) == _concurrent(
        stock_server.base_url, MIXED
    )
    totals = static_keep_all_server.hybridkv_stats()["totals"]
    assert totals["static_table_steps"] > 0
    assert totals.get("static_table_misfits", 0) == 0
    assert totals["compressed_requests"] >= 4


def test_static_tables_at_ten_percent_equal_the_eager_tables(
    compressing_server, static_compressing_server
):
    """Same plans, same retrieved chunks, same entry order: token for token."""
    sequential = [
        generate(server.base_url, text, data)["output_ids"]
        for server in (compressing_server, static_compressing_server)
        for text, data in MIXED
    ]
    assert sequential[: len(MIXED)] == sequential[len(MIXED) :]
    batched = _concurrent(static_compressing_server.base_url, MIXED)
    assert batched == _concurrent(compressing_server.base_url, MIXED)
    snapshot = static_compressing_server.hybridkv_stats()
    assert snapshot["totals"]["static_table_steps"] > 0
    assert snapshot["totals"].get("static_table_misfits", 0) == 0
    dynamic = [r for r in snapshot["requests"].values() if r["dynamic_heads"]]
    assert dynamic, "no request had dynamic heads: the chunk fill went untested"


def test_static_tables_with_aborts_leave_nothing_behind(static_compressing_server):
    run_mixed_requests_with_aborts(static_compressing_server, count=20, aborts=3)
    snapshot = wait_for_idle_snapshot(static_compressing_server)
    assert snapshot["live_compressed_requests"] == 0
    memory = snapshot["memory"]
    assert memory["available_tokens"] + memory["evictable_tokens"] == memory["pool_tokens"]
    assert plugin_failures(static_compressing_server.log()) == []
