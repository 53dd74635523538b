"""``sglang.Engine`` with the plugin (in its own process); config errors stop start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkv_sglang.cli import CPU_ENVIRONMENT
from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.testing.server import cpu_server_args, free_port
from tests.integration.client import chat_prompt, generate, images
from tests.integration.conftest import IMAGE_SIDE

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("engine_probe.py")


def test_engine_with_hybridkv_equals_stock_server(tiny_model, stock_server):
    prompt = chat_prompt("What is in the picture?", images=1)
    image = images(1, IMAGE_SIDE, seed=5)
    env = {
        **os.environ,
        **CPU_ENVIRONMENT,
        ENV_VAR: HybridKVConfig(budget=1.0, min_prompt_tokens=64).to_env(),
    }
    done = subprocess.run(
        [sys.executable, str(PROBE), str(tiny_model), prompt, image[0], "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ENGINE_RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("ENGINE_RESULT "))
    stock = generate(stock_server.base_url, prompt, image)
    assert result["output"]["output_ids"] == stock["output_ids"]
    record = result["hybridkv"]["requests"][result["output"]["meta_info"]["id"]]
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
