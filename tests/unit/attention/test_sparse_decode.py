"""sparse_decode_reference against its row-by-row definition (float64), and the decode step
over it (FoldedDecode; also the Triton path under the interpreter) with every row selecting
everything == plain dense GQA attention (SDPA).

Masked attention over real plans' sparse rows: tests/unit/runtime/test_decode_layout.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridkv_sglang.kernels._common import interpret_enabled
from hybridkv_sglang.kernels.sparse_decode import sparse_decode_reference
from tests.unit.attention.hand_layouts import hand_layout
from tests.unit.runtime.folded_steps import decode_layer, folded_for

# relative to the largest reference magnitude: float32 is exact up to summation order; half
# types are one rounding of the float32 result (2^-8 bf16, 2^-11 fp16) plus input rounding.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
KERNELS = [False, *([True] if interpret_enabled() else [])]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max error over the largest magnitude of the reference, which must not be zero."""
    scale = expected.double().abs().max()
    assert scale > 0, "refusing to compare against an all-zero reference"
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


def _naive_paged_decode(q, k_entries, v_entries, kv_indptr, kv_indices, sm_scale):
    """Row by row, the definition, in float64."""
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


def _pool(gen: torch.Generator, prompt_lens: list[int], decode: int, heads: int, dim: int, dtype):
    """Requests in pool rows 1.. with distinct random slots (slot 0 unused: SGLang's padding)."""
    total = sum(prompt_lens) + decode * len(prompt_lens)
    slots = (torch.randperm(total, generator=gen) + 1).to(torch.int32)
    req_to_token = torch.zeros(len(prompt_lens) + 1, max(prompt_lens) + decode, dtype=torch.int32)
    start = 0
    for i, n in enumerate(prompt_lens):
        req_to_token[i + 1, : n + decode] = slots[start : start + n + decode]
        start += n + decode
    k_buffer = torch.randn(total + 1, heads, dim, generator=gen).to(dtype)
    v_buffer = torch.randn(total + 1, heads, dim, generator=gen).to(dtype)
    return req_to_token, k_buffer, v_buffer


def _sdpa_dense(q, req_to_token, k_buffer, v_buffer, seq_lens, scale):
    """Plain dense decode attention per request, GQA by repeating kv heads, via SDPA."""
    group = q.shape[1] // k_buffer.shape[1]
    outs = []
    for b, length in enumerate(seq_lens):
        slots = req_to_token[b + 1, :length].long()
        k = k_buffer[slots].float().transpose(0, 1).repeat_interleave(group, 0)
        v = v_buffer[slots].float().transpose(0, 1).repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=scale)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("use_triton", KERNELS)
@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("seed", range(3))
def test_full_selection_equals_dense_gqa_attention(seed, dtype, use_triton):
    """Every row kind selecting everything, and plain dense rows, through the decode step
    (``q [B, H_kv * G, D]`` viewed as rows ``[B * H_kv, G, D]``) == SDPA with repeated kv heads."""
    gen = torch.Generator().manual_seed(seed)
    heads, groups, dim, decode = 2, 7, 24, 3
    sink, window, chunk = 2, 4, 4
    prompt_lens = [int(n) for n in torch.randint(12, 34, (4,), generator=gen)]
    req_to_token, k_buffer, v_buffer = _pool(gen, prompt_lens, decode, heads, dim, dtype)
    seq_lens = [n + decode for n in prompt_lens]
    layouts = {}
    # request 1 stays dense; 2: a static and a dynamic head; 3: all dynamic; 4: all static
    for row, static_heads in ((2, [0]), (3, []), (4, [0, 1])):
        n = prompt_lens[row - 1]
        keys = k_buffer[req_to_token[row, :n].long()]
        keep_all = {h: torch.randperm(n, generator=gen) for h in static_heads}
        layouts[row] = hand_layout(
            keys, static=keep_all, sink=sink, window=window, chunk=chunk, top_k=n
        )
    assert all(lay.dynamic_rows.num_chunks > 0 for lay in layouts.values())
    q = torch.randn(len(prompt_lens), heads * groups, dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(dim)
    expected = _sdpa_dense(q, req_to_token, k_buffer, v_buffer, seq_lens, scale)
    shapes = dict(layers=1, heads=heads, group=groups, dim=dim, chunk=chunk)
    pool_rows = req_to_token.shape[0]
    for stored in (layouts, {}):
        folded = folded_for(stored, pool_rows=pool_rows, use_triton=use_triton, **shapes)
        folded.begin_step(torch.arange(1, pool_rows), torch.tensor(seq_lens))
        rows = q.view(len(prompt_lens) * heads, groups, dim)
        out = decode_layer(folded, 0, rows, k_buffer, v_buffer, req_to_token, scale)
        assert out.dtype == dtype
        assert_close_rel(out.view_as(q), expected, RTOL[dtype])


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
