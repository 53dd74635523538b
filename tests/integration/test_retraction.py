"""Retraction drops a compressed request's state; its dense re-prefill is compressed afresh."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.integration.client import (
    assert_nothing_left_behind,
    chat_prompt,
    generate,
    images,
    plugin_failures,
)
from tests.integration.conftest import IMAGE_SIDE

pytestmark = pytest.mark.integration


def test_retracted_requests_finish_and_leave_nothing_behind(retracting_server):
    url = retracting_server.base_url
    jobs = [
        (chat_prompt(f"Picture {i}: what is shown?", images=1), images(1, IMAGE_SIDE, 200 + i))
        for i in range(6)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(generate, url, text, data, 24) for text, data in jobs]
        results = [f.result() for f in futures]
    assert all(len(r["output_ids"]) == 24 for r in results)
    retractions = sum(r["meta_info"]["num_retractions"] for r in results)
    assert retractions > 0, "SGLANG_TEST_RETRACT did not retract anything"

    snapshot = assert_nothing_left_behind(retracting_server)
    for r in results:
        record = snapshot["requests"][r["meta_info"]["id"]]
        assert record["compressed"]
        if r["meta_info"]["num_retractions"]:
            # The last prefill end was the re-prefill: prompt plus the tokens decoded so far.
            assert record["prompt_tokens"] > r["meta_info"]["prompt_tokens"]
    assert plugin_failures(retracting_server.log()) == []
    assert snapshot["totals"]["requests"] == len(results) + retractions
