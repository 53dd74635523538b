"""A request sets or turns off its own budget (``custom_params["hybridkv"]``), through
``/generate`` and the OpenAI API; bad settings and empty prompts are the client's error (400)."""

from __future__ import annotations

import pytest
import requests
from openai import BadRequestError, OpenAI

from hybridkv_sglang.testing.images import image_data_url
from tests.integration.client import chat_prompt, generate, images
from tests.integration.conftest import COMPRESSING, IMAGE_SIDE

pytestmark = pytest.mark.integration


def _record(server, response: dict) -> dict:
    return server.hybridkv_stats()["requests"][response["meta_info"]["id"]]


def _ask(server, budget_params: dict | None, seed: int) -> dict:
    sampling = {"max_new_tokens": 4, "temperature": 0.0}
    if budget_params is not None:
        sampling["custom_params"] = {"hybridkv": budget_params}
    body = {
        "text": chat_prompt("Describe both pictures.", images=2),
        "image_data": images(2, IMAGE_SIDE, seed=seed),
        "sampling_params": sampling,
    }
    response = requests.post(f"{server.base_url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return _record(server, response.json())


def test_a_request_sets_its_own_budget(compressing_server):
    server_default = _ask(compressing_server, None, seed=300)
    tighter = _ask(compressing_server, {"budget": 0.05}, seed=300)
    looser = _ask(compressing_server, {"budget": 0.3}, seed=300)
    assert server_default["extra"]["budget"] == COMPRESSING.budget
    assert tighter["extra"]["budget"] == 0.05 and looser["extra"]["budget"] == 0.3
    assert all(r["compressed"] for r in (server_default, tighter, looser))
    assert tighter["kept_entries"] < server_default["kept_entries"] < looser["kept_entries"]
    # Floors scale with the budget: each request reads at most what it is entitled to.
    for record, budget in ((tighter, 0.05), (server_default, COMPRESSING.budget), (looser, 0.3)):
        assert 0 < record["budget_fraction"] <= budget and not record["over_budget"]
        assert record["read_fraction"] <= record["budget_fraction"] + 1e-9


def test_a_request_turns_compression_off(compressing_server):
    record = _ask(compressing_server, {"enabled": False}, seed=310)
    assert not record["compressed"] and record["dense_reason"] == "disabled_by_request"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"budget": 5.0}, "budget must be in (0, 1], got 5.0"),
        ({"budget": "half"}, "budget: Input should be a valid number"),
        ({"budgit": 0.1}, "budgit: Extra inputs are not permitted"),
        ({"budget_tokens": 0}, "budget_tokens must be >= 1"),
    ],
)
def test_bad_request_settings_are_a_400_naming_the_field(compressing_server, params, message):
    body = {
        "text": chat_prompt("Describe the picture.", images=1),
        "image_data": images(1, IMAGE_SIDE, seed=320),
        "sampling_params": {"max_new_tokens": 2, "custom_params": {"hybridkv": params}},
    }
    response = requests.post(f"{compressing_server.base_url}/generate", json=body, timeout=300)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert "custom_params.hybridkv" in response.json()["error"]["message"]


def test_openai_clients_set_the_budget_through_extra_body(compressing_server):
    client = OpenAI(base_url=f"{compressing_server.base_url}/v1", api_key="none")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(448, 448, seed=330)}},
                {"type": "image_url", "image_url": {"url": image_data_url(448, 448, seed=331)}},
                {"type": "text", "text": "What differs between the pictures?"},
            ],
        }
    ]
    reply = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=3,
        temperature=0,
        extra_body={"custom_params": {"hybridkv": {"budget": 0.05}}},
    )
    record = compressing_server.hybridkv_stats()["requests"][reply.id]
    assert record["compressed"] and record["extra"]["budget"] == 0.05
    with pytest.raises(BadRequestError, match="budget must be in"):
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=3,
            extra_body={"custom_params": {"hybridkv": {"budget": 2.0}}},
        )


def test_an_empty_prompt_is_a_400_and_the_server_keeps_serving(compressing_server):
    url = compressing_server.base_url
    response = requests.post(
        f"{url}/generate", json={"text": "", "sampling_params": {"max_new_tokens": 2}}, timeout=60
    )
    assert response.status_code == 400
    assert "the prompt is empty" in response.json()["error"]["message"]
    assert generate(url, chat_prompt("Still there?"), max_new_tokens=2)["meta_info"]
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
