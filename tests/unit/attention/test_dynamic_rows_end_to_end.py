"""Dynamic heads end to end: chunk bounds -> decode metadata -> tables built by the step's
kernels (per-row retrieval, index fill) -> attention, against dense attention masked to a
brute-force choice of chunks. Torch twins always; the Triton kernels and SGLang's decode kernel
too under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from hybridkv_sglang.kernels._common import interpret_enabled
from tests.unit.attention.hand_layouts import hand_layout
from tests.unit.runtime.folded_steps import decode_layer, folded_for, row_entries

KERNELS = [False, *([True] if interpret_enabled() else [])]


@pytest.mark.parametrize("use_triton", KERNELS)
@pytest.mark.parametrize(
    ("prompt_len", "decode", "sink", "window", "chunk", "k"),
    [
        (61, 3, 4, 8, 4, 3),
        (40, 0, 5, 7, 3, 20),  # no decode tokens; k > retrievable chunks
        (100, 5, 4, 32, 16, 2),
        (9, 2, 4, 8, 4, 2),  # tiny prompt: no retrievable chunk
    ],
)
def test_dynamic_rows_match_bruteforce_masked_attention(
    prompt_len, decode, sink, window, chunk, k, use_triton
):
    gen = torch.Generator().manual_seed(prompt_len)
    heads, groups, dim = 3, 4, 16
    seq_len = prompt_len + decode
    slots = torch.randperm(seq_len + 10, generator=gen)[:seq_len]
    req_to_token = torch.zeros(2, seq_len, dtype=torch.int32)
    req_to_token[1] = slots.to(torch.int32)
    k_buffer = torch.randn(seq_len + 10, heads, dim, generator=gen)
    v_buffer = torch.randn(seq_len + 10, heads, dim, generator=gen)
    keys = k_buffer[slots.long()]  # [seq_len, H, D] in position order
    q = torch.randn(heads, groups, dim, generator=gen)

    layout = hand_layout(
        keys[:prompt_len], static={}, sink=sink, window=window, chunk=chunk, top_k=k
    )
    lay = layout.dynamic_rows
    folded = folded_for(
        {1: layout},
        pool_rows=2,
        layers=1,
        heads=heads,
        group=groups,
        dim=dim,
        chunk=chunk,
        use_triton=use_triton,
    )
    folded.begin_step(torch.tensor([1]), torch.tensor([seq_len]))
    scale = 1 / math.sqrt(dim)
    out = decode_layer(folded, 0, q, k_buffer, v_buffer, req_to_token, scale)
    read = row_entries(folded, 0, heads, req_to_token)
    assert [len(r) for r in read] == [lay.row_length(seq_len, k)] * heads

    for h in range(heads):
        # brute force: Quest bound of every retrievable chunk, max over the group, top k
        scores = {}
        for c in range(lay.first_chunk, lay.end_chunk):
            block = keys[c * chunk : (c + 1) * chunk, h]
            lo, hi = block.amin(0), block.amax(0)
            scores[c] = max(
                float(torch.maximum(q[h, g] * lo, q[h, g] * hi).sum()) for g in range(groups)
            )
        chosen = sorted(scores, key=lambda c: -scores[c])[: lay.num_selected(k)]
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[: lay.prefix_end] = True
        mask[lay.tail_start :] = True
        for c in chosen:
            mask[c * chunk : (c + 1) * chunk] = True
        assert mask[:sink].all() and mask[max(prompt_len - window, 0) : prompt_len].all()
        assert sorted(read[h]) == sorted((slots[mask].long() * heads + h).tolist())
        logits = (q[h].double() @ keys[:, h].double().T * scale).masked_fill(~mask, -math.inf)
        expected = torch.softmax(logits, -1) @ v_buffer[slots.long(), h].double()
        err = (out[h].double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-5
