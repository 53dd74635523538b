"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``register`` in every process it starts (launcher, scheduler, detokenizer; children
are spawned), so registration depends on nothing but this package and the environment.
"""

from __future__ import annotations

import logging
import os

from hybridkv_sglang.runtime.activation import BACKEND_NAME
from hybridkv_sglang.runtime.compaction import (
    compact_after_checkpoint,
    count_compact_slots,
    release_compact,
)
from hybridkv_sglang.runtime.frontend import (
    add_server_totals,
    check_at_launch,
    check_request_params,
    refuse_empty_prompt,
)
from hybridkv_sglang.runtime.graph_decode import (
    limit_graph_to_fit,
    record_pool_rows,
    use_hybridkv_variants,
)
from hybridkv_sglang.runtime.memory_accounting import add_decode_metadata_bytes
from hybridkv_sglang.runtime.prefill_tracking import record_extend_batch
from hybridkv_sglang.runtime.stats import add_to_internal_state
from hybridkv_sglang.runtime.window_prefill import cap_prefix_for_window

logger = logging.getLogger("hybridkv_sglang")

_registered = False


def register() -> None:
    """Register the ``hybridkv`` attention backend and its hooks (launch and request checks,
    scheduler side, prefix-match cap, decode pool rows, decode graph variants and eligibility,
    metadata memory)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from hybridkv_sglang.runtime.backend import create_hybridkv_backend

    register_attention_backend(BACKEND_NAME)(create_hybridkv_backend)
    add_attention_backend_choices([BACKEND_NAME])
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.check_server_args", check_at_launch, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.sampling.sampling_params.SamplingParams.verify",
        check_request_params,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        refuse_empty_prompt,
        HookType.BEFORE,
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.get_internal_state",
        add_server_totals,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        record_extend_batch,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        record_pool_rows,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.layers.attention.graph_variants.create_attention_graph_variants",
        use_hybridkv_variants,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        add_decode_metadata_bytes,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner."
        "can_run_graph",
        limit_graph_to_fit,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController.get_internal_state",
        add_to_internal_state,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len",
        cap_prefix_for_window,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.common.release_kv_cache", release_compact, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.common.checkpoint_kv_cache",
        compact_after_checkpoint,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.invariant_checker."
        "SchedulerInvariantChecker._get_total_uncached_sizes",
        count_compact_slots,
        HookType.AFTER,
    )
    _registered = True
    logger.debug("hybridkv plugin registered in pid %d", os.getpid())
