"""Decode steps built on the device from real plans reproduce masked dense attention, row by row
(torch twins always; the Triton kernels and SGLang's decode kernel under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels._common import interpret_enabled
from hybridkv_sglang.kernels.chunk_topk import chunk_topk_ref
from hybridkv_sglang.policy import build_policy
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from tests.unit.runtime.folded_steps import decode_layer, folded_for, row_entries

LAYERS, HEADS, GROUP, DIM = 2, 2, 3, 16
SM_SCALE = DIM**-0.5
CHUNK = 8
KERNELS = [False, *([True] if interpret_enabled() else [])]
"""Twins always; the Triton path (table kernels + SGLang's decode kernel) under the
interpreter (``TRITON_INTERPRET=1``)."""


def _pool(prompt_lens: list[int], tail: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    total = sum(prompt_lens) + tail * len(prompt_lens) + 1
    slots = torch.randperm(total - 1, generator=gen) + 1  # slot 0 is SGLang's padding sink
    req_to_token = torch.zeros(len(prompt_lens) + 1, 1024, dtype=torch.int32)
    start = 0
    for i, n in enumerate(prompt_lens):
        req_to_token[i + 1, : n + tail] = slots[start : start + n + tail].to(torch.int32)
        start += n + tail
    keys = torch.randn(LAYERS, total, HEADS, DIM, generator=gen)
    values = torch.randn(LAYERS, total, HEADS, DIM, generator=gen)
    return req_to_token, keys, values


def _plan(policy: str, row: torch.Tensor, keys: torch.Tensor, n: int, seed: int, **values):
    gen = torch.Generator().manual_seed(seed)
    chosen = build_policy(policy, window=8, sink=4, chunk_size=8, top_k_chunks=3, **values)
    observations = []
    for layer in range(LAYERS):
        prompt_keys = keys[layer, row[:n].long()]
        q_window = torch.randn(8, HEADS * GROUP, DIM, generator=gen)
        observations.append(chosen.observe_layer(layer, q_window, prompt_keys, SM_SCALE))
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[20 : n - 30] = False
    return chosen.finalize(observations, is_text)


def _masked_reference(q, keys, values, slots_per_row):
    out = []
    for r, slots in enumerate(slots_per_row):
        k, v = keys[slots], values[slots]  # [n, D]
        weights = torch.softmax(q[r] @ k.T * SM_SCALE, dim=-1)
        out.append(weights @ v)
    return torch.stack(out)


BOUNDS = [
    ({}, 0.4),  # every key channel in the key dtype (a head needs 40 % to pay for it)
    ({"bound_channels": 4, "bound_precision": "uint8"}, 0.3),
    ({"bound_channels": 8}, 0.4),
]
"""The chunk index of every dynamic head of a server (its settings), and the budget at which
every head of the ``all_dynamic`` request can pay for its index."""


@pytest.mark.parametrize("use_triton", KERNELS)
@pytest.mark.parametrize(("seed", "bounds"), list(enumerate(BOUNDS)))
def test_layer_tables_match_masked_dense_attention(seed, bounds, use_triton):
    prompt_lens, tail = [150, 203, 97], 5
    req_to_token, keys, values = _pool(prompt_lens, tail, seed)
    index, dynamic_budget = bounds
    plans = [
        None,
        _plan("hybridkv", req_to_token[2], keys, 203, seed, budget=0.2, **index),
        _plan("all_dynamic", req_to_token[3], keys, 97, seed, budget=dynamic_budget, **index),
    ]
    layouts = [None if p is None else CompressedLayout.from_plan(p, "cpu") for p in plans]
    assert layouts[2].layers[0].dynamic_heads.numel() == HEADS
    seq_lens = [n + tail for n in prompt_lens]
    folded = folded_for(
        {row: lay for row, lay in zip([1, 2, 3], layouts, strict=True) if lay is not None},
        pool_rows=req_to_token.shape[0],
        layers=LAYERS,
        heads=HEADS,
        group=GROUP,
        dim=DIM,
        chunk=CHUNK,
        use_triton=use_triton,
    )
    folded.begin_step(torch.tensor([1, 2, 3]), torch.tensor(seq_lens))
    gen = torch.Generator().manual_seed(seed + 100)
    for layer in range(LAYERS):
        q = torch.randn(3 * HEADS, GROUP, DIM, generator=gen)
        got = decode_layer(folded, layer, q, keys[layer], values[layer], req_to_token, SM_SCALE)
        k_entries = keys[layer].reshape(-1, DIM)
        v_entries = values[layer].reshape(-1, DIM)
        expected_rows = []
        for b, (plan, n, seq_len) in enumerate(zip(plans, prompt_lens, seq_lens, strict=True)):
            row = req_to_token[b + 1].long()
            for h in range(HEADS):
                if plan is None:
                    positions = torch.arange(seq_len)
                elif not bool(plan.is_dynamic[layer, h]):
                    kept = plan.kept_positions_of(layer, h).long()
                    positions = torch.cat([kept, torch.arange(n, seq_len)])
                else:
                    positions = _dynamic_positions(
                        plan, layout=layouts[b], layer=layer, head=h, q=q[b * HEADS + h]
                    )
                    positions = torch.cat([positions, torch.arange(n, seq_len)])
                expected_rows.append(row[positions] * HEADS + h)
        expected = _masked_reference(q, k_entries, v_entries, expected_rows)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        read = row_entries(folded, layer, 3 * HEADS, req_to_token)
        assert [sorted(r) for r in read] == [sorted(r.tolist()) for r in expected_rows]


def _dynamic_positions(plan, layout, layer, head, q):
    """Independent statement of a dynamic row's prompt part: resident prefix, this query's top-k
    full chunks by the Quest bound over the head's dequantised bounds of its bounded channels,
    and the chunk-aligned window."""
    rows = layout.dynamic_rows
    size = rows.chunk_size
    index = plan.chunk_index[layer, head]
    lo, hi = index.dequantized()
    retrievable = slice(rows.first_chunk, rows.end_chunk)
    count = torch.tensor([rows.num_chunks], dtype=torch.int32)
    q_bounded = q[:, index.channels.long()].unsqueeze(0)
    _, top = chunk_topk_ref(
        q_bounded,
        lo[retrievable].unsqueeze(0),
        hi[retrievable].unsqueeze(0),
        count,
        plan.top_k_chunks,
    )
    chunks = [int(c) + rows.first_chunk for c in top[0] if int(c) >= 0]
    parts = [torch.arange(rows.prefix_end)]
    parts += [torch.arange(c * size, (c + 1) * size) for c in chunks]
    parts.append(torch.arange(rows.tail_start, plan.prompt_len))
    return torch.cat(parts)


@pytest.mark.parametrize("use_triton", KERNELS)
def test_full_budget_layout_reads_everything_and_equals_dense(use_triton):
    req_to_token, keys, values = _pool([120], 3, seed=7)
    plan = _plan("hybridkv", req_to_token[1], keys, 120, seed=7, budget=1.0)
    layout = CompressedLayout.from_plan(plan, "cpu")
    assert not bool(plan.is_dynamic.any())
    assert layout.read_fraction == pytest.approx(1.0)
    shapes = dict(layers=LAYERS, heads=HEADS, group=GROUP, dim=DIM, chunk=CHUNK)
    dense = folded_for({}, pool_rows=2, use_triton=use_triton, **shapes)
    sparse = folded_for({1: layout}, pool_rows=2, use_triton=use_triton, **shapes)
    q = torch.randn(HEADS, GROUP, DIM)
    for folded in (dense, sparse):
        folded.begin_step(torch.tensor([1]), torch.tensor([123]))
    for layer in range(LAYERS):
        outs = [
            decode_layer(f, layer, q, keys[layer], values[layer], req_to_token, SM_SCALE)
            for f in (dense, sparse)
        ]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
