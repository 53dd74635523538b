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
from hybridkv_sglang.testing.server import (
    cpu_server_args,
    free_port,
    sglang_serve,
)
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


def _launch(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _loaded_nothing(done: subprocess.CompletedProcess) -> bool:
    """The launch ended before any scheduler started, so before any model weight loaded."""
    output = done.stdout + done.stderr
    return "Load weight begin" not in output and "Init torch distributed" not in output


def test_invalid_config_stops_stock_launcher_before_loading_the_model(tiny_model):
    env = {**os.environ, **CPU_ENVIRONMENT, ENV_VAR: '{"budget": 1.5}'}
    command = [*sglang_serve(), "--attention-backend", "hybridkv"]
    done = _launch(command + cpu_server_args(tiny_model, free_port()), env)
    assert done.returncode != 0
    assert "budget must be in (0, 1], got 1.5" in done.stdout + done.stderr
    assert _loaded_nothing(done), done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--page-size", "16"], "--page-size > 1"),
        (["--hybridkv-storage", "compact", "--disable-radix-cache"], "--disable-radix-cache"),
    ],
)
def test_refused_flags_stop_hybridkv_serve_before_loading_the_model(tiny_model, flags, named):
    command = [sys.executable, "-m", "hybridkv_sglang.cli", *flags]
    done = _launch(command + cpu_server_args(tiny_model, free_port()), dict(os.environ))
    assert done.returncode != 0
    assert named in done.stdout + done.stderr
    assert _loaded_nothing(done), done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hybridkv-theta", "0"], "--hybridkv-theta 0.0: theta must be in (0, 1], got 0.0"),
        (["--hybridkv-budgett", "0.1"], "unknown flag --hybridkv-budgett (did you mean "),
        (["--hybridkv-policy", "lookm"], "--hybridkv-policy lookm: policy 'lookm' merges"),
    ],
)
def test_hybridkv_serve_names_the_flag_before_importing_sglang(flags, message):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    done = _launch([sys.executable, "-m", "hybridkv_sglang.cli", "--model-path", "x", *flags], env)
    assert done.returncode != 0
    assert message in done.stderr


RENAME_AND_SERVE = """
import sys
from sglang.srt.managers.schedule_batch import Req
Req._compute_max_prefix_length = Req._compute_max_prefix_len
del Req._compute_max_prefix_len
from sglang.cli.main import main
sys.argv = ["sglang", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_renamed_sglang_target_stops_the_launch_with_its_name(tiny_model):
    """A hook SGLang could not apply would mean silent dense decoding: the launch fails."""
    env = {**os.environ, **CPU_ENVIRONMENT, ENV_VAR: HybridKVConfig().to_env()}
    command = [sys.executable, "-c", RENAME_AND_SERVE, "serve", "--attention-backend", "hybridkv"]
    done = _launch(command + cpu_server_args(tiny_model, free_port()), env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len no longer" in output
    assert "SGLang 0.5.23" in output
    assert _loaded_nothing(done), output[-3000:]
