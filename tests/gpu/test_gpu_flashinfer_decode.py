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
from hybridkv_sglang.storage.page_tables import build_folded_page_table

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
