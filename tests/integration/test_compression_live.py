"""A compressing server (10 % budget): valid outputs, ~10 % of the prompt KV read per decode step,
prefix reuse across turns with fresh compression over a whole observation window, and nothing
left behind after aborts."""

from __future__ import annotations

import pytest

from tests.integration.client import (
    assert_nothing_left_behind,
    chat_prompt,
    generate,
    images,
    run_mixed_requests_with_aborts,
)
from tests.integration.conftest import COMPRESSING, IMAGE_SIDE

pytestmark = pytest.mark.integration


def test_ten_percent_budget_reads_about_ten_percent(compressing_server):
    prompt = chat_prompt("Which of the two pictures has more red?", images=2)
    response = generate(compressing_server.base_url, prompt, images(2, IMAGE_SIDE, seed=21))
    assert response["meta_info"]["finish_reason"]["type"] in {"length", "stop"}
    assert 0 < len(response["output_ids"]) <= 12
    record = compressing_server.hybridkv_stats()["requests"][response["meta_info"]["id"]]
    assert record["compressed"]
    assert record["prompt_tokens"] > 500
    assert 0.05 <= record["read_fraction"] <= 0.15, record
    assert record["kept_entries"] < 0.2 * record["prompt_entries"]
    assert record["static_heads"] + record["dynamic_heads"] > 0


def test_second_turn_hits_the_image_prefix_and_recompresses(compressing_server):
    url = compressing_server.base_url
    image = images(1, IMAGE_SIDE, seed=33)
    first_prompt = chat_prompt("What colour dominates this picture?", images=1)
    first = generate(url, first_prompt, image)
    history = first_prompt + first["text"] + "<|im_end|>\n"
    second = generate(url, chat_prompt("And what is in the corner?", history=history), image)
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 1
    seen = compressing_server.hybridkv_stats()["requests"]
    first_record = seen[first["meta_info"]["id"]]
    second_record = seen[second["meta_info"]["id"]]
    assert first_record["compressed"] and second_record["compressed"]
    assert second_record["prompt_tokens"] == second["meta_info"]["prompt_tokens"]
    assert second_record["prompt_tokens"] > first_record["prompt_tokens"]
    # The second turn ran prefill only on its new tokens, yet planned over its whole prompt.
    assert second_record["prefill_chunks"] == 1
    assert second_record["prompt_entries"] > first_record["prompt_entries"]
    assert first_record["window_rows"] == second_record["window_rows"] == COMPRESSING.window


def test_repeated_prompt_prefills_its_window_again_and_is_planned_alike(compressing_server):
    url = compressing_server.base_url
    prompt = chat_prompt("Which picture is greener?", images=2)
    first, second = (generate(url, prompt, images(2, IMAGE_SIDE, seed=35)) for _ in range(2))
    # The tree serves everything but the window, which is prefilled again to be observed.
    prompt_tokens = first["meta_info"]["prompt_tokens"]
    assert second["meta_info"]["cached_tokens"] == prompt_tokens - COMPRESSING.window
    seen = compressing_server.hybridkv_stats()["requests"]
    records = [seen[r["meta_info"]["id"]] for r in (first, second)]
    assert [r["window_rows"] for r in records] == [COMPRESSING.window] * 2
    assert records[0]["kept_entries"] == records[1]["kept_entries"]
    assert records[0]["read_fraction"] == records[1]["read_fraction"]
    assert second["output_ids"] == first["output_ids"]


def test_many_mixed_requests_with_aborts_leave_nothing_behind(compressing_server):
    run_mixed_requests_with_aborts(compressing_server)
    assert_nothing_left_behind(compressing_server)


def test_short_and_text_only_requests_stay_dense(compressing_server):
    url = compressing_server.base_url
    short = generate(url, chat_prompt("Hi?", images=1), images(1, 56))
    text = generate(url, chat_prompt("word " * (COMPRESSING.min_prompt_tokens + 50)), None)
    seen = compressing_server.hybridkv_stats()["requests"]
    assert short["meta_info"]["prompt_tokens"] < COMPRESSING.min_prompt_tokens
    assert seen[short["meta_info"]["id"]]["dense_reason"] == "short_prompt"
    assert seen[text["meta_info"]["id"]]["dense_reason"] == "no_visual_tokens"
