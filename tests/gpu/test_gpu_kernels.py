"""Compiled Triton kernels against their torch twins at serving shapes (CUDA only), and the
page-table build path without host syncs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

if not torch.cuda.is_available():  # before importing triton: keep CPU sessions interpretable
    pytest.skip("needs CUDA", allow_module_level=True)

from folded_testlib import Pool, make_pool, naive_indices, random_batch

from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_ref
from hybridkv_sglang.kernels.gather_entries import gather_entries, gather_entries_ref
from hybridkv_sglang.kernels.page_table_indices import (
    build_page_table_indices,
    build_page_table_indices_ref,
    kv_indptr_from_lengths,
)
from hybridkv_sglang.kernels.ragged_chunk_scores import (
    ragged_chunk_scores,
    ragged_chunk_scores_ref,
)
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from hybridkv_sglang.storage.page_tables import PositionsCSR, build_folded_page_table
from hybridkv_sglang.storage.static_decode import StaticDecodeTables

CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("rows", "groups", "c_max", "dim"), [(1, 1, 1, 64), (112, 7, 509, 128), (64, 4, 256, 128)]
)
def test_chunk_topk_compiled_matches_ref(rows, groups, c_max, dim, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(rows + c_max)
    q = torch.randn(rows, groups, dim, generator=gen, device=CUDA).to(dtype)
    lo = torch.randn(rows, c_max, dim, generator=gen, device=CUDA)
    hi = (lo + torch.rand(rows, c_max, dim, generator=gen, device=CUDA)).to(dtype)
    lo = lo.to(dtype)
    num = torch.randint(0, c_max + 1, (rows,), generator=gen, device=CUDA, dtype=torch.int32)
    k = min(8, c_max)
    s_ref, t_ref = chunk_topk_ref(q, lo, hi, num, k)
    s_tri, t_tri = chunk_topk(q, lo, hi, num, k)
    assert torch.equal(torch.isinf(s_tri), torch.isinf(s_ref))
    finite = torch.isfinite(s_ref)
    bound = (q.float().abs().amax(1)[:, None, :] * torch.maximum(lo.abs(), hi.abs()).float()).sum(
        -1
    )
    assert bool(((s_tri - s_ref).abs()[finite] <= 1e-5 * bound[finite] + 1e-5).all())
    valid = t_tri >= 0
    assert torch.equal(valid, t_ref >= 0)
    picked = torch.gather(s_ref, 1, t_tri.clamp(min=0).long())[valid]
    best = torch.gather(s_ref, 1, t_ref.clamp(min=0).long())[valid]
    assert torch.allclose(picked, best, rtol=1e-5, atol=1e-4)


def test_chunk_topk_does_not_sync():
    q = torch.randn(32, 7, 128, device=CUDA, dtype=torch.bfloat16)
    lo = torch.randn(32, 100, 128, device=CUDA, dtype=torch.bfloat16)
    num = torch.full((32,), 90, device=CUDA, dtype=torch.int32)
    chunk_topk(q, lo, lo, num, 8)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunk_topk(q, lo, lo, num, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(("rows", "heads", "ctx"), [(1, 1, 1), (7, 4, 333), (256, 4, 4096)])
def test_page_table_indices_compiled_match_ref(rows, heads, ctx):
    gen = torch.Generator().manual_seed(rows)
    num_pool = 4
    r2t = torch.randperm(num_pool * ctx + 3, generator=gen)[: num_pool * ctx].view(num_pool, ctx)
    row_req = torch.randint(0, num_pool, (rows,), generator=gen)
    row_head = torch.randint(0, heads, (rows,), generator=gen)
    sel_len = torch.randint(0, ctx // 2 + 1, (rows,), generator=gen)
    sel_indptr = torch.zeros(rows + 1, dtype=torch.int32)
    sel_indptr[1:] = torch.cumsum(sel_len, 0)
    sel_pos = torch.randint(0, ctx, (int(sel_len.sum()),), generator=gen, dtype=torch.int32)
    ts = torch.randint(0, ctx + 1, (rows,), generator=gen, dtype=torch.int32)
    te = torch.full((rows,), ctx, dtype=torch.int32)
    args = (
        r2t.int(),
        row_req,
        row_head,
        sel_indptr,
        sel_pos,
        ts,
        te,
        kv_indptr_from_lengths(sel_len, te - ts),
        heads,
    )
    ref = build_page_table_indices_ref(*args)
    dev = tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args)
    assert torch.equal(build_page_table_indices(*dev).cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_gather_entries_compiled_matches_ref(dtype):
    slots, heads, dim, n = 5000, 4, 128, 3001
    k = torch.randn(slots, heads, dim, device=CUDA).to(dtype).view(-1, dim)
    v = torch.randn(slots, heads, dim, device=CUDA).to(dtype).view(-1, dim)
    perm = torch.randperm(slots * heads, device=CUDA)
    src_idx, dst_idx = perm[:n], perm[n : 2 * n]
    ref_k, ref_v = k.clone(), v.clone()
    gather_entries_ref(ref_k, ref_v, ref_k, ref_v, src_idx, dst_idx)
    gather_entries(k, v, k, v, src_idx, dst_idx)
    assert torch.equal(k.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v.view(torch.uint8), ref_v.view(torch.uint8))


def _cuda_pool(pool: Pool) -> Pool:
    return Pool(pool.req_to_token.to(CUDA), pool.k_buffer.to(CUDA), pool.v_buffer.to(CUDA))


def test_folded_table_on_cuda_matches_definition_without_sync():
    gen = torch.Generator().manual_seed(0)
    cpu_pool = make_pool(gen, 9, 200, 4, 8)
    pool = _cuda_pool(cpu_pool)
    batch = random_batch(gen, pool, 8, sink=4, window=32, chunk_size=16, top_k=4, device=CUDA)
    build_folded_page_table(pool.req_to_token, batch.specs, 4)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        table = build_folded_page_table(pool.req_to_token, batch.specs, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expect = naive_indices(cpu_pool, batch)
    assert table.kv_indices.cpu().tolist() == [e for row in expect for e in row]
    assert torch.equal(table.kv_indptr.cpu(), table.kv_indptr_host)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "groups", "chunks", "dim"), [(1, 1, 1, 64), (64, 7, 40000, 128)])
def test_ragged_chunk_scores_compiled_matches_ref(rows, groups, chunks, dim, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(rows + chunks)
    q = torch.randn(rows, groups, dim, generator=gen, device=CUDA).to(dtype)
    lo = torch.randn(chunks, dim, generator=gen, device=CUDA)
    hi = (lo + torch.rand(chunks, dim, generator=gen, device=CUDA)).to(dtype)
    lo = lo.to(dtype)
    row = torch.randint(-1, rows + 1, (chunks,), generator=gen, device=CUDA)
    ref = ragged_chunk_scores_ref(q, lo, hi, row)
    got = ragged_chunk_scores(q, lo, hi, row)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    magnitude = torch.maximum(lo.abs(), hi.abs()).float()
    bound = (q.float().abs().amax(1)[row.clamp(0, rows - 1)] * magnitude).sum(-1)
    assert bool(((got - ref).abs()[finite] <= 1e-5 * bound[finite] + 1e-5).all())


def test_static_chunk_fill_captures_in_a_cuda_graph_and_replays_the_eager_tables():
    """The in-graph half of the fixed decode tables: captured once, replayed over new steps."""
    from tests.unit.runtime.test_decode_layout import DIM, GROUP, HEADS, LAYERS
    from tests.unit.storage.test_static_decode import LIMITS, _requests

    req_to_token, prompt_lens, cpu_layouts = _requests(0)
    req_to_token = req_to_token.to(CUDA)
    layouts = [None if lay is None else _to_cuda(lay) for lay in cpu_layouts]
    tables = StaticDecodeTables(LAYERS, HEADS, DIM, LIMITS, torch.float32, CUDA)
    rows = len(prompt_lens) * HEADS
    q = torch.zeros(LAYERS, rows, GROUP, DIM, device=CUDA)

    def batch(step: int) -> DecodeBatchLayout:
        lens = [n + 3 + step for n in prompt_lens]
        return DecodeBatchLayout([1, 2, 3, 4], lens, layouts, HEADS)

    def fill() -> None:
        for layer in range(LAYERS):
            tables.fill_chunks(layer, q[layer], req_to_token)

    tables.stage(batch(0), req_to_token)
    q.normal_()
    graph = captured(fill)
    for step in range(1, 4):
        current = batch(step)
        tables.stage(current, req_to_token)
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            expected = current.layer_table(layer, q[layer], req_to_token)
            assert torch.equal(tables.layer_table(layer).kv_indices, expected.kv_indices)


def captured(fn) -> torch.cuda.CUDAGraph:
    """Run ``fn`` once (kernels compile outside the capture), then capture it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _to_cuda(layout):
    """The same plan's layout with its tensors on the GPU."""

    def csr(c: PositionsCSR) -> PositionsCSR:
        return PositionsCSR(c.indptr_host, c.indptr.to(CUDA), c.positions.to(CUDA))

    layers = tuple(
        dataclasses.replace(
            lay,
            static_kept=csr(lay.static_kept),
            chunk_kmin=None if lay.chunk_kmin is None else lay.chunk_kmin.to(CUDA),
            chunk_kmax=None if lay.chunk_kmax is None else lay.chunk_kmax.to(CUDA),
        )
        for lay in layout.layers
    )
    return dataclasses.replace(layout, layers=layers)
