"""SGLang plugin entry point (group ``sglang.srt.plugins``): the backend and every hook.

SGLang calls ``register`` in every process it starts (launcher, scheduler, detokenizer; children
are spawned), so registration depends on nothing but this package and the environment. Every
SGLang target the plugin patches is in :data:`HOOKS`; processes that serve hybridkv verify them
at start-up (:mod:`hybridkv_sglang.runtime.hooks.installation`).
"""

from __future__ import annotations

import logging
import os

from hybridkv_sglang.runtime.hooks import launch, scheduler
from hybridkv_sglang.runtime.hooks.installation import Hook, install
from hybridkv_sglang.runtime.session.current import BACKEND_NAME

logger = logging.getLogger("hybridkv_sglang")

_SRT = "sglang.srt"
_TOKENIZER = f"{_SRT}.managers.tokenizer_manager.TokenizerManager"
_SCHEDULER_PARTS = f"{_SRT}.managers.scheduler_components"

HOOKS: tuple[Hook, ...] = (
    # The launching process: refuse a bad start or a bad request early.
    Hook(
        f"{_SRT}.server_args.ServerArgs.check_server_args",
        launch.check_at_launch,
        "after",
        ("self",),
    ),
    Hook(
        f"{_SRT}.sampling.sampling_params.SamplingParams.verify",
        launch.check_request_params,
        "after",
        ("self",),
    ),
    Hook(
        f"{_TOKENIZER}._validate_one_request",
        launch.refuse_empty_prompt,
        "before",
        ("self", "obj", "input_ids"),
    ),
    Hook(f"{_TOKENIZER}.get_internal_state", launch.add_server_totals, "after", ("self",)),
    # The scheduler: a request's life.
    Hook(
        f"{_SRT}.managers.schedule_batch.Req._compute_max_prefix_len",
        scheduler.cap_prefix_for_window,
        "after",
        ("self", "input_len"),
    ),
    Hook(
        f"{_SRT}.model_executor.forward_batch_info.ForwardBatch.init_new",
        scheduler.record_forward_batch,
        "after",
        ("cls", "batch"),
    ),
    Hook(
        f"{_SRT}.mem_cache.common.checkpoint_kv_cache",
        scheduler.compact_after_checkpoint,
        "after",
        ("req", "tree_cache"),
    ),
    Hook(
        f"{_SRT}.mem_cache.common.release_kv_cache",
        scheduler.release_request,
        "after",
        ("req", "tree_cache"),
    ),
    Hook(
        f"{_SCHEDULER_PARTS}.invariant_checker.SchedulerInvariantChecker._get_total_uncached_sizes",
        scheduler.count_compact_slots,
        "after",
        ("self",),
    ),
    Hook(
        f"{_SCHEDULER_PARTS}.internal_state.SchedulerInternalStateController.get_internal_state",
        scheduler.add_to_internal_state,
        "after",
        ("self",),
    ),
    # Start-up and decode graphs.
    Hook(
        f"{_SRT}.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        scheduler.add_decode_metadata_bytes,
        "after",
        ("self", "kvc", "num_layers"),
    ),
    Hook(
        f"{_SRT}.layers.attention.graph_variants.create_attention_graph_variants",
        scheduler.use_hybridkv_variants,
        "after",
        (),
    ),
    Hook(
        f"{_SRT}.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner."
        "can_run_graph",
        scheduler.limit_graph_to_fit,
        "after",
        ("self", "forward_batch"),
    ),
)
"""Every SGLang target the plugin patches, with the leading parameters its hook reads."""

_registered = False


def register() -> None:
    """Register the ``hybridkv`` attention backend and :data:`HOOKS`."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from hybridkv_sglang.runtime.startup.factory import create_hybridkv_backend

    register_attention_backend(BACKEND_NAME)(create_hybridkv_backend)
    add_attention_backend_choices([BACKEND_NAME])
    install(HOOKS)
    _registered = True
    logger.debug("hybridkv plugin registered in pid %d", os.getpid())
