"""Dynamic heads end to end: chunk bounds -> chunk_topk -> positions -> folded table -> decode,
against dense attention masked to a brute-force choice of chunks."""

from __future__ import annotations

import math

import pytest
import torch

from hybridkv_sglang.attention import sparse_decode_reference
from hybridkv_sglang.policy import chunk_bounds, select_chunks
from hybridkv_sglang.storage.page_tables import (
    DynamicRowLayout,
    FoldedRowSpecs,
    build_folded_page_table,
    chunk_selection_positions,
)


@pytest.mark.parametrize(
    ("prompt_len", "decode", "sink", "window", "chunk", "k"),
    [(61, 3, 4, 8, 4, 3), (40, 0, 5, 7, 3, 20), (100, 5, 4, 32, 16, 2), (9, 2, 4, 8, 4, 2)],
)
def test_dynamic_rows_match_bruteforce_masked_attention(prompt_len, decode, sink, window, chunk, k):
    gen = torch.Generator().manual_seed(prompt_len)
    heads, groups, dim = 3, 4, 16
    seq_len = prompt_len + decode
    slots = torch.randperm(seq_len + 10, generator=gen)[:seq_len]
    req_to_token = torch.zeros(2, seq_len, dtype=torch.int32)
    req_to_token[1] = slots.to(torch.int32)
    k_buffer = torch.randn(seq_len + 10, heads, dim, generator=gen)
    v_buffer = torch.randn(seq_len + 10, heads, dim, generator=gen)
    keys = k_buffer[slots.long()]  # [L, H, D] in position order
    q = torch.randn(heads, groups, dim, generator=gen)

    lay = DynamicRowLayout.for_prompt(prompt_len, sink, window, chunk)
    kmin, kmax = chunk_bounds(keys[:prompt_len], chunk)  # [H, n_chunks, D]
    num = torch.full((heads,), lay.num_chunks, dtype=torch.int32)
    _, top = select_chunks(q, kmin, kmax, lay.first_chunk, num, k)
    n_sel = [lay.num_selected(k)] * heads
    selected = chunk_selection_positions(top, n_sel, chunk, [lay.prefix_end] * heads)
    specs = FoldedRowSpecs.create(
        [1] * heads, list(range(heads)), selected, [lay.tail_start] * heads, [seq_len] * heads
    )
    table = build_folded_page_table(req_to_token, specs, heads)
    assert table.row_lengths_host().tolist() == [lay.row_length(seq_len, k)] * heads
    scale = 1 / math.sqrt(dim)
    out = sparse_decode_reference(
        q, k_buffer.view(-1, dim), v_buffer.view(-1, dim), table.kv_indptr, table.kv_indices, scale
    )

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
        assert mask[:sink].all() and mask[prompt_len - window : prompt_len].all()
        logits = (q[h].double() @ keys[:, h].double().T * scale).masked_fill(~mask, -math.inf)
        expected = torch.softmax(logits, -1) @ v_buffer[slots.long(), h].double()
        err = (out[h].double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-5
