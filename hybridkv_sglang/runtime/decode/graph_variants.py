"""Compressed decode under SGLang's decode CUDA graphs: two graph variants per batch size.

SGLang's decode graph runner captures one graph per batch size and *attention variant*
(``layers/attention/graph_variants.py``; DSA models use it for dense/sparse graphs). hybridkv
declares two variants:

- ``dense``: the wrapped backend's own graph, replayed for batches with nothing compressed, so
  they cost exactly what stock costs;
- ``hybridkv``: every layer's folded table built on the device inside the graph
  (:mod:`hybridkv_sglang.attention.folded_decode`), for batches holding compressed requests.

The choice is a host lookup of the batch's pool rows in the metadata's host mirror. The pool
rows reach the host through the ``ForwardBatch.init_new`` hook: the ``ScheduleBatch``'s own CPU
mirror of its pool rows (SGLang keeps it through allocation, filtering and merging, and keeps
the same tensor while the batch does not change), put in the ``ForwardBatch``'s
``req_pool_indices_cpu`` field (SGLang fills it for extend batches only; a field, so every copy
of the batch carries it), so a step adds no tensor op and no per-request loop (the device
tensor is never read back). Batches the fixed buffers cannot hold run eagerly through
the same kernels (the ``can_run_graph`` hook).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

DENSE = "dense"
SPARSE = "hybridkv"


class HybridKVGraphVariants:
    """SGLang's ``AttentionGraphVariants`` protocol: a dense and a hybridkv decode graph."""

    capture_labels = (DENSE, SPARSE)

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def select(self, forward_batch: Any) -> str:
        return self.backend.select_graph_variant(forward_batch)


def pool_rows_of(batch: Any) -> torch.Tensor:
    """A ``ScheduleBatch``'s ``req_to_token`` rows on the host: SGLang's own CPU mirror, or
    read off the ``Req`` objects where the mirror is absent or stale."""
    reqs: Sequence[Any] = batch.reqs
    mirror = getattr(batch, "req_pool_indices_cpu", None)
    if isinstance(mirror, torch.Tensor) and mirror.numel() == len(reqs):
        return mirror
    return torch.from_numpy(
        np.fromiter((r.kv.req_pool_idx for r in reqs), dtype=np.int64, count=len(reqs))
    )


def capture_variant() -> str | None:
    """The variant SGLang is capturing or replaying (``None`` outside a graph runner)."""
    from sglang.srt.model_executor.runner_utils.capture_mode import (
        get_capture_attention_variant,
    )

    return get_capture_attention_variant()
