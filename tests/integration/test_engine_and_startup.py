"""``sglang.Engine`` with the plugin in-process, and configuration errors stopping start-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybridkv_sglang.cli import CPU_ENVIRONMENT
from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.testing.server import cpu_server_args, free_port
from tests.integration.client import chat_prompt, generate, images
from tests.integration.conftest import IMAGE_SIDE

pytestmark = pytest.mark.integration


def test_engine_with_hybridkv_equals_stock_server(tiny_model, stock_server, monkeypatch):
    for key, value in CPU_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_VAR, HybridKVConfig(budget=1.0, min_prompt_tokens=64).to_env())
    import sglang

    prompt = chat_prompt("What is in the picture?", images=1)
    image = images(1, IMAGE_SIDE, seed=5)
    engine = sglang.Engine(
        model_path=str(tiny_model),
        device="cpu",
        attention_backend="hybridkv",
        disable_cuda_graph=True,
        dtype="float32",
        max_total_tokens=8192,
        context_length=4096,
        max_running_requests=4,
        skip_server_warmup=True,
    )
    try:
        out = engine.generate(
            prompt=prompt,
            image_data=image,
            sampling_params={"max_new_tokens": 12, "temperature": 0.0},
        )
        snapshot = engine.get_server_info()["internal_states"][0]["hybridkv"]
    finally:
        engine.shutdown()
    stock = generate(stock_server.base_url, prompt, image)
    assert out["output_ids"] == stock["output_ids"]
    record = snapshot["requests"][out["meta_info"]["id"]]
    assert record["compressed"] and record["read_fraction"] == pytest.approx(1.0)


def test_invalid_config_stops_stock_launcher_at_startup(tiny_model):
    env = {**os.environ, **CPU_ENVIRONMENT, ENV_VAR: '{"budget": 1.5}'}
    command = [sys.executable, "-m", "sglang.launch_server", "--attention-backend", "hybridkv"]
    command += cpu_server_args(tiny_model, free_port())
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "budget must be in (0, 1], got 1.5" in done.stdout + done.stderr


def test_hybridkv_serve_rejects_bad_flags_before_loading_anything():
    done = subprocess.run(
        [sys.executable, "-m", "hybridkv_sglang.cli", "--model-path", "x", "--hybridkv-theta", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "theta must be in (0, 1], got 0.0" in done.stderr
