"""Compiled Triton kernels against their torch twins on fresh random inputs (CUDA only): the
Quest top-k and entry gather, the folded-table kernels and the folded attention, and
FoldedDecode's Triton path against its torch path on the same metadata, eager, without host
syncs, and replayed from a CUDA graph."""

from __future__ import annotations

import math
import time

import pytest
import torch

if not torch.cuda.is_available():  # before importing triton: keep CPU sessions interpretable
    pytest.skip("needs CUDA", allow_module_level=True)

from hybridkv_sglang.attention.folded_decode import FoldedDecode, FoldedShape
from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_ref
from hybridkv_sglang.kernels.folded_attention import folded_attention, folded_attention_ref
from hybridkv_sglang.kernels.folded_tables import (
    NUM_CHUNKS,
    NUM_SEL,
    chunk_retrieval,
    chunk_retrieval_ref,
    folded_lengths,
    folded_lengths_ref,
)
from hybridkv_sglang.kernels.gather_entries import gather_entries, gather_entries_ref
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata
from tests.unit.kernels.folded_meta_testlib import RandomBatch, random_batch
from tests.unit.kernels.test_kernel_folded_attention import _attend, _split_offsets
from tests.unit.kernels.test_kernel_folded_tables import _dynamic_rows, _exact_scores, _retrieve

CUDA = "cuda"
SERVING = dict(batch=16, layers=3, heads=4, group=7, dim=128, chunk=16, ctx=200, padded=2)
"""Serving-like shapes within the test library's pool (``(batch + 3) * ctx <= 4096`` slots)."""


def _seed() -> torch.Generator:
    seed = time.time_ns() % 100_000
    print(f"seed {seed}")  # shown on failure
    return torch.Generator().manual_seed(seed)


def _on(batch: RandomBatch, device: str) -> RandomBatch:
    fields = {
        name: getattr(batch, name).to(device)
        for name in (
            "req_to_token",
            "req_pool_indices",
            "seq_lens",
            "slot_of_row",
            "row_meta",
            "fixed_values",
            "kmin",
            "kmax",
            "bound_channels",
            "bound_affine",
            "q",
        )
    }
    return RandomBatch(
        **fields,
        chunk_size=batch.chunk_size,
        candidate_slots=batch.candidate_slots,
        top_slots=batch.top_slots,
    )


# ----------------------------------------------------------------------------- chunk_topk
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


# ----------------------------------------------------------------------------- gather_entries
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


# ----------------------------------------------------------------------------- folded tables


@pytest.mark.parametrize(
    ("dtype", "width", "codes"),
    [
        (torch.float32, None, False),
        (torch.bfloat16, None, False),
        (torch.float16, None, False),
        (torch.bfloat16, 16, True),
    ],
)
def test_folded_table_kernels_compiled_match_twins(dtype, width, codes):
    cpu = random_batch(_seed(), dtype=dtype, width=width, codes=codes, **SERVING)
    dev = _on(cpu, CUDA)
    indptr = _split_offsets(dev, folded_lengths, MAX_SPLITS, 132)
    indptr_ref = _split_offsets(cpu, folded_lengths_ref, MAX_SPLITS, 132)
    assert torch.equal(indptr.cpu(), indptr_ref)
    gen = _seed()
    heads, dim = cpu.row_meta.shape[2], cpu.q.shape[2]
    entries = cpu.req_to_token.numel() * heads + 4096 * 2
    k = torch.randn(entries, dim, generator=gen).to(dtype)
    v = torch.randn(entries, dim, generator=gen).to(dtype)
    # the same chunks, up to float32 summation order between near-tied scores (both round the
    # scaled query to the bounds' 16-bit dtype, which _exact_scores' definition includes)
    tolerance = 1e-5
    for layer in range(cpu.num_layers):
        top = _retrieve(dev, chunk_retrieval, layer)
        top_ref = _retrieve(cpu, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param, at in _dynamic_rows(cpu, layer):
            scores, magnitude = _exact_scores(cpu, r, n, start, param)
            got = top[at : at + nsel].long().cpu()
            want = top_ref[at : at + nsel].long()
            assert got.unique().numel() == nsel and int(got.min()) >= 0 and int(got.max()) < n
            assert torch.allclose(
                scores[got].sort().values,
                scores[want].sort().values,
                rtol=0,
                atol=tolerance * magnitude,
            )
        args = (layer, k.to(CUDA), v.to(CUDA), indptr, top, MAX_SPLITS, 132)
        out = _attend(dev, folded_attention, *args)
        out_ref = _attend(cpu, folded_attention_ref, layer, k, v, indptr_ref, top.cpu(), 8, 132)
        _assert_close_rel(out.cpu(), out_ref, RTOL[dtype])


# ----------------------------------------------------------------------------- FoldedDecode
RTOL = {torch.float32: 1e-2, torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""Relative to the largest output magnitude; fp32 too: the attention multiplies in TF32."""
MAX_SPLITS = 8


def _metadata(batch: RandomBatch) -> DecodeMetadata:
    """Pools holding ``batch``'s row records as they are (on the batch's device)."""
    slots, layers, heads, _ = batch.row_meta.shape
    meta = DecodeMetadata(
        layers,
        heads,
        batch.kmin.shape[1],
        max_requests=slots,
        pool_rows=batch.slot_of_row.numel(),
        fixed_capacity=batch.fixed_values.numel(),
        bound_capacity=batch.kmin.shape[0],
        param_capacity=batch.bound_channels.shape[0],
        candidate_capacity=batch.candidate_slots,
        top_capacity=batch.top_slots,
        bound_dtype=batch.kmin.dtype,
        device=batch.row_meta.device,
    )
    meta.slot_of_row.copy_(batch.slot_of_row)
    meta.row_meta.copy_(batch.row_meta)
    meta.fixed_values.copy_(batch.fixed_values)
    meta.kmin.copy_(batch.kmin)
    meta.kmax.copy_(batch.kmax)
    meta.bound_channels.copy_(batch.bound_channels)
    meta.bound_affine.copy_(batch.bound_affine)
    return meta


def _decoders(batch: RandomBatch, kv_dim: int) -> tuple[FoldedDecode, FoldedDecode]:
    """Triton and torch steps over one shared metadata (the torch one reads the chunks the
    Triton retrieval chose: attend without retrieve)."""
    meta = _metadata(batch)
    rows = batch.req_pool_indices.numel() * batch.row_meta.shape[2]
    shape = FoldedShape(
        num_layers=batch.num_layers,
        num_kv_heads=batch.row_meta.shape[2],
        group_size=batch.q.shape[1],
        head_dim=batch.q.shape[2],
        v_head_dim=kv_dim,
        max_rows=rows,
        max_kv_splits=MAX_SPLITS,
        chunk_size=batch.chunk_size,
        max_chunks=int(batch.row_meta[..., NUM_CHUNKS].max()),
        max_selected=int(batch.row_meta[..., NUM_SEL].max()),
    )
    device = batch.row_meta.device
    return tuple(
        FoldedDecode(meta, shape, use_triton=t, target_programs=132, device=device)
        for t in (True, False)
    )


def _kv(batch: RandomBatch, dtype: torch.dtype, gen: torch.Generator):
    """A KV pool covering every slot and compact entry the random batch may name."""
    heads, dim = batch.row_meta.shape[2], batch.q.shape[2]
    slots = max(int(batch.req_to_token.max()) + 1, -(-int(batch.fixed_values.max() + 1) // heads))
    k = torch.randn(slots, heads, dim, generator=gen).to(dtype).to(CUDA)
    v = torch.randn(slots, heads, dim, generator=gen).to(dtype).to(CUDA)
    return k, v


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.double().abs().max()
    assert scale > 0, "refusing to compare against an all-zero reference"
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_folded_decode_triton_matches_torch_path(dtype):
    gen = _seed()
    batch = _on(random_batch(gen, dtype=dtype, **SERVING), CUDA)
    k_buffer, v_buffer = _kv(batch, dtype, gen)
    triton_step, torch_step = _decoders(batch, k_buffer.shape[-1])
    scale = 1 / math.sqrt(batch.q.shape[2])
    for step in (triton_step, torch_step):
        step.begin_step(batch.req_pool_indices, batch.seq_lens)
    assert torch.equal(triton_step.split_indptr, torch_step.split_indptr)
    for layer in range(batch.num_layers):
        q = torch.randn(batch.q.shape, generator=gen).to(dtype).to(CUDA)
        triton_step.retrieve(layer, q, k_buffer, v_buffer)
        got = triton_step.attend(layer, q, k_buffer, v_buffer, batch.req_to_token, scale)
        want = torch_step.attend(layer, q, k_buffer, v_buffer, batch.req_to_token, scale)
        assert got.dtype == dtype and got.shape == want.shape
        _assert_close_rel(got, want, RTOL[dtype])


def test_folded_decode_step_does_not_sync_and_replays_from_a_cuda_graph():
    gen = _seed()
    dtype = torch.bfloat16
    batch = _on(random_batch(gen, dtype=dtype, **SERVING), CUDA)
    k_buffer, v_buffer = _kv(batch, dtype, gen)
    steps = 2
    triton_step, torch_step = _decoders(batch, k_buffer.shape[-1])
    meta = triton_step.meta
    scale = 1 / math.sqrt(batch.q.shape[2])
    q = torch.zeros(batch.num_layers, *batch.q.shape, dtype=dtype, device=CUDA)
    outs: list[torch.Tensor] = []

    def step() -> None:
        outs.clear()
        triton_step.begin_step(batch.req_pool_indices, batch.seq_lens)
        for layer in range(batch.num_layers):
            triton_step.retrieve(layer, q[layer], k_buffer, v_buffer)
            outs.append(
                triton_step.attend(layer, q[layer], k_buffer, v_buffer, batch.req_to_token, scale)
            )

    step()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    captured = list(outs)
    real = batch.seq_lens > 1  # graph padding stays at length 1
    for _ in range(steps):
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        batch.seq_lens.add_(real.to(batch.seq_lens.dtype))  # one more token per request
        graph.replay()
        chosen = meta.chunk_top.clone()
        for layer in range(batch.num_layers):  # eager retrieval: the replay's was fresh
            triton_step.retrieve(layer, q[layer], k_buffer, v_buffer)
        assert torch.equal(meta.chunk_top, chosen)
        torch_step.begin_step(batch.req_pool_indices, batch.seq_lens)
        assert torch.equal(triton_step.split_indptr, torch_step.split_indptr)
        for layer in range(batch.num_layers):
            want = torch_step.attend(layer, q[layer], k_buffer, v_buffer, batch.req_to_token, scale)
            _assert_close_rel(captured[layer], want, RTOL[dtype])
