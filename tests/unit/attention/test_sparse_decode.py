"""sparse_decode_reference: FlashInfer paged-decode semantics (page size 1) over folded tables.

The chain checked here: row specs -> folded page table -> sparse decode == dense attention
masked to each head's positions; with full selection == plain dense GQA attention (SDPA).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))
from folded_testlib import make_pool, masked_dense_attention, random_batch

from hybridkv_sglang.attention import sparse_decode_reference
from hybridkv_sglang.storage.page_tables import (
    FoldedRowSpecs,
    PositionsCSR,
    build_folded_page_table,
    dense_row_specs,
)

# relative to the largest reference magnitude: float32 is exact up to summation order; half
# types are one rounding of the float32 result (2^-8 bf16, 2^-11 fp16) plus input rounding.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max error over the largest magnitude of the reference, which must not be zero."""
    scale = expected.double().abs().max()
    assert scale > 0, "refusing to compare against an all-zero reference"
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


def _naive_paged_decode(q, k_entries, v_entries, kv_indptr, kv_indices, sm_scale):
    """Row by row, the FlashInfer decode definition with page size 1, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(q.shape[0]):
        idx = kv_indices[int(kv_indptr[r]) : int(kv_indptr[r + 1])].long()
        if idx.numel() == 0:
            continue
        logits = q[r].double() @ k_entries[idx].double().T * sm_scale  # [G, n]
        out[r] = torch.softmax(logits, -1) @ v_entries[idx].double()
    return out


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize(
    ("rows", "groups", "dim", "entries"), [(1, 1, 1, 1), (5, 7, 24, 40), (11, 4, 64, 97)]
)
def test_reference_matches_row_loop(rows, groups, dim, entries, dtype):
    gen = torch.Generator().manual_seed(rows + dim)
    q = torch.randn(rows, groups, dim, generator=gen).to(dtype)
    k = torch.randn(entries, dim, generator=gen).to(dtype)
    v = torch.randn(entries, dim, generator=gen).to(dtype)
    lengths = torch.randint(1, 2 * entries + 1, (rows,), generator=gen)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.randint(0, entries, (int(indptr[-1]),), generator=gen, dtype=torch.int32)
    scale = 1 / math.sqrt(dim)
    out = sparse_decode_reference(q, k, v, indptr, indices, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rel(out, _naive_paged_decode(q, k, v, indptr, indices, scale), RTOL[dtype])


def test_reference_empty_rows_give_zeros_and_extra_indices_are_ignored():
    q = torch.randn(3, 2, 4)
    k, v = torch.randn(5, 4), torch.randn(5, 4)
    indptr = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    indices = torch.tensor([1, 4, 0, 3, 3], dtype=torch.int32)  # two trailing extras
    out = sparse_decode_reference(q, k, v, indptr, indices, 0.5)
    assert out[1].abs().sum() == 0
    assert_close_rel(out, _naive_paged_decode(q, k, v, indptr, indices[:3], 0.5), 1e-5)


def test_reference_large_logits_are_stable():
    q = torch.full((1, 1, 4), 100.0)
    k = torch.tensor([[10.0] * 4, [9.0] * 4])
    v = torch.tensor([[1.0] * 4, [2.0] * 4])
    out = sparse_decode_reference(
        q,
        k,
        v,
        torch.tensor([0, 2], dtype=torch.int32),
        torch.tensor([0, 1], dtype=torch.int32),
        1.0,
    )
    assert torch.isfinite(out).all() and torch.allclose(out, torch.ones(1, 1, 4))


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize(
    ("num_reqs", "heads", "groups", "ctx", "seed"),
    [(1, 1, 1, 9, 0), (3, 2, 7, 30, 1), (5, 4, 3, 23, 2), (2, 3, 4, 41, 3)],
)
def test_table_reproduces_masked_dense_attention(num_reqs, heads, groups, ctx, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dim = 16
    pool = make_pool(gen, num_reqs + 1, ctx, heads, dim, dtype)
    batch = random_batch(gen, pool, num_reqs)
    table = build_folded_page_table(pool.req_to_token, batch.specs, heads)
    q = torch.randn(num_reqs, heads * groups, dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(dim)
    out = sparse_decode_reference(
        q.view(num_reqs * heads, groups, dim),
        pool.k_buffer.view(-1, dim),
        pool.v_buffer.view(-1, dim),
        table.kv_indptr,
        table.kv_indices,
        scale,
    )
    expected = masked_dense_attention(q, pool, batch, scale)
    assert_close_rel(out.view(num_reqs, heads * groups, dim), expected, RTOL[dtype])


def _sdpa_dense(q, pool, req_pool_indices, seq_lens, scale):
    """Plain dense decode attention per request, GQA by repeating kv heads, via SDPA."""
    num_q_heads = q.shape[1]
    heads = pool.num_kv_heads
    outs = []
    for b, (req, length) in enumerate(zip(req_pool_indices, seq_lens, strict=True)):
        slots = pool.req_to_token[req, :length].long()
        k = pool.k_buffer[slots].float().transpose(0, 1).repeat_interleave(num_q_heads // heads, 0)
        v = pool.v_buffer[slots].float().transpose(0, 1).repeat_interleave(num_q_heads // heads, 0)
        outs.append(F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=scale)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("seed", range(3))
def test_full_selection_equals_dense_gqa_attention(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    num_reqs, heads, groups, dim, ctx = 4, 2, 7, 32, 37
    pool = make_pool(gen, num_reqs + 1, ctx, heads, dim, dtype)
    batch = random_batch(gen, pool, num_reqs, full_selection=True)
    q = torch.randn(num_reqs, heads * groups, dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(dim)
    expected = _sdpa_dense(q, pool, batch.req_pool_indices, batch.seq_lens, scale)
    qf = q.view(num_reqs * heads, groups, dim)
    kf, vf = pool.k_buffer.view(-1, dim), pool.v_buffer.view(-1, dim)
    # every row kind selecting everything ...
    table = build_folded_page_table(pool.req_to_token, batch.specs, heads)
    out = sparse_decode_reference(qf, kf, vf, table.kv_indptr, table.kv_indices, scale)
    assert_close_rel(out.view_as(q), expected, RTOL[dtype])
    # ... and plain dense rows
    dense = dense_row_specs(batch.req_pool_indices, batch.seq_lens, heads, "cpu")
    table = build_folded_page_table(pool.req_to_token, dense, heads)
    out = sparse_decode_reference(qf, kf, vf, table.kv_indptr, table.kv_indices, scale)
    assert_close_rel(out.view_as(q), expected, RTOL[dtype])


def test_static_head_selection_matters():
    """Sanity: dropping positions changes the output (the table is not silently dense)."""
    gen = torch.Generator().manual_seed(0)
    pool = make_pool(gen, 1, 20, 1, 8)
    dense = dense_row_specs([0], [20], 1, "cpu")
    sparse = FoldedRowSpecs.create([0], [0], PositionsCSR.from_lists([[0, 3]], "cpu"), [15], [20])
    q = torch.randn(1, 2, 8, generator=gen)
    outs = []
    for specs in (dense, sparse):
        t = build_folded_page_table(pool.req_to_token, specs, 1)
        outs.append(
            sparse_decode_reference(
                q,
                pool.k_buffer.view(-1, 8),
                pool.v_buffer.view(-1, 8),
                t.kv_indptr,
                t.kv_indices,
                0.3,
            )
        )
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"q": torch.zeros(2, 4)}, r"q: expected a 3-D tensor \[R, G, D\]"),
        ({"k_entries": torch.zeros(5, 3)}, r"k_entries: expected shape \(\*, 4\)"),
        ({"kv_indptr": torch.zeros(2, dtype=torch.int32)}, r"kv_indptr: expected shape \(3,\)"),
        ({"kv_indices": torch.zeros(2)}, "kv_indices: expected dtype int32"),
    ],
)
def test_reference_validation(bad, match):
    args = {
        "q": torch.zeros(2, 3, 4),
        "k_entries": torch.zeros(5, 4),
        "v_entries": torch.zeros(5, 4),
        "kv_indptr": torch.zeros(3, dtype=torch.int32),
        "kv_indices": torch.zeros(0, dtype=torch.int32),
        "sm_scale": 1.0,
    }
    with pytest.raises(ValueError, match=match):
        sparse_decode_reference(**{**args, **bad})
