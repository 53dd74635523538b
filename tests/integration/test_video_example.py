"""Video requests: ``examples/video_client.py`` against ``hybridkv-serve`` with its default config
shows the request compressed, and a budget that keeps every token reproduces stock SGLang on a
video token for token.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing.server import RunningServer
from hybridkv_sglang.testing.tiny_model import PRESETS
from hybridkv_sglang.testing.videos import video_data_url
from tests.integration.client import generate
from tests.integration.conftest import serve

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "video_client.py"
FRAMES = 8
"""The example's default clip: 8 frames of 448 x 448 at 2 fps, every frame sampled by SGLang."""
VIDEO_TOKENS = PRESETS["tiny"].video_tokens(FRAMES, 448, 448)  # 4 frame pairs x 256 = 1024
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def default_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    """``hybridkv-serve`` as a user starts it: the default config (10 % budget, 256-token floor)."""
    with serve(tiny_model, server_logs, "video_default", HybridKVConfig()) as server:
        yield server


def _printed(out: str) -> dict[str, str]:
    """The example's ``name: value`` lines."""
    return dict(re.findall(r"^([A-Za-z][A-Za-z ]*): (.*)$", out, flags=re.MULTILINE))


def test_video_client_shows_the_request_compressed(default_server: RunningServer) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", default_server.base_url, "--max-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = _printed(done.stdout)
    assert printed["answer"].strip()
    assert int(printed["visual tokens"]) == VIDEO_TOKENS

    assert "hybridkv compressed" in done.stdout and "at a budget of 10.0%" in done.stdout
    # The printed record is the server's record of this request, and the video is its visual span.
    printed_record = json.loads(printed["hybridkv record"])
    record = default_server.hybridkv_stats()["requests"][printed_record["rid"]]
    assert record == printed_record and record["compressed"]
    assert 0 < record["kept_entries"] < 2 * HybridKVConfig().budget * record["prompt_entries"]
    assert record["prompt_tokens"] == int(printed["prompt tokens"]) > VIDEO_TOKENS
    [(start, end)] = record["visual_spans"]
    assert end - start == record["visual_tokens"] == VIDEO_TOKENS


def test_keep_all_budget_on_a_video_equals_stock(stock_server, keep_all_server) -> None:
    prompt = f"<|im_start|>user\n{VIDEO}What moves?<|im_end|>\n<|im_start|>assistant\n"
    video = [video_data_url(FRAMES, 448, 448, seed=5)]
    stock = generate(stock_server.base_url, prompt, video_data=video)
    hybrid = generate(keep_all_server.base_url, prompt, video_data=video)
    assert len(hybrid["output_ids"]) == 12
    assert hybrid["meta_info"]["prompt_tokens"] == stock["meta_info"]["prompt_tokens"]
    assert hybrid["output_ids"] == stock["output_ids"]
    record = keep_all_server.hybridkv_stats()["requests"][hybrid["meta_info"]["id"]]
    assert record["compressed"] and record["visual_tokens"] == VIDEO_TOKENS
    assert record["read_fraction"] == pytest.approx(1.0)
