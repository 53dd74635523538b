"""Compressed decode under SGLang's decode CUDA graphs: two graph variants per batch size.

SGLang's decode graph runner captures one graph per batch size and *attention variant*
(``layers/attention/graph_variants.py``; DSA models use it for dense/sparse graphs). hybridkv
declares two variants:

- ``dense``: the wrapped backend's own graph, replayed for batches with nothing compressed, so
  they cost exactly what stock costs;
- ``hybridkv``: every layer's folded table built on the device inside the graph
  (:mod:`hybridkv_sglang.attention.folded_decode`), for batches holding compressed requests.

The choice is a host lookup of the batch's pool rows in the metadata's host mirror. The pool
rows reach the host through an AFTER hook on ``ForwardBatch.init_new`` (the ``Req`` objects
are there; the device tensor is never read back). Batches the fixed buffers cannot hold run
eagerly through the same kernels (an AFTER hook on ``can_run_graph``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from hybridkv_sglang.runtime.activation import active_backend, is_active
from hybridkv_sglang.runtime.prefill_tracking import schedule_batch_of

logger = logging.getLogger(__name__)

DENSE = "dense"
SPARSE = "hybridkv"


class HybridKVGraphVariants:
    """SGLang's ``AttentionGraphVariants`` protocol: a dense and a hybridkv decode graph."""

    capture_labels = (DENSE, SPARSE)

    def select(self, forward_batch: Any) -> str:
        backend = active_backend()
        return DENSE if backend is None else backend.select_graph_variant(forward_batch)


def batch_pool_rows(forward_batch: Any) -> np.ndarray | None:
    """The batch's ``req_to_token`` rows on the host, or ``None`` when they were not recorded
    (the batch then has no compressed request: see :func:`record_pool_rows`)."""
    rows = getattr(forward_batch, "req_pool_indices_cpu", None)
    if rows is None:
        return None
    return rows.numpy()[: forward_batch.batch_size]


def record_pool_rows(forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``ForwardBatch.init_new``: a decode batch's pool rows on the host, from its
    ``Req`` objects, while any compressed request is alive."""
    if not is_active() or forward_batch is None or not forward_batch.forward_mode.is_decode():
        return forward_batch
    backend = active_backend()
    if backend is None or not backend.has_live_compressed():
        return forward_batch
    if getattr(forward_batch, "req_pool_indices_cpu", None) is None:
        batch = schedule_batch_of(args, kwargs)
        if batch is not None:
            reqs = batch.reqs
            forward_batch.req_pool_indices_cpu = torch.from_numpy(
                np.fromiter((r.kv.req_pool_idx for r in reqs), dtype=np.int64, count=len(reqs))
            )
    return forward_batch


def use_hybridkv_variants(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``create_attention_graph_variants``: hybridkv's two decode variants."""
    if not is_active() or active_backend() is None:
        return result
    if result is not None:
        raise NotImplementedError(
            "--attention-backend hybridkv: this model already uses attention graph variants "
            f"({type(result).__name__}); hybridkv cannot add its own"
        )
    return HybridKVGraphVariants()


def limit_graph_to_fit(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``DecodeCudaGraphRunner.can_run_graph``: eager when the fixed buffers
    cannot hold the batch (the backend says why; other backends are left alone)."""
    if not result or not is_active():
        return result
    forward_batch = args[0] if args else kwargs.get("forward_batch")
    check = getattr(type(getattr(runner, "attn_backend", None)), "graph_misfit", None)
    if check is None or forward_batch is None:
        return result
    return check(runner.attn_backend, forward_batch) is None


def capture_variant() -> str | None:
    """The variant SGLang is capturing or replaying (``None`` outside a graph runner)."""
    from sglang.srt.model_executor.runner_utils.capture_mode import (
        get_capture_attention_variant,
    )

    return get_capture_attention_variant()
