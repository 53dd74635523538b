"""Stage 3b: chunk bounds bound every key; retrieval finds planted chunks inside [sink, N - w)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_sglang.policy import (
    ChunkRetriever,
    budget_top_k,
    chunk_bounds,
    dynamic_head_budget,
    resident_bounds,
    resident_mask,
    retrievable_chunk_range,
    retrieved_mask,
    select_chunks,
)
from hybridkv_sglang.policy.chunk_index import chunk_index


@pytest.mark.parametrize(
    "n,heads,dim,chunk",
    [(37, 2, 8, 16), (5, 1, 3, 16), (48, 3, 4, 16), (13, 2, 5, 1), (101, 4, 7, 7)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bounds_are_exact_per_chunk(
    n: int, heads: int, dim: int, chunk: int, dtype: torch.dtype
) -> None:
    keys = torch.randn(n, heads, dim, generator=torch.Generator().manual_seed(n)).to(dtype)
    kmin, kmax = chunk_bounds(keys, chunk)
    n_chunks = math.ceil(n / chunk)
    assert kmin.shape == kmax.shape == (heads, n_chunks, dim)
    assert kmin.dtype == kmax.dtype == dtype
    for c in range(n_chunks):
        block = keys[c * chunk : min((c + 1) * chunk, n)].transpose(0, 1)  # [H, len, D]
        assert torch.all(block >= kmin[:, c : c + 1]) and torch.all(block <= kmax[:, c : c + 1])
        # tight: each bound is attained by some key of the chunk
        assert torch.equal(kmin[:, c], block.amin(1)) and torch.equal(kmax[:, c], block.amax(1))


@pytest.mark.parametrize(
    "n,sink,window,chunk,expected,resident",
    [
        (100, 4, 32, 16, (1, 4), (16, 64)),  # full chunks inside [4, 68): 1..3
        (100, 16, 32, 16, (1, 4), (16, 64)),
        (64, 0, 32, 16, (0, 2), (0, 32)),
        (3000, 4, 32, 16, (1, 185), (16, 2960)),
        (36, 4, 32, 16, (1, 1), (16, 16)),  # nothing retrievable: everything resident
        (10, 0, 10, 16, (0, 0), (0, 0)),
        (10, 4, 2, 16, (1, 1), (10, 10)),  # first chunk would start beyond N
    ],
)
def test_retrievable_chunk_range_and_resident_bounds(
    n: int, sink: int, window: int, chunk: int, expected: tuple, resident: tuple
) -> None:
    assert retrievable_chunk_range(n, sink, window, chunk) == expected
    assert resident_bounds(n, sink, window, chunk) == resident
    mask = resident_mask(n, sink, window, chunk, "cpu")
    assert mask[:sink].all() and mask[n - window :].all()  # sink and window always resident


@pytest.mark.parametrize(
    "n,sink,window,chunk,k,expected",
    [
        (3000, 4, 32, 16, 8, 16 + 8 * 16 + 40),
        (100, 4, 32, 16, 8, 100),  # 3 retrievable chunks: reads everything
        (100, 4, 32, 16, 2, 16 + 32 + 36),
        (36, 4, 32, 16, 8, 36),
    ],
)
def test_dynamic_head_budget(
    n: int, sink: int, window: int, chunk: int, k: int, expected: int
) -> None:
    assert dynamic_head_budget(n, sink, window, chunk, k) == expected


@pytest.mark.parametrize("n", [1, 15, 16, 17, 36, 100, 513, 3000])
@pytest.mark.parametrize("sink,window,chunk", [(4, 32, 16), (0, 1, 16), (16, 8, 16), (3, 5, 7)])
def test_same_rule_as_the_runtime_row_layout(n: int, sink: int, window: int, chunk: int) -> None:
    """The policy's retrieval geometry is the one storage.page_tables serves at decode."""
    from hybridkv_sglang.storage.page_tables import DynamicRowLayout

    window = min(window, n)
    sink = min(sink, n - window)
    rows = DynamicRowLayout.for_prompt(n, sink, window, chunk)
    assert retrievable_chunk_range(n, sink, window, chunk) == (rows.first_chunk, rows.end_chunk)
    assert resident_bounds(n, sink, window, chunk) == (rows.prefix_end, rows.tail_start)
    for k in (1, 8):
        assert dynamic_head_budget(n, sink, window, chunk, k) == rows.row_length(n, k)


def test_retrieved_mask_clips_to_the_retrievable_range() -> None:
    top = torch.tensor([[0, 4, -1], [-1, -1, -1]], dtype=torch.int32)
    mask = retrieved_mask(top, 80, 16, lo=4, hi=70)
    assert mask[0].nonzero().flatten().tolist() == [*range(4, 16), *range(64, 70)]
    assert not mask[1].any()


def _planted_chunk_keys(
    n: int, dim: int, hot: list[int], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    keys = 0.1 * torch.randn(n, 1, dim, generator=gen)
    direction = torch.randn(dim, generator=gen)
    direction /= direction.norm()
    for c in hot:
        keys[c * chunk : (c + 1) * chunk, 0] += 2.0 * direction
    return keys, direction


@pytest.mark.parametrize("precision", ["kv", "uint8"])
def test_select_chunks_finds_planted_chunks_and_offsets_ids(precision: str) -> None:
    n, dim, chunk = 160, 16, 16
    keys, direction = _planted_chunk_keys(n, dim, [3, 7], chunk)
    kmin, kmax = chunk_bounds(keys, chunk)
    index = chunk_index(kmin, kmax, None, None, precision)
    q = (4.0 * direction).view(1, 1, dim).expand(1, 2, dim).clone()
    q[0, 1] = -q[0, 1]  # the other query head of the group looks elsewhere
    # sink = 16 -> retrieval starts at chunk 1; window = 32 -> 8 retrievable chunks (1..8)
    first, end = retrievable_chunk_range(n, 16, 32, chunk)
    assert (first, end) == (1, 8)
    scores, top = select_chunks(q, index, first, torch.tensor([end - first], dtype=torch.int32), 2)
    assert scores.shape == (1, kmin.shape[1] - first)
    assert sorted(top[0].tolist()) == [3, 7]
    # Every key's logit is below its chunk's score (the Quest bound, also in 8-bit codes
    # rounded outward), for both query heads.
    for c in range(first, end):
        block = keys[c * chunk : (c + 1) * chunk, 0]
        logits = (q[0] @ block.T).amax()
        assert logits <= scores[0, c - first] + 1e-5


def test_select_chunks_over_a_few_channels_still_finds_planted_chunks() -> None:
    n, dim, chunk = 160, 32, 16
    keys, direction = _planted_chunk_keys(n, dim, [3, 7], chunk)
    kmin, kmax = chunk_bounds(keys, chunk)
    q = (4.0 * direction).view(1, 1, dim)
    index = chunk_index(kmin, kmax, q.expand(4, 1, dim), 8, "uint8")
    assert index.kmin.shape == (1, kmin.shape[1], 8) and index.kmin.dtype == torch.uint8
    widest = (direction.abs() * direction.abs()).topk(8).indices.sort().values
    assert index.channels[0].tolist() == widest.tolist()  # spread there is |2·direction|
    first, end = retrievable_chunk_range(n, 16, 32, chunk)
    _, top = select_chunks(q, index, first, torch.tensor([end - first], dtype=torch.int32), 2)
    assert sorted(top[0].tolist()) == [3, 7]


def test_select_chunks_pads_with_minus_one() -> None:
    keys, direction = _planted_chunk_keys(64, 8, [1], 16)
    index = chunk_index(*chunk_bounds(keys, 16), None, None, "kv")
    q = direction.view(1, 1, 8)
    _, top = select_chunks(q, index, 0, torch.tensor([2], dtype=torch.int32), 4)
    assert top[0, 0] == 1 and top[0, 2:].tolist() == [-1, -1]


def test_attended_mask_is_sink_window_and_retrieved_chunks() -> None:
    n, dim, chunk = 160, 16, 16
    keys, direction = _planted_chunk_keys(n, dim, [5], chunk)
    index = chunk_index(*chunk_bounds(keys, chunk), None, None, "kv")
    q = (4.0 * direction).view(1, 1, dim)
    mask = ChunkRetriever(chunk_size=chunk, top_k_chunks=1).attended_mask(
        q, index, n, sink=4, window=32
    )
    # resident: [0, 16) (sink rounded up) and [128, 160) (window); chunk 5 retrieved
    assert mask[0].nonzero().flatten().tolist() == [*range(16), *range(80, 96), *range(128, 160)]


def test_retriever_rejects_bad_hyper_parameters() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkRetriever(chunk_size=0)
    with pytest.raises(ValueError, match="top_k_chunks"):
        ChunkRetriever(top_k_chunks=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(torch.randn(4, 1, 2), 0)


@pytest.mark.parametrize(
    "n,sink,window,chunk,head_budget,expected",
    [
        (400, 4, 32, 16, 40, 0),  # resident 16 + 32 = 48 > 40: not one chunk fits
        (400, 4, 32, 16, 48, 0),
        (400, 4, 32, 16, 63, 0),
        (400, 4, 32, 16, 64, 1),
        (400, 4, 32, 16, 80, 2),
        (400, 4, 32, 16, 400, 22),  # capped at the 22 retrievable chunks
        (1200, 4, 32, 16, 120, 4),
        (36, 4, 32, 16, 36, 0),  # nothing retrievable
    ],
)
def test_budget_top_k_cases(
    n: int, sink: int, window: int, chunk: int, head_budget: int, expected: int
) -> None:
    assert budget_top_k(n, sink, window, chunk, head_budget) == expected


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3000),
    sink=st.integers(0, 20),
    window=st.integers(1, 64),
    chunk=st.integers(1, 32),
    head_budget=st.integers(1, 3000),
)
def test_budget_top_k_is_the_most_that_fits(
    n: int, sink: int, window: int, chunk: int, head_budget: int
) -> None:
    window = min(window, n)
    sink = min(sink, n - window)
    k = budget_top_k(n, sink, window, chunk, head_budget)
    first, end = retrievable_chunk_range(n, sink, window, chunk)
    assert 0 <= k <= end - first
    if k > 0:
        assert dynamic_head_budget(n, sink, window, chunk, k) <= head_budget
    if k < end - first:
        assert dynamic_head_budget(n, sink, window, chunk, k + 1) > head_budget
