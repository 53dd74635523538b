"""FlashInferFoldedDecode (FlashInfer batch decode over folded per-head tables) against
sparse_decode_reference, on CUDA with flashinfer installed."""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():  # before importing triton: keep CPU sessions interpretable
    pytest.skip("needs CUDA", allow_module_level=True)

from folded_testlib import Pool, make_pool, random_batch

from hybridkv_sglang.attention import FlashInferFoldedDecode, sparse_decode_reference
from hybridkv_sglang.storage.page_tables import build_folded_page_table, dense_row_specs

flashinfer = pytest.importorskip("flashinfer")

CUDA = "cuda"
RTOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.double().abs().max()
    assert scale > 0, "refusing to compare against an all-zero reference"
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_reqs", "heads", "groups", "dim"),
    [(1, 1, 1, 128), (6, 4, 7, 128), (5, 2, 4, 64), (3, 8, 3, 128), (4, 2, 16, 128)],
)
def test_flashinfer_folded_decode_matches_reference(num_reqs, heads, groups, dim, dtype):
    gen = torch.Generator().manual_seed(num_reqs * 10 + groups)
    cpu_pool = make_pool(gen, num_reqs + 2, 700, heads, dim, dtype)
    pool = Pool(
        *(t.to(CUDA) for t in (cpu_pool.req_to_token, cpu_pool.k_buffer, cpu_pool.v_buffer))
    )
    batch = random_batch(
        gen, pool, num_reqs, sink=4, window=32, chunk_size=16, top_k=8, device=CUDA
    )
    table = build_folded_page_table(pool.req_to_token, batch.specs, heads)
    q = torch.randn(num_reqs * heads, groups, dim, generator=gen).to(dtype).to(CUDA)
    scale = 1 / math.sqrt(dim)
    decode = FlashInferFoldedDecode(groups, dim, CUDA)
    assert decode.use_tensor_cores == (groups not in {1, 2, 3, 4, 6, 8, 16})
    decode.plan(table, q_dtype=dtype, kv_dtype=dtype, sm_scale=scale)
    out = decode.run(q, pool.k_buffer, pool.v_buffer)
    ref = sparse_decode_reference(
        q,
        pool.k_buffer.view(-1, dim),
        pool.v_buffer.view(-1, dim),
        table.kv_indptr,
        table.kv_indices,
        scale,
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_rel(out, ref, RTOL[dtype])


def test_flashinfer_folded_decode_tensor_cores_forced_for_group_7():
    decode = FlashInferFoldedDecode(7, 128, CUDA)
    assert decode.use_tensor_cores
    with pytest.raises(ValueError, match="group sizes"):
        FlashInferFoldedDecode(7, 128, CUDA, use_tensor_cores=False)


def test_plan_reused_for_equal_row_lengths_reads_the_new_table():
    """A second table with the same row lengths (another layer of the step) reuses the plan and
    must read its own entries."""
    gen = torch.Generator().manual_seed(3)
    cpu_pool = make_pool(gen, 6, 300, 4, 128, torch.bfloat16)
    pool = Pool(
        *(t.to(CUDA) for t in (cpu_pool.req_to_token, cpu_pool.k_buffer, cpu_pool.v_buffer))
    )
    first = build_folded_page_table(
        pool.req_to_token, dense_row_specs([0, 1, 2], [250, 90, 300], 4, CUDA), 4
    )
    second = build_folded_page_table(
        pool.req_to_token, dense_row_specs([3, 4, 5], [250, 90, 300], 4, CUDA), 4
    )
    q = torch.randn(12, 7, 128, generator=gen).to(torch.bfloat16).to(CUDA)
    decode = FlashInferFoldedDecode(7, 128, CUDA)
    scale = 128**-0.5
    assert decode.plan(first, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, sm_scale=scale)
    decode.run(q, pool.k_buffer, pool.v_buffer)
    assert not decode.plan(second, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, sm_scale=scale)
    out = decode.run(q, pool.k_buffer, pool.v_buffer)
    ref = sparse_decode_reference(
        q,
        pool.k_buffer.view(-1, 128),
        pool.v_buffer.view(-1, 128),
        second.kv_indptr,
        second.kv_indices,
        scale,
    )
    assert_close_rel(out, ref, RTOL[torch.bfloat16])


def test_graph_decode_captured_then_replayed_matches_reference():
    """GraphDecode: fixed tables + one CUDA-graph FlashInfer wrapper per layer, captured once and
    replayed over new steps, equals the reference attention over the eager tables."""
    from hybridkv_sglang.runtime.graph_decode import GraphDecode
    from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
    from hybridkv_sglang.storage.static_decode import StaticDecodeTables
    from tests.gpu.test_gpu_kernels import _to_cuda, captured
    from tests.unit.runtime.test_decode_layout import DIM, GROUP, HEADS, LAYERS, SM_SCALE
    from tests.unit.storage.test_static_decode import LIMITS, _requests

    req_to_token, prompt_lens, cpu_layouts = _requests(1)
    req_to_token = req_to_token.to(CUDA)
    layouts = [None if lay is None else _to_cuda(lay) for lay in cpu_layouts]
    gen = torch.Generator().manual_seed(9)
    slots = int(req_to_token.max()) + 1
    keys = torch.randn(LAYERS, slots, HEADS, DIM, generator=gen).to(torch.bfloat16).to(CUDA)
    values = torch.randn(LAYERS, slots, HEADS, DIM, generator=gen).to(torch.bfloat16).to(CUDA)
    tables = StaticDecodeTables(LAYERS, HEADS, DIM, LIMITS, torch.bfloat16, CUDA)
    graph_decode = GraphDecode(tables, GROUP, DIM, torch.bfloat16)
    rows = len(prompt_lens) * HEADS
    q = torch.zeros(LAYERS, rows, GROUP, DIM, dtype=torch.bfloat16, device=CUDA)
    outs = torch.zeros(LAYERS, rows, GROUP, DIM, dtype=torch.bfloat16, device=CUDA)

    def batch(step: int) -> DecodeBatchLayout:
        return DecodeBatchLayout([1, 2, 3, 4], [n + 3 + step for n in prompt_lens], layouts, HEADS)

    def step() -> None:
        for layer in range(LAYERS):
            outs[layer] = graph_decode.attend(
                layer, q[layer], keys[layer], values[layer], req_to_token, SM_SCALE
            )

    graph_decode.stage(batch(0), req_to_token, torch.bfloat16)
    q.normal_()
    graph = captured(step)
    for n in range(1, 4):
        current = batch(n)
        graph_decode.stage(current, req_to_token, torch.bfloat16)
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            table = current.layer_table(layer, q[layer], req_to_token)
            ref = sparse_decode_reference(
                q[layer],
                keys[layer].view(-1, DIM),
                values[layer].view(-1, DIM),
                table.kv_indptr,
                table.kv_indices,
                SM_SCALE,
            )
            assert_close_rel(outs[layer], ref, RTOL[torch.bfloat16])
