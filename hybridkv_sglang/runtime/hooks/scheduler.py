"""Scheduler-process hook points: thin calls into this process's session.

Each returns SGLang's result untouched unless the process built a ``hybridkv`` backend (no
session: a stock server, or the launcher). What a hook does to a request lives in the session
(:mod:`hybridkv_sglang.runtime.session.scheduler_session`) or the backend; a hook only finds its
arguments.
"""

from __future__ import annotations

from typing import Any

from hybridkv_sglang.runtime.decode.graph_variants import HybridKVGraphVariants, pool_rows_of
from hybridkv_sglang.runtime.prefill.requests import span_tokens, visual_spans_of, window_prefix_cap
from hybridkv_sglang.runtime.session.current import current_session
from hybridkv_sglang.runtime.session.extend_batches import ScheduledExtend
from hybridkv_sglang.runtime.startup.memory_accounting import decode_metadata_bytes


def schedule_batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``ScheduleBatch`` among ``ForwardBatch.init_new``'s arguments (``None``: absent)."""
    for candidate in args:
        if hasattr(candidate, "reqs") and hasattr(candidate, "forward_mode"):
            return candidate
    batch = kwargs.get("batch")
    return batch if hasattr(batch, "reqs") and hasattr(batch, "forward_mode") else None


def record_forward_batch(forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``ForwardBatch.init_new``: an extend batch's per-request prefill facts; a decode
    batch's pool rows on the host while any compressed request is alive."""
    session = current_session()
    if session is None or forward_batch is None:
        return forward_batch
    mode = forward_batch.forward_mode
    if mode.is_decode():  # every step: the cheap test first
        if session.decodes_compressed:
            batch = schedule_batch_of(args, kwargs)
            if batch is not None:
                forward_batch.req_pool_indices_cpu = pool_rows_of(batch)
    elif mode.is_extend():
        batch = schedule_batch_of(args, kwargs)
        if batch is not None and forward_batch.rids is not None:
            session.extend_batches.record(ScheduledExtend.of(forward_batch.rids, batch.reqs))
    return forward_batch


def cap_prefix_for_window(result: Any, req: Any, input_len: int, *args: Any, **kw: Any) -> Any:
    """AFTER ``Req._compute_max_prefix_len(input_len)``: a request that will be compressed
    prefills its whole observation window (``prefill.requests.window_prefix_cap``)."""
    session = current_session()
    if session is None or not isinstance(result, int):
        return result
    spans = visual_spans_of(getattr(req, "multimodal_inputs", None), input_len)
    cap = window_prefix_cap(input_len, span_tokens(spans), session.config)
    return result if cap is None else min(result, cap)


def compact_after_checkpoint(result: Any, req: Any, tree_cache: Any, *args: Any, **kw: Any) -> Any:
    """AFTER ``common.checkpoint_kv_cache(req, tree_cache)``: compact a just-planned request."""
    session = current_session()
    if session is not None:
        session.compact(req, tree_cache)
    return result


def release_request(result: Any, req: Any, tree_cache: Any, *args: Any, **kw: Any) -> Any:
    """AFTER ``common.release_kv_cache``: finish, abort and retraction all end here."""
    session = current_session()
    if session is not None:
        session.release(req, tree_cache)
    return result


def count_compact_slots(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER the invariant checker's uncached-size sum: live compact slots are the requests'."""
    session = current_session()
    if session is None or not isinstance(result, tuple):
        return result
    full, swa = result
    return full + session.live_compact_slots, swa


def add_to_internal_state(result: Any, controller: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AFTER the scheduler's ``get_internal_state``: attach the hybridkv snapshot."""
    session = current_session()
    state = getattr(result, "internal_state", None)
    if session is not None and isinstance(state, dict):
        state["hybridkv"] = session.snapshot(getattr(controller, "scheduler", None))
    return result


def add_decode_metadata_bytes(result: Any, configurator: Any, kvc: Any, num_layers: int) -> Any:
    """AFTER ``DefaultPoolConfigurator._compute_cell_size``: bytes per token, metadata counted.

    Runs before the backend factory (the pool is sized first), so it reads the server's
    arguments rather than a session.
    """
    return result + decode_metadata_bytes(result, kvc, num_layers) if result else result


def use_hybridkv_variants(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``create_attention_graph_variants``: hybridkv's two decode variants."""
    session = current_session()
    if session is None or session.backend is None:
        return result
    if result is not None:
        raise NotImplementedError(
            "--attention-backend hybridkv: this model already uses attention graph variants "
            f"({type(result).__name__}); hybridkv cannot add its own"
        )
    return HybridKVGraphVariants(session.backend)


def limit_graph_to_fit(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``DecodeCudaGraphRunner.can_run_graph``: eager when the fixed buffers cannot hold
    the batch (the backend says why; other backends are left alone)."""
    if not result or current_session() is None:
        return result
    forward_batch = args[0] if args else kwargs.get("forward_batch")
    check = getattr(type(getattr(runner, "attn_backend", None)), "graph_misfit", None)
    if check is None or forward_batch is None:
        return result
    return check(runner.attn_backend, forward_batch) is None
