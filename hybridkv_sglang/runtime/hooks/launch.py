"""What the launching process does for hybridkv: refuse a bad start before any model weight
loads, and refuse a bad request with HTTP 400 before it reaches a scheduler.

The launching process (``sglang serve``, ``python -m sglang.launch_server``, ``hybridkv-serve``,
or a program that builds ``sglang.Engine``) runs SGLang's HTTP server and tokenizer manager, but
never an attention backend. SGLang resolves and checks the server arguments there before it
spawns the schedulers; an AFTER hook on that check validates ``HYBRIDKV_CONFIG`` and the flag
combinations, so a mistake stops the launch in seconds, naming the field or the flag. Requests
are validated where SGLang validates its own sampling parameters, so a bad
``custom_params["hybridkv"]`` is the client's error (400), as a bad ``temperature`` is.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from hybridkv_sglang.config import HybridKVConfig, HybridKVConfigError
from hybridkv_sglang.runtime.hooks.installation import HookInstallError, verify_hooks
from hybridkv_sglang.runtime.session.current import (
    BACKEND_NAME,
    launch_config,
    set_launch_config,
)
from hybridkv_sglang.runtime.startup.checks import check_cpu_head_split, check_supported

logger = logging.getLogger(__name__)


def check_at_launch(result: Any, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``ServerArgs.check_server_args`` (resolved arguments, no model loaded yet)."""
    from sglang.srt.arg_groups.model_override_base import resolving_view

    resolved = resolving_view(server_args)
    if resolved.attention_backend != BACKEND_NAME:
        return result
    try:
        verify_hooks()
        config = HybridKVConfig.from_env()
        check_supported(resolved, sliding_window_size=None, storage=config.storage)
        if str(resolved.device) == "cpu" and resolved.tp_size > 1:
            from sglang.srt.configs.model_config import ModelConfig

            kv_heads = ModelConfig.from_server_args(server_args).get_total_num_kv_heads()
            check_cpu_head_split(resolved.tp_size, kv_heads)
    except (HookInstallError, HybridKVConfigError, NotImplementedError) as err:
        logger.error("hybridkv: %s", err)
        raise
    set_launch_config(config)
    return result


def check_request_params(result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``SamplingParams.verify``: the request's own hybridkv settings are valid
    (a ``HybridKVConfigError`` is a ``ValueError``: SGLang answers 400 with its message)."""
    config = launch_config()
    if config is not None:
        config.for_request(sampling_params.custom_params)
    return result


def refuse_empty_prompt(
    tokenizer_manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any
) -> None:
    """BEFORE hook of ``TokenizerManager._validate_one_request``: a prompt of no tokens is a
    400 (stock SGLang 0.5.23 lets it through and its scheduler dies on it)."""
    if launch_config() is None or input_ids is None or len(input_ids) > 0:
        return
    if getattr(obj, "input_embeds", None) is not None:
        return
    raise ValueError("the prompt is empty: send at least one token of text or an image")


SERVER_TOTALS_KEY = "hybridkv_server_totals"
"""Beside each scheduler's ``hybridkv`` snapshot in ``/server_info``: the whole server's totals."""


def add_server_totals(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``TokenizerManager.get_internal_state`` (a coroutine function): every
    ``internal_states`` entry also carries the totals of all data-parallel schedulers, so a
    reader of any one entry sees the whole server."""
    if launch_config() is None or not inspect.isawaitable(result):
        return result
    return _with_server_totals(result)


async def _with_server_totals(pending: Any) -> Any:
    from hybridkv_sglang.report import merge_snapshots, snapshots_of

    states = await pending
    snapshots = snapshots_of(states)
    if snapshots:
        totals = merge_snapshots(snapshots).get("totals", {})
        for state in states:
            if isinstance(state, dict) and "hybridkv" in state:
                state[SERVER_TOTALS_KEY] = totals
    return states
