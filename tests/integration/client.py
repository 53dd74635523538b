"""Small request helpers shared by the integration tests (plain HTTP, as a user would send)."""

from __future__ import annotations

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
    ]
