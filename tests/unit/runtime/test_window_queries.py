"""Window queries do not depend on where chunked prefill cut the prompt."""

from __future__ import annotations

import itertools

import pytest
import torch

from hybridkv_sglang.runtime.prefill.requests import PrefillChunk, PrefillEnd
from hybridkv_sglang.runtime.session.window_queries import WindowQueryTails

WINDOW, HEADS, DIM, LAYERS = 16, 4, 8, 2


@pytest.mark.parametrize("cuts", [[0, 64, 128, 133], [0, 120, 133], [0, 5, 10, 132, 133], [0, 133]])
def test_window_queries_equal_the_prompts_last_rows_whatever_the_chunks(cuts):
    gen = torch.Generator().manual_seed(len(cuts))
    prompt = [torch.randn(cuts[-1], HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    tails = WindowQueryTails(WINDOW)
    for start, stop in itertools.pairwise(cuts[:-1]):
        other = torch.randn(7, HEADS, DIM, generator=gen)  # another request's rows come first
        chunk = PrefillChunk("r", 3, start, stop, query_start=7)
        for layer in range(LAYERS):
            tails.record(chunk, layer, torch.cat([other, prompt[layer][start:stop]]))
    end = PrefillEnd(0, "r", 3, cuts[-1], cuts[-2], 0, ())
    for layer in range(LAYERS):
        got = tails.window_queries(end, layer, prompt[layer][cuts[-2] :])
        torch.testing.assert_close(got, prompt[layer][-WINDOW:])


def test_tails_of_another_row_or_position_are_ignored_and_dropped():
    tails = WindowQueryTails(WINDOW)
    q = torch.randn(40, HEADS, DIM)
    tails.record(PrefillChunk("r", 3, 0, 40, 0), 0, q)
    last = torch.randn(4, HEADS, DIM)
    # retracted and re-prefilled into another pool row: the old tail must not be used
    moved = PrefillEnd(0, "r", 5, 44, 40, 0, ())
    torch.testing.assert_close(tails.window_queries(moved, 0, last), last)
    gap = PrefillEnd(0, "r", 3, 50, 46, 0, ())
    torch.testing.assert_close(tails.window_queries(gap, 0, last), last)
    tails.drop("r")
    assert len(tails) == 0
