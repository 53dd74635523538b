"""Real SGLang servers on CPU, one per configuration per test session.

- ``stock_server``: stock ``sglang.launch_server --attention-backend torch_native``.
- ``keep_all_server``: ``hybridkv-serve`` with a budget that keeps every token, so compression and
  the sparse decode path run on every image request and outputs must equal stock's;
  ``keep_all_triton_server`` the same through the Triton kernels under the interpreter.
- ``compressing_server``: ``hybridkv-serve`` at a 10 % budget, with SGLang's strict busy-time
  memory check on.

All three use chunked prefill (128-token chunks) so multi-image prompts span several chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing.server import RunningServer, launch_server
from hybridkv_sglang.testing.tiny_model import build_tiny_qwen2_5_vl

pytestmark = pytest.mark.integration

IMAGE_SIDE = 448
"""448 x 448 px = 16 x 16 merged patches = 256 visual tokens per image."""
VISUAL_TOKENS_PER_IMAGE = (IMAGE_SIDE // 28) ** 2
CHUNKED_PREFILL = 128
SERVER_KWARGS = {
    "max_total_tokens": 16384,
    "context_length": 4096,
    "max_running_requests": 8,
    "extra_args": ["--chunked-prefill-size", str(CHUNKED_PREFILL)],
}
COMPRESSING = HybridKVConfig(budget=0.1, window=16, top_k_chunks=2, min_prompt_tokens=64)
STRICT_MEMORY_CHECK = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl"
    return build_tiny_qwen2_5_vl(out, max_pixels=IMAGE_SIDE * IMAGE_SIDE)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@contextlib.contextmanager
def serve(
    model: Path,
    logs: Path,
    name: str,
    config: HybridKVConfig | None,
    overrides: dict[str, Any] | None = None,
    **env: str,
) -> Iterator[RunningServer]:
    """A server with the shared settings (``overrides`` replace some), logging to ``name``."""
    kwargs = {**SERVER_KWARGS, **(overrides or {})}
    with launch_server(
        model, hybridkv=config, log_path=logs / f"{name}.log", env=env, **kwargs
    ) as server:
        yield server


@pytest.fixture(scope="session")
def stock_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    with serve(tiny_model, server_logs, "stock", None) as server:
        yield server


@pytest.fixture(scope="session")
def keep_all_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    config = HybridKVConfig(budget=1.0, min_prompt_tokens=64)
    with serve(tiny_model, server_logs, "keep_all", config) as server:
        yield server


@pytest.fixture(scope="module")
def keep_all_triton_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    """``keep_all_server`` decoding through the Triton kernels (the GPU path), run by Triton's
    interpreter on CPU."""
    config = HybridKVConfig(budget=1.0, min_prompt_tokens=64, decode_kernel="triton")
    with serve(tiny_model, server_logs, "keep_all_triton", config, TRITON_INTERPRET="1") as server:
        yield server


@pytest.fixture(scope="session")
def compressing_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    with serve(
        tiny_model, server_logs, "compressing", COMPRESSING, **STRICT_MEMORY_CHECK
    ) as server:
        yield server


@pytest.fixture(scope="module", params=["in_place", "compact"])
def retracting_server(
    request: pytest.FixtureRequest, tiny_model: Path, server_logs: Path
) -> Iterator[RunningServer]:
    """Compressing server (each storage mode) whose scheduler retracts decode requests every
    third forward."""
    with serve(
        tiny_model,
        server_logs,
        f"retracting_{request.param}",
        COMPRESSING.model_copy(update={"storage": request.param}),
        SGLANG_TEST_RETRACT="1",
        **STRICT_MEMORY_CHECK,
    ) as server:
        yield server
