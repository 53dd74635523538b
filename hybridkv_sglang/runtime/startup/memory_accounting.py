"""The decode metadata pools count against ``--mem-fraction-static`` like the KV pool itself.

SGLang sizes its KV pool as (available memory) / (bytes per token). The hook on the
configurator's per-token cost (``hooks.scheduler.add_decode_metadata_bytes``) adds what the
metadata pools take per token of that pool
(:meth:`~hybridkv_sglang.storage.decode_metadata.PoolSizing.bytes_per_token`: fixed values,
chunk bounds, retrieval scratch and bound parameters), so the pools allocated afterwards at the
pool's size leave the memory budget exact; the start-up log states the reserve beside the KV
pool's own bytes per token.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hybridkv_sglang.config import HybridKVConfig, HybridKVConfigError
from hybridkv_sglang.runtime.session.current import BACKEND_NAME
from hybridkv_sglang.storage.decode_metadata import PoolSizing

logger = logging.getLogger(__name__)


def pool_sizing(config: HybridKVConfig) -> PoolSizing:
    """The decode metadata pools' sizes per KV pool entry for this config (start-up sizing and
    the per-token count both come from here)."""
    return PoolSizing.of(
        config.decode_metadata_fraction,
        config.most_dynamic_fraction(),
        config.chunk_size,
        config.storage,
        config.budget,
        config.budget_tokens,
        bound_channels=config.bound_channels,
        uint8_bounds=config.bound_precision == "uint8",
        min_prompt_tokens=config.min_prompt_tokens,
        top_k_chunks=config.top_k_chunks,
        staging_slack=config.staging_slack if config.host_tier_mib > 0 else None,
    )


def decode_metadata_bytes(kv_bytes_per_token: int, kvc: Any, num_layers: int) -> int:
    """What the decode metadata pools take per KV token of a pool SGLang is about to size
    (``kvc``: its ``KVCacheConfig``-like view); 0 unless the server runs hybridkv, enabled."""
    args = getattr(kvc, "server_args", None)
    backends = (
        getattr(args, "attention_backend", None),
        getattr(args, "decode_attention_backend", None),
    )
    if not kv_bytes_per_token or BACKEND_NAME not in backends:
        return 0
    try:
        config = HybridKVConfig.from_env()
    except HybridKVConfigError:
        return 0  # the backend factory raises it, naming the field
    if not config.enabled:
        return 0
    from sglang.srt.runtime_context import get_parallel

    heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    extra = pool_sizing(config).bytes_per_token(
        num_layers,
        heads,
        kvc.model_config.head_dim,
        torch._utils._element_size(kvc.kv_cache_dtype),
    )
    logger.info(
        "hybridkv: decode metadata reserves %d bytes per KV token beside the KV pool's %d "
        "(%.1f %%)",
        extra,
        kv_bytes_per_token,
        100 * extra / kv_bytes_per_token,
    )
    return extra
