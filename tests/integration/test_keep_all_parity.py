"""With a budget that keeps every token, hybridkv must reproduce stock SGLang token for token.

Every image request is compressed (stage 1-3 run, decode goes through the per-head sparse page
tables), so this checks the whole path: hooks, planning, table building and sparse attention.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest
import requests
import sglang as sgl
from transformers import AutoTokenizer

from hybridkv_sglang.testing.images import image_data_url, make_test_image
from hybridkv_sglang.testing.server import stock_environment
from tests.integration.client import chat_prompt, generate, images
from tests.integration.conftest import CHUNKED_PREFILL, IMAGE_SIDE, VISUAL_TOKENS_PER_IMAGE

pytestmark = pytest.mark.integration

CASES = [
    ("one image", chat_prompt("What is in the picture?", images=1), 1),
    ("two images", chat_prompt("Compare the two pictures.", images=2), 2),
    ("text only", chat_prompt("Tell me a story about a cat and a dog."), 0),
]


def _run_cases(base_url: str) -> list[dict]:
    return [
        generate(base_url, text, images(n, IMAGE_SIDE, seed=10 * i))
        for i, (_, text, n) in enumerate(CASES)
    ]


def test_generate_output_ids_equal_stock(stock_server, keep_all_server):
    stock = _run_cases(stock_server.base_url)
    hybrid = _run_cases(keep_all_server.base_url)
    for (name, _, _), s, h in zip(CASES, stock, hybrid, strict=True):
        assert h["output_ids"] == s["output_ids"], name
        assert len(h["output_ids"]) == 12, name

    seen = keep_all_server.hybridkv_stats()["requests"]
    by_rid = {r["meta_info"]["id"]: r for r in hybrid}
    for (name, _, n_images), response in zip(CASES, hybrid, strict=True):
        record = seen[response["meta_info"]["id"]]
        assert record["prompt_tokens"] == response["meta_info"]["prompt_tokens"], name
        assert record["visual_tokens"] == n_images * VISUAL_TOKENS_PER_IMAGE, name
        assert len(record["visual_spans"]) == n_images, name
        if n_images:
            assert record["compressed"], name
            assert record["read_fraction"] == pytest.approx(1.0), name
            assert record["decode_steps"] == 11, name  # the first token comes from prefill
        else:
            assert not record["compressed"] and record["dense_reason"] == "no_visual_tokens"
    assert set(by_rid) <= set(seen)


def test_triton_kernels_through_the_server_equal_stock(stock_server, keep_all_triton_server):
    """The GPU decode path (one-launch retrieval, folded attention deriving each row's entries
    from its record) inside a real server, run by Triton's interpreter: stock's tokens."""
    cases = CASES[:2]
    for i, (name, text, n) in enumerate(cases):
        stock = generate(stock_server.base_url, text, images(n, IMAGE_SIDE, seed=10 * i))
        hybrid = generate(keep_all_triton_server.base_url, text, images(n, IMAGE_SIDE, seed=10 * i))
        assert hybrid["output_ids"] == stock["output_ids"], name
        record = keep_all_triton_server.hybridkv_stats()["requests"][hybrid["meta_info"]["id"]]
        assert record["compressed"] and record["decode_steps"] == 11, name
    totals = keep_all_triton_server.hybridkv_stats()["totals"]
    assert totals["sparse_decode_steps"] >= 22


def test_hooks_see_every_chunk_and_exact_spans(keep_all_server, tiny_model):
    prompt = chat_prompt("Which picture is brighter?", images=2)
    response = generate(keep_all_server.base_url, prompt, images(2, IMAGE_SIDE, seed=3))
    record = keep_all_server.hybridkv_stats()["requests"][response["meta_info"]["id"]]
    prompt_tokens = response["meta_info"]["prompt_tokens"]
    assert record["prompt_tokens"] == prompt_tokens
    assert record["prefill_chunks"] == -(-prompt_tokens // CHUNKED_PREFILL)
    # Each <|image_pad|> of the text expands to the image's visual tokens in the prompt.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer(prompt)["input_ids"]
    pads = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|image_pad|>")]
    grow = VISUAL_TOKENS_PER_IMAGE - 1
    expected = [[p + j * grow, p + j * grow + VISUAL_TOKENS_PER_IMAGE] for j, p in enumerate(pads)]
    assert record["visual_spans"] == expected
    assert len(ids) + 2 * grow == prompt_tokens
    assert record["extra"]["policy"] == "hybridkv"


def test_chat_completions_with_image_url_equal_stock(stock_server, keep_all_server):
    def ask(base_url: str) -> dict:
        body = {
            "model": "default",
            "temperature": 0,
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(448, 448)}},
                        {"type": "text", "text": "Describe this image."},
                    ],
                }
            ],
        }
        response = requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        return response.json()

    stock, hybrid = ask(stock_server.base_url), ask(keep_all_server.base_url)
    assert hybrid["choices"][0]["message"]["content"] == stock["choices"][0]["message"]["content"]
    assert hybrid["usage"] == stock["usage"]
    totals = keep_all_server.hybridkv_stats()["totals"]
    assert totals["compressed_requests"] >= 1


@sgl.function
def describe(s, image_path: str, question: str):
    s += sgl.user(sgl.image(image_path) + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=10, temperature=0))


def test_sgl_image_frontend_program_equals_stock(stock_server, keep_all_server, tmp_path):
    image_path = tmp_path / "picture.png"
    make_test_image(448, 448, seed=7).save(image_path)
    answers = []
    for server in (stock_server, keep_all_server):
        backend = sgl.RuntimeEndpoint(server.base_url, chat_template_name="qwen2-vl")
        state = describe.run(
            image_path=str(image_path), question="What do you see?", backend=backend
        )
        answers.append(state["answer"])
    assert answers[0] == answers[1]
    assert len(answers[1]) > 0


def test_mixed_batch_of_image_and_text_requests_equals_stock(stock_server, keep_all_server):
    jobs = [
        (chat_prompt(f"Question {i} about the picture?", images=1), images(1, IMAGE_SIDE, i))
        if i % 2 == 0
        else (chat_prompt(f"Plain question number {i}."), None)
        for i in range(8)
    ]

    def run_all(base_url: str) -> list[list[int]]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(generate, base_url, text, data) for text, data in jobs]
            return [f.result()["output_ids"] for f in futures]

    assert run_all(keep_all_server.base_url) == run_all(stock_server.base_url)


def test_keep_all_decode_runs_over_the_device_tables_and_text_stays_dense(keep_all_server):
    """An image request's decode steps take the folded tables; a text-only batch the dense
    backend's own path (no sparse step counted for it)."""
    before = keep_all_server.hybridkv_stats()["totals"].get("sparse_decode_steps", 0)
    generate(keep_all_server.base_url, chat_prompt("Name a colour."), None)
    after_text = keep_all_server.hybridkv_stats()["totals"].get("sparse_decode_steps", 0)
    assert after_text == before
    generate(keep_all_server.base_url, chat_prompt("Name a colour.", images=1), images(1, 448, 5))
    totals = keep_all_server.hybridkv_stats()["totals"]
    assert totals["sparse_decode_steps"] >= after_text + 11


def test_server_info_carries_hybridkv_snapshot(keep_all_server):
    info = keep_all_server.server_info()
    snapshot = info["internal_states"][0]["hybridkv"]
    assert snapshot["live_compressed_requests"] == 0
    assert json.dumps(snapshot)  # plain JSON all the way down
    assert info["attention_backend"] == "hybridkv"


def test_the_stock_server_runs_without_the_plugin(stock_server):
    info = stock_server.server_info()
    assert info["attention_backend"] == "torch_native"
    assert "hybridkv" not in info["internal_states"][0]


def test_sglang_loads_every_plugin_but_hybridkv_under_the_stock_environment():
    """SGLang's own ``load_plugins`` in a fresh process with the stock servers' environment."""
    probe = (
        "import json\n"
        "from importlib.metadata import entry_points\n"
        "from sglang.srt.plugins import load_plugins\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
        "load_plugins()\n"
        "hooks = [fn.__module__ for fns in HookRegistry._hooks.values() for _, fn, _ in fns]\n"
        "print(json.dumps({'backend': 'hybridkv' in ATTENTION_BACKENDS, 'hooks': hooks}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=stock_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["backend"]
    assert not [m for m in seen["hooks"] if m.startswith("hybridkv_sglang")]
