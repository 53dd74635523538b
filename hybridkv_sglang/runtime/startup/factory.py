"""Building the ``hybridkv`` backend and its scheduler session, once per scheduler process.

SGLang calls :func:`create_hybridkv_backend` when it builds the model runner's attention
backend (``--attention-backend hybridkv``). It verifies the plugin's hooks, refuses flag
combinations the plugin cannot serve, sizes the decode metadata pools and compact storage from
SGLang's KV pool, wraps the device's dense backend and opens the process's session.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

from hybridkv_sglang.attention.folded_decode import FoldedDecode, FoldedShape
from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.backend import HybridKVAttnBackend
from hybridkv_sglang.runtime.decode.crossover import Crossover
from hybridkv_sglang.runtime.hooks.installation import verify_hooks
from hybridkv_sglang.runtime.prefill.tensor_parallel import AttentionTP
from hybridkv_sglang.runtime.session.compact_storage import CompactStorage
from hybridkv_sglang.runtime.session.current import open_session
from hybridkv_sglang.runtime.session.metrics import scheduler_metrics
from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
from hybridkv_sglang.runtime.session.stats import HybridKVStats, kv_entry_bytes
from hybridkv_sglang.runtime.startup.checks import check_supported
from hybridkv_sglang.runtime.startup.memory_accounting import pool_sizing
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata
from hybridkv_sglang.storage.host_tier import HostTier

logger = logging.getLogger(__name__)


def dense_backend_name(device: str | torch.device) -> str:
    """The dense backend hybridkv wraps on this device."""
    return "flashinfer" if torch.device(device).type == "cuda" else "torch_native"


def create_hybridkv_backend(model_runner: Any) -> HybridKVAttnBackend:
    """Factory registered as ``--attention-backend hybridkv``; runs in the scheduler process
    and opens its session."""
    verify_hooks()
    config = HybridKVConfig.from_env()
    check_supported(
        model_runner.server_args,
        getattr(model_runner, "sliding_window_size", None),
        config.storage,
    )
    dense = ATTENTION_BACKENDS[dense_backend_name(model_runner.device)](model_runner)
    num_layers = model_runner.token_to_kv_pool.layer_num
    folded = build_folded_decode(config, model_runner) if config.enabled else None
    storage = (
        create_compact_storage(config, model_runner.token_to_kv_pool, num_layers, folded.meta)
        if config.storage == "compact" and folded is not None
        else None
    )
    if storage is not None and storage.host_tier is not None:
        folded.attach_host_tier(storage.host_tier.k, storage.host_tier.v)
    logger.info(
        "hybridkv: wrapping %s over %d layers with %s",
        type(dense).__name__,
        num_layers,
        config.model_dump_json(),
    )
    session = SchedulerSession(
        config,
        HybridKVStats(kv_entry_bytes(model_runner.token_to_kv_pool), scheduler_metrics()),
        decode_meta=None if folded is None else folded.meta,
        compact_storage=storage,
        tp=AttentionTP.of_model_runner(model_runner),
    )
    device = torch.device(model_runner.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    crossover = Crossover()  # sparse at every batch size
    if config.dense_below_crossover:
        crossover = Crossover.for_device(device.type, name)
    logger.info("hybridkv: dense below the crossover %s (%s)", crossover.points, name or device)
    backend = HybridKVAttnBackend(dense, session, num_layers, folded, crossover)
    session.backend = backend
    open_session(session)
    return backend


def build_folded_decode(config: HybridKVConfig, model_runner: Any) -> FoldedDecode:
    """The decode metadata pools and step buffers, sized from the KV pool and the config."""
    from sglang.srt.runtime_context import get_parallel

    pool = model_runner.token_to_kv_pool
    key, value = pool.get_key_buffer(0), pool.get_value_buffer(0)
    heads, layers = pool.head_num, pool.layer_num
    q_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
    req_to_token = model_runner.req_to_token_pool.req_to_token
    entries_per_layer = key.shape[0] * heads
    sizing = pool_sizing(config)
    meta = DecodeMetadata(
        layers,
        heads,
        sizing.bound_width(key.shape[-1]),
        max_requests=model_runner.req_to_token_pool.size + 2,  # + a compaction's rewrite
        pool_rows=req_to_token.shape[0],
        fixed_capacity=sizing.fixed_values(entries_per_layer * layers)
        + (model_runner.req_to_token_pool.size + 1) * layers * heads * config.chunk_size,
        bound_capacity=sizing.bound_chunks(entries_per_layer * layers),
        param_capacity=sizing.param_rows(entries_per_layer * layers),
        candidate_capacity=sizing.candidate_slots(entries_per_layer * layers),
        top_capacity=sizing.top_slots(entries_per_layer * layers),
        bound_dtype=sizing.bound_dtype(key.dtype),
        device=key.device,
        stage_capacity=sizing.stage_slots(entries_per_layer * layers),
        host_id_capacity=sizing.host_chunk_ids(entries_per_layer * layers),
    )
    shape = FoldedShape(
        num_layers=layers,
        num_kv_heads=heads,
        group_size=max(1, q_heads // heads),
        head_dim=key.shape[-1],
        v_head_dim=value.shape[-1],
        max_rows=req_to_token.shape[0] * heads,
        max_kv_splits=config.decode_max_kv_splits,
        chunk_size=config.chunk_size,
        max_chunks=-(-req_to_token.shape[1] // config.chunk_size),
        max_selected=config.top_k_chunks,
        max_stage_slots=config.max_stage_slots(),
    )
    use_triton = config.decode_kernel == "triton" or (
        config.decode_kernel == "auto" and key.is_cuda
    )
    cores = 16
    if key.is_cuda:
        cores = torch.cuda.get_device_properties(key.device).multi_processor_count
    folded = FoldedDecode(
        meta, shape, use_triton=use_triton, target_programs=16 * cores, device=key.device
    )
    logger.info(
        "hybridkv: decode metadata pools %.1f MiB, step buffers %.1f MiB (%s kernels)",
        meta.nbytes / 2**20,
        folded.nbytes / 2**20,
        "triton" if use_triton else "torch",
    )
    return folded


def create_compact_storage(
    config: HybridKVConfig, kv_pool: Any, num_layers: int, decode_meta: DecodeMetadata
) -> CompactStorage:
    """Compact storage over SGLang's pool, with a host tier of ``config.host_tier_mib``."""
    host_tier = None
    if config.host_tier_mib > 0:
        k, v = kv_pool.get_key_buffer(0), kv_pool.get_value_buffer(0)
        host_tier = HostTier.sized(
            config.host_tier_mib,
            config.chunk_size,
            k.shape[-1],
            v.shape[-1],
            k.dtype,
            pin=k.is_cuda,
        )
        logger.info(
            "hybridkv: host tier of %d chunks (%.1f MiB) for dynamic heads",
            host_tier.capacity,
            config.host_tier_mib,
        )
    return CompactStorage(kv_pool, num_layers, host_tier, decode_meta, config.staging_slack)
