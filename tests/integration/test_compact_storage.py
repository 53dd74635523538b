"""``compact`` storage through real CPU servers: the dense prefix goes back to the radix tree
(evictable, still hit by a later turn), decode runs from compact entries and the host tier,
outputs equal ``in_place`` (and stock when every token is kept), and nothing leaks."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hybridkv_sglang.testing.server import RunningServer
from tests.integration.client import (
    assert_nothing_left_behind,
    chat_prompt,
    generate,
    images,
    run_mixed_requests_with_aborts,
)
from tests.integration.conftest import COMPRESSING, IMAGE_SIDE, STRICT_MEMORY_CHECK, serve

pytestmark = pytest.mark.integration

COMPACT = COMPRESSING.model_copy(update={"storage": "compact", "host_tier_mib": 0.25})
"""0.25 MiB holds 128 chunks of the tiny model (16 tokens x 2 x 16 floats each): two two-image
requests (62 chunks each), so a busy server also takes the host-tier-full path (dynamic heads
kept on the device)."""
TWO_IMAGE_PROMPT = 541


@pytest.fixture(scope="module")
def compact_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    with serve(tiny_model, server_logs, "compact", COMPACT, **STRICT_MEMORY_CHECK) as server:
        yield server


@pytest.fixture(scope="module")
def compact_keep_all_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    config = COMPACT.model_copy(update={"budget": 1.0})
    with serve(tiny_model, server_logs, "compact_keep_all", config) as server:
        yield server


def _question(i: int) -> tuple[str, list[str]]:
    return chat_prompt(f"Picture pair {i}: which is brighter?", images=2), images(
        2, IMAGE_SIDE, seed=300 + 2 * i
    )


def test_keep_all_compact_equals_stock(stock_server, compact_keep_all_server):
    for i in range(3):
        text, data = _question(i)
        want = generate(stock_server.base_url, text, data, max_new_tokens=16)
        got = generate(compact_keep_all_server.base_url, text, data, max_new_tokens=16)
        assert got["output_ids"] == want["output_ids"]
        record = compact_keep_all_server.hybridkv_stats()["requests"][got["meta_info"]["id"]]
        assert record["storage"] == "compact"
        assert record["compact_slots"] >= record["prompt_tokens"]


def test_compact_outputs_equal_in_place_at_the_same_budget(compressing_server, compact_server):
    for i in range(3):
        text, data = _question(10 + i)
        want = generate(compressing_server.base_url, text, data, max_new_tokens=16)
        got = generate(compact_server.base_url, text, data, max_new_tokens=16)
        assert got["output_ids"] == want["output_ids"]
        record = compact_server.hybridkv_stats()["requests"][got["meta_info"]["id"]]
        assert record["storage"] == "compact"
        assert record["dynamic_tier"] in {"host", "device"}


def _decode_in_background(url: str, text: str, data: list[str], started: threading.Event):
    payload = {
        "text": text,
        "image_data": data,
        "stream": True,
        "sampling_params": {"max_new_tokens": 160, "temperature": 0.0, "ignore_eos": True},
    }

    def run() -> None:
        with requests.post(f"{url}/generate", json=payload, stream=True, timeout=300) as r:
            for _ in r.iter_lines():
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _memory_while_decoding(server: RunningServer, seed: int) -> dict:
    text, data = _question(seed)
    started = threading.Event()
    thread = _decode_in_background(server.base_url, text, data, started)
    assert started.wait(timeout=120)
    time.sleep(0.5)
    memory = server.hybridkv_stats()["memory"]
    thread.join()
    return memory


def test_freed_prefix_shows_as_evictable_right_after_compression(
    compressing_server, compact_server
):
    in_place = _memory_while_decoding(compressing_server, seed=40)
    compact = _memory_while_decoding(compact_server, seed=41)
    # in_place: the request pins its whole prompt in the tree.
    assert in_place["protected_tokens"] >= TWO_IMAGE_PROMPT
    # compact: the prompt is an ordinary evictable node; the request holds its compact slots.
    assert compact["protected_tokens"] < 16
    assert compact["evictable_tokens"] >= TWO_IMAGE_PROMPT
    assert 0 < compact["compact_slots"] <= 0.2 * TWO_IMAGE_PROMPT
    assert (
        compact["available_tokens"] + compact["evictable_tokens"]
        > (in_place["available_tokens"] + in_place["evictable_tokens"]) + 0.7 * TWO_IMAGE_PROMPT
    )


def test_second_turn_hits_the_released_prefix_and_compacts_again(compact_server):
    url = compact_server.base_url
    image = images(1, IMAGE_SIDE, seed=51)
    first_prompt = chat_prompt("What colour dominates this picture?", images=1)
    first = generate(url, first_prompt, image)
    history = first_prompt + first["text"] + "<|im_end|>\n"
    second = generate(url, chat_prompt("And what is in the corner?", history=history), image)
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 1
    seen = compact_server.hybridkv_stats()["requests"]
    for response in (first, second):
        assert seen[response["meta_info"]["id"]]["storage"] == "compact"


def test_many_mixed_requests_with_aborts_give_everything_back(compact_server):
    run_mixed_requests_with_aborts(compact_server)
    snapshot = assert_nothing_left_behind(compact_server)
    totals = snapshot["totals"]
    assert totals["compacted_requests"] >= 30
    assert totals.get("host_tier_full", 0) > 0  # 8 concurrent requests overflow the tier
    assert totals["staged_chunks_selected"] > totals["staged_chunks_moved"] > 0


@pytest.fixture(scope="module")
def small_pool_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    """Room for about two dense two-image prompts: later requests must evict released ones.

    The host tier holds all six requests' chunks (a device-tier request of the tiny model, with
    2 KV heads, can need as many slots as its dense prompt)."""
    with serve(
        tiny_model,
        server_logs,
        "compact_small_pool",
        COMPACT.model_copy(update={"host_tier_mib": 1.0}),
        {"max_total_tokens": 1400},
        **STRICT_MEMORY_CHECK,
    ) as server:
        yield server


def test_small_pool_evicts_released_prefixes_and_keeps_outputs(compact_server, small_pool_server):
    questions = [_question(60 + i) for i in range(6)]

    def run(url: str) -> list[list[int]]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(generate, url, t, d, 24) for t, d in questions]
            return [f.result()["output_ids"] for f in futures]

    roomy = run(compact_server.base_url)
    tight = run(small_pool_server.base_url)
    # Same outputs although the two servers batched and chunked the prompts differently.
    assert tight == roomy
    snapshot = assert_nothing_left_behind(small_pool_server)
    totals = snapshot["totals"]
    # A request whose compact slots cannot be found while other prompts are still locked stays
    # in_place (served all the same); most requests compact, freeing room for the next ones.
    assert totals["compressed_requests"] == 6
    assert totals["compacted_requests"] + totals.get("not_compacted_no_free_slots", 0) == 6
    assert totals["compacted_requests"] >= 3
    assert snapshot["memory"]["pool_tokens"] < 3 * TWO_IMAGE_PROMPT


@pytest.fixture(scope="module")
def lookm_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    config = COMPACT.model_copy(update={"policy": "lookm", "host_tier_mib": 0.0})
    with serve(tiny_model, server_logs, "lookm", config, **STRICT_MEMORY_CHECK) as server:
        yield server


def test_lookm_merges_into_compact_entries_and_gives_everything_back(lookm_server):
    """LOOK-M through a real server: every image request compacted (where its merged KV lives),
    none left unmerged, every slot back afterwards."""
    outputs = []
    for i in range(3):
        text, data = _question(i)
        got = generate(lookm_server.base_url, text, data, max_new_tokens=16)
        record = lookm_server.hybridkv_stats()["requests"][got["meta_info"]["id"]]
        assert record["compressed"] and record["storage"] == "compact", record
        assert record["extra"]["policy"] == "lookm" and record["dynamic_heads"] == 0
        assert record["read_fraction"] <= 0.15
        outputs.append(got["output_ids"])
    totals = lookm_server.hybridkv_stats()["totals"]
    assert totals["compacted_requests"] >= 3
    assert totals.get("unmerged_requests", 0) == 0
    assert all(len(o) == 16 for o in outputs)
    assert_nothing_left_behind(lookm_server)
