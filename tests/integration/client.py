"""Small request helpers shared by the integration tests (plain HTTP, as a user would send)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import requests

from hybridkv_sglang.testing.images import image_base64

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(question: str, images: int = 0, history: str = "") -> str:
    """Qwen chat-template text with ``images`` image placeholders before the question."""
    return (
        f"{history}<|im_start|>user\n{IMAGE * images}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def images(count: int, side: int, seed: int = 0) -> list[str]:
    return [image_base64(side, side, seed=seed + i) for i in range(count)]


def generate(
    base_url: str,
    text: str,
    image_data: list[str] | None = None,
    max_new_tokens: int = 12,
    **extra: Any,
) -> dict[str, Any]:
    """Greedy ``/generate``; returns the JSON response."""
    payload: dict[str, Any] = {
        "text": text,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        **extra,
    }
    if image_data:
        payload["image_data"] = image_data
    response = requests.post(f"{base_url}/generate", json=payload, timeout=300)
    response.raise_for_status()
    return response.json()


def plugin_failures(log: str) -> list[str]:
    """Server-log lines showing the plugin failing: a traceback frame in hybridkv's code or a
    request whose compression failed and fell back to dense.

    SGLang's own harmless start-up tracebacks (e.g. "post-warmup freeze_gc failed") are not
    counted.
    """
    return [
        line
        for line in log.splitlines()
        if ('File "' in line and "hybridkv_sglang" in line)
        or ("hybridkv: compression of" in line and "failed" in line)
        or ("hybridkv: compaction of" in line and "failed" in line)
    ]


def _abort_after_first_tokens(url: str, rid: str, started: threading.Event) -> None:
    started.wait(timeout=120)
    time.sleep(0.2)
    requests.post(f"{url}/abort_request", json={"rid": rid}, timeout=60)


def run_mixed_requests_with_aborts(server: Any, count: int = 50, aborts: int = 5) -> list[dict]:
    """``count`` concurrent requests (two images, none, ...), the first ``aborts`` of them
    aborted mid-decode; the others must finish with their 6 tokens."""
    url = server.base_url
    aborted = {f"abort-{i}" for i in range(aborts)}

    def one(i: int) -> dict:
        rid = f"abort-{i}" if i < aborts else f"mixed-{i}"
        with_image = i % 3 != 0
        text = chat_prompt(f"Request {i}: what is shown?", images=2 if with_image else 0)
        data = images(2, 448, seed=100 + i) if with_image else None
        if rid not in aborted:
            return generate(url, text, data, max_new_tokens=6, rid=rid)
        started = threading.Event()
        killer = threading.Thread(target=_abort_after_first_tokens, args=(url, rid, started))
        killer.start()
        payload = {
            "text": text,
            "image_data": data,
            "rid": rid,
            "stream": True,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0.0, "ignore_eos": True},
        }
        with requests.post(f"{url}/generate", json=payload, stream=True, timeout=300) as r:
            for _ in r.iter_lines():
                started.set()
        killer.join()
        return {"meta_info": {"id": rid}, "aborted": True}

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(count)))
    finished = [r for r in results if not r.get("aborted")]
    assert len(finished) == count - aborts
    assert all(len(r["output_ids"]) == 6 for r in finished)
    return results


def wait_for_idle_snapshot(server: Any, timeout: float = 60) -> dict[str, Any]:
    """The hybridkv snapshot once no compressed request is live (or at the deadline)."""
    deadline = time.monotonic() + timeout
    snapshot = server.hybridkv_stats()
    while snapshot["live_compressed_requests"] and time.monotonic() < deadline:
        time.sleep(0.5)
        snapshot = server.hybridkv_stats()
    return snapshot


def assert_nothing_left_behind(server: Any) -> dict[str, Any]:
    """No live plugin state, every slot back with SGLang (and the server still serving)."""
    snapshot = wait_for_idle_snapshot(server)
    assert snapshot["live_compressed_requests"] == 0
    memory = snapshot["memory"]
    assert memory["available_tokens"] + memory["evictable_tokens"] == memory["pool_tokens"]
    assert memory["protected_tokens"] == 0
    assert memory.get("compact_slots", 0) == 0
    assert memory.get("host_chunks_used", 0) == 0
    pools = memory["decode_metadata"]
    assert pools["requests"] == 0 and pools["free_slots"] == pools["slots"]
    assert pools["free_fixed_values"] == pools["fixed_values"]
    assert pools["free_chunk_bounds"] == pools["chunk_bounds"]
    assert pools["free_param_rows"] == pools["param_rows"]
    assert server.process.poll() is None
    assert requests.get(f"{server.base_url}/health", timeout=30).status_code == 200
    # SGLang's idle check raises on a leaked slot; a fresh request after idling proves it passed.
    time.sleep(2)
    after = generate(server.base_url, chat_prompt("Still alive?", images=1), images(1, 448, 999))
    assert len(after["output_ids"]) == 12
    log = server.log()
    assert "memory leak" not in log.lower()
    assert plugin_failures(log) == []
    return snapshot
