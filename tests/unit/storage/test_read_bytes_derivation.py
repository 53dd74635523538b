"""The bytes a decode step reads, derived from the decode metadata alone, are the plan's figure.

A plan of static and dynamic heads built by the real policy is laid out (``in_place``, and
``compact`` over stand-in slots) and written into decode pools sized to hold exactly it; from
the row records and the pools' dtypes alone we count what one step touches of the prompt: every
row's prompt-part table entries (K and V each), and per dynamic row its chunk bounds, its
parameter row and its retrieval scratch. That must be ``plan.stats()["read_bytes_per_step"]``
to the byte, and the index part ``plan.stats()["index_bytes"]``: the cost model budgets what
the storage holds.
"""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels.folded_tables import (
    CAND_START,
    NUM_CHUNKS,
    NUM_SEL,
    POST_LEN,
    PRE_LEN,
    TAIL_START,
    TOP_START,
)
from hybridkv_sglang.policy import CompressionPlan, build_policy
from hybridkv_sglang.policy.byte_cost import CANDIDATE_BLOCK
from hybridkv_sglang.storage.compact_layout import (
    build_compact_layout,
    compact_shape,
    staging_slots,
)
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RequestRows, request_rows

L, HKV, G, D, N = 3, 4, 2, 32, 1400
"""Layers, kv heads, query heads per kv head, head dim, prompt length (80+ chunks of 16: the
candidates of a dynamic row span several blocks of 32 chunks)."""


def _plan(budget: float, top_k: int, dtype: torch.dtype) -> CompressionPlan:
    """Sharp kv heads 0 and 1 (static), diffuse 2 and 3 (dynamic), keys of ``dtype``."""
    gen = torch.Generator().manual_seed(7)
    policy = build_policy(
        "hybridkv",
        budget=budget,
        bound_channels=4,
        bound_precision="uint8",
        top_k_chunks=top_k,
        dynamic_top_k="fixed",
    )
    obs = []
    for layer in range(L):
        k = torch.randn(N, HKV, D, generator=gen)
        q = torch.randn(32, HKV * G, D, generator=gen)
        q[:, : 2 * G] *= 6.0
        obs.append(policy.observe_layer(layer, q.to(dtype), k.to(dtype), D**-0.5))
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[:40] = True
    is_text[-32:] = True
    plan = policy.finalize(obs, is_text)
    assert plan.is_dynamic.any() and not plan.is_dynamic.all()
    return plan


def _pools(rows: RequestRows) -> DecodeMetadata:
    """Pools holding exactly ``rows`` (every arena full once it is added)."""
    return DecodeMetadata(
        L,
        HKV,
        rows.kmin.shape[1],
        max_requests=1,
        pool_rows=2,
        fixed_capacity=rows.fixed_values.numel(),
        bound_capacity=rows.kmin.shape[0],
        param_capacity=rows.bound_channels.shape[0],
        candidate_capacity=rows.candidate_slots,
        top_capacity=rows.top_slots,
        bound_dtype=rows.kmin.dtype,
        device="cpu",
        stage_capacity=rows.stage_slots,
        host_id_capacity=rows.host_chunk_ids.numel(),
    )


def _derived_bytes(rows: RequestRows, pools: DecodeMetadata, entry_bytes: int) -> tuple[int, int]:
    """``(read, index)`` bytes of one decode step, from the records and the pools' dtypes."""
    m = rows.meta.to(torch.int64)
    entries = m[..., PRE_LEN] + m[..., NUM_SEL] * rows.chunk_size + m[..., POST_LEN]
    entries = entries + rows.prompt_len - m[..., TAIL_START]
    dynamic = m[..., NUM_SEL] > 0
    width = pools.kmin.shape[1]
    bounds = (pools.kmin.element_size() + pools.kmax.element_size()) * width
    params = (pools.bound_channels[0].numel() * pools.bound_channels.element_size()) + (
        pools.bound_affine[0].numel() * pools.bound_affine.element_size()
    )
    candidate = pools.chunk_scores.element_size() + pools.chunk_ids.element_size()
    selected = pools.chunk_top.element_size()
    index = 0
    records = rows.meta[dynamic]
    for field, end, slot_bytes in (
        (CAND_START, rows.candidate_slots, candidate),
        (TOP_START, rows.top_slots, selected),
    ):
        # each row's scratch runs up to the next row's start (the last: the request's end)
        starts = records[:, field].to(torch.int64).sort()
        slots = torch.cat([starts.values[1:], torch.tensor([end])]) - starts.values
        index += int(slots.sum()) * slot_bytes
        chunks = records[starts.indices, NUM_CHUNKS].to(torch.int64)
        nsel = records[starts.indices, NUM_SEL].to(torch.int64)
        blocks = -(-chunks // CANDIDATE_BLOCK) if field == CAND_START else 1
        assert torch.equal(slots, blocks * nsel)  # what the cost model charges, no more
    index += int(records[:, NUM_CHUNKS].sum()) * bounds + records.shape[0] * params
    return int(entries.sum()) * entry_bytes + index, index


def _check(rows: RequestRows, plan: CompressionPlan, key_dtype: torch.dtype) -> None:
    pools = _pools(rows)
    assert pools.add(1, rows)
    usage = pools.usage()
    for arena in ("fixed_values", "chunk_bounds", "param_rows", "candidate_slots", "top_slots"):
        assert usage[f"free_{arena}"] == 0, arena  # the pools hold exactly what rows asked
    entry_bytes = 2 * D * torch.empty(0, dtype=key_dtype).element_size()
    read, index = _derived_bytes(rows, pools, entry_bytes)
    stats = plan.stats()
    assert stats["entry_bytes"] == entry_bytes
    assert read == stats["read_bytes_per_step"]
    assert index == stats["index_bytes"] > 0


@pytest.mark.parametrize(
    ("budget", "top_k", "dtype"),
    [(0.1, 8, torch.float32), (0.2, 40, torch.float32), (0.1, 8, torch.bfloat16)],
)
def test_in_place_rows_read_the_plans_bytes(budget, top_k, dtype):
    plan = _plan(budget, top_k, dtype)
    _check(request_rows(CompressedLayout.from_plan(plan, "cpu")), plan, dtype)


@pytest.mark.parametrize("staging_slack", [None, 0.0, 1.0])
def test_compact_rows_read_the_plans_bytes(staging_slack):
    """Compact entries over stand-in slots (the prompt at slots ``[0, N)``, the request's own
    after them); on the host tier, dynamic rows read staging slots instead of prompt chunks
    (their staging state is the request's beyond the plan: 8 bytes per slot)."""
    plan = _plan(0.1, 8, torch.float32)
    layout = CompressedLayout.from_plan(plan, "cpu")
    rows = layout.dynamic_rows
    staging = None
    if staging_slack is not None:
        staging = staging_slots(rows, layout.top_k_chunks, staging_slack)
    shape = compact_shape(layout, staging)
    slots = torch.arange(N, N + shape.num_slots)
    host = torch.arange(shape.host_chunks) if staging is not None else None
    compact, _ = build_compact_layout(layout, torch.arange(N), slots, host, staging)
    request = request_rows(layout, compact)
    _check(request, plan, torch.float32)
    dynamic_rows = int((request.meta[..., NUM_SEL] > 0).sum())
    assert request.stage_slots == (0 if staging is None else dynamic_rows * staging)
