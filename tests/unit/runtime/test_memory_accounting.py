"""The decode metadata pools count in SGLang's bytes per KV token, for hybridkv servers only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.runtime_context import get_parallel

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.runtime.hooks.scheduler import add_decode_metadata_bytes


def _kvc(backend: str) -> SimpleNamespace:
    return SimpleNamespace(
        server_args=SimpleNamespace(attention_backend=backend, decode_attention_backend=None),
        model_config=SimpleNamespace(get_num_kv_heads=lambda tp: 4 // tp, head_dim=128),
        kv_cache_dtype=torch.bfloat16,
    )


PLAIN = {"bound_channels": None, "bound_precision": "kv"}
CODES = {"bound_channels": 16, "bound_precision": "uint8"}
SCRATCH = 8 * (8 / (32 * 16) + 8 / 256) + 4 * 8 / 256
"""Retrieval scratch per dynamic prompt entry at k = 8, chunks of 16, rows of 256 entries or
more: 8-byte candidates, k per 32 chunks and k per row; 4-byte selected ids, k per row."""
STAGING = 8 * min(16 / 256, 1 / 16) + 4 / 16
"""Compact with a host tier, per dynamic prompt entry: 8 bytes of state per staging slot (2k =
16 slots per row at the default slack 1, at most one per chunk) and a 4-byte host chunk id per
chunk."""


@pytest.mark.parametrize(
    ("config", "bound_fraction", "chunk_bytes", "param_bytes"),
    [
        # per chunk: 2 x 128 bf16 bounds; per dynamic row: 12 bytes per channel, at most one
        # row per min_prompt_tokens (256) dynamic prompt entries
        (HybridKVConfig(**PLAIN), 0.5, 2 * 128 * 2, 12 * 128),  # half dynamic at 10 %
        (HybridKVConfig(budget=0.05, **PLAIN), 1.0, 512, 1536),  # budget-scaled cap: all at 5 %
        (HybridKVConfig(budget=0.05, dynamic_cap="fixed", **PLAIN), 0.5, 512, 1536),
        # compact requests hold up to 1 / budget prompts per pool entry; a quarter dynamic at 20 %
        (HybridKVConfig(storage="compact", budget=0.2, **PLAIN), 0.25 * 5.0, 512, 1536),
        # 8-bit codes over 16 channels
        (HybridKVConfig(**CODES), 0.5, 2 * 16, 12 * 16),
        (HybridKVConfig(storage="compact", **CODES), 0.5 * 10, 32, 192),
        # the defaults: 8-bit codes over 16 channels
        (HybridKVConfig(), 0.5, 2 * 16, 12 * 16),
    ],
)
def test_pools_add_their_bytes_per_kv_token(
    monkeypatch, caplog, config, bound_fraction, chunk_bytes, param_bytes
):
    monkeypatch.setenv(ENV_VAR, config.to_env())
    kv_bytes = 4 * 28 * (128 + 128) * 2  # Qwen2.5-VL-7B: 4 kv heads, 28 layers, bf16
    with get_parallel().override(attn_tp_size=1), caplog.at_level("INFO"):
        got = add_decode_metadata_bytes(kv_bytes, None, _kvc("hybridkv"), 28)
        stock = add_decode_metadata_bytes(kv_bytes, None, _kvc("flashinfer"), 28)
    staging = STAGING if config.storage == "compact" else 0.0
    bound = (chunk_bytes / 16 + param_bytes / 256 + SCRATCH + staging) * bound_fraction
    assert got - kv_bytes == pytest.approx(4 * 28 * (4 + bound), abs=1)
    assert stock == kv_bytes
    percent = 100 * (got - kv_bytes) / kv_bytes
    assert f"reserves {got - kv_bytes} bytes per KV token beside the KV pool's {kv_bytes} " in (
        caplog.text
    )
    assert f"({percent:.1f} %)" in caplog.text
