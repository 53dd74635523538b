"""chunk_topk (Triton) against chunk_topk_ref (torch), plus the needle and contract checks."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels import _common
from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_auto, chunk_topk_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (R, G, C_max, D): ones, primes, non powers of two, a real head_dim
SHAPES = [
    (1, 1, 1, 1),
    (2, 7, 11, 24),
    (3, 4, 17, 64),
    (5, 3, 5, 13),
    (2, 16, 33, 128),
    (2, 3, 7, 300),  # head_dim beyond one tile: the D loop
]


def _inputs(shape, dtype, seed, device):
    rows, groups, c_max, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, groups, dim, generator=gen)
    lo = torch.randn(rows, c_max, dim, generator=gen)
    hi = lo + torch.rand(rows, c_max, dim, generator=gen)
    num = torch.randint(0, c_max + 1, (rows,), generator=gen, dtype=torch.int32)
    num[0] = c_max  # at least one full row
    return [t.to(device) for t in (q.to(dtype), lo.to(dtype), hi.to(dtype), num)]


def _assert_scores_close(actual, expected, q, lo, hi):
    """Same -inf pattern; finite scores equal up to float32 summation order, measured against
    the magnitude of the summed terms (never relative to a score that may be ~0)."""
    assert actual.dtype == expected.dtype == torch.float32
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    bound = (q.float().abs().amax(1)[:, None, :] * torch.maximum(lo.abs(), hi.abs()).float()).sum(
        -1
    )  # [R, C]
    finite = torch.isfinite(expected)
    if finite.any():
        err = (actual[finite] - expected[finite]).abs()
        assert bool((err <= 1e-5 * bound[finite] + 1e-6).all()), float(err.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunk_topk_matches_ref(kernel_device, shape, dtype):
    q, lo, hi, num = _inputs(shape, dtype, hash((shape, str(dtype))) % 1000, kernel_device)
    k = min(3, shape[2])
    s_ref, t_ref = chunk_topk_ref(q, lo, hi, num, k)
    s_tri, t_tri = chunk_topk(q, lo, hi, num, k)
    _assert_scores_close(s_tri.cpu(), s_ref.cpu(), q.cpu(), lo.cpu(), hi.cpu())
    assert t_tri.dtype == torch.int32 and t_tri.shape == (shape[0], k)
    # same -1 padding, and the chosen chunks carry the reference's top scores (ids may differ
    # only between chunks whose scores tie up to rounding)
    valid = t_tri >= 0
    assert torch.equal(valid, t_ref >= 0)
    picked = torch.gather(s_ref, 1, t_tri.clamp(min=0).long())
    best = torch.gather(s_ref, 1, t_ref.clamp(min=0).long())
    assert torch.allclose(picked[valid], best[valid], rtol=1e-5, atol=1e-5)
    # descending order
    tri_scores = torch.gather(s_tri, 1, t_tri.clamp(min=0).long())
    diffs = tri_scores[:, 1:] - tri_scores[:, :-1]
    assert bool((diffs[valid[:, 1:]] <= 0).all())


def test_chunk_topk_definition_by_hand():
    """Two chunks, one row, G=2: the score is max over g of sum_d max(q*kmin, q*kmax)."""
    q = torch.tensor([[[1.0, -2.0], [0.5, 0.5]]])
    lo = torch.tensor([[[0.0, -1.0], [-3.0, 1.0]]])
    hi = torch.tensor([[[2.0, 1.0], [-1.0, 4.0]]])
    # chunk 0: g0 = max(0,2) + max(2,-2) = 4 ; g1 = 1 + 0.5 = 1.5 -> 4
    # chunk 1: g0 = max(-3,-1) + max(-2,-8) = -3 ; g1 = -0.5 + 2 = 1.5 -> 1.5
    scores, top = chunk_topk_ref(q, lo, hi, torch.tensor([2], dtype=torch.int32), 3)
    assert scores.tolist() == [[4.0, 1.5]]
    assert top.tolist() == [[0, 1, -1]]


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_chunk_topk_padding_and_k_beyond_chunks(kernel_device, k):
    q, lo, hi, _ = _inputs((4, 2, 6, 8), torch.float32, 11, kernel_device)
    num = torch.tensor([6, 2, 0, 5], dtype=torch.int32, device=kernel_device)
    for fn in (chunk_topk_ref, chunk_topk):
        scores, top = fn(q, lo, hi, num, k)
        assert top.shape == (4, k)
        for r, n in enumerate(num.tolist()):
            n_valid = min(n, k)
            row = top[r].tolist()
            assert all(c >= 0 for c in row[:n_valid]) and all(c == -1 for c in row[n_valid:])
            assert all(c < n for c in row[:n_valid])
            assert bool(torch.isinf(scores[r, n:]).all()) and bool(
                torch.isfinite(scores[r, :n]).all()
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_topk_finds_planted_needle(kernel_device, dtype):
    """A chunk whose keys align with the query outranks noise; a needle past num_chunks is
    never chosen."""
    gen = torch.Generator().manual_seed(5)
    rows, groups, c_max, dim = 3, 7, 23, 32
    q = torch.randn(rows, groups, dim, generator=gen)
    lo = 0.1 * torch.randn(rows, c_max, dim, generator=gen)
    hi = lo + 0.1 * torch.rand(rows, c_max, dim, generator=gen)
    needles = [4, 0, 17]
    for r, c in enumerate(needles):
        lo[r, c] = hi[r, c] = 3.0 * q[r, 2]  # aligned with query head 2 of the group
    lo[0, 20] = hi[0, 20] = 10.0 * q[0, 2]  # stronger, but beyond num_chunks of row 0
    num = torch.tensor([19, 23, 18], dtype=torch.int32)
    args = [t.to(dtype).to(kernel_device) for t in (q, lo, hi)] + [num.to(kernel_device)]
    for fn in (chunk_topk_ref, chunk_topk):
        _, top = fn(*args, 2)
        assert top[:, 0].tolist() == needles


def test_chunk_topk_strided_inputs(kernel_device):
    """Views the policy passes: kmin[:, first:] slices and a permuted q."""
    q, lo, hi, num = _inputs((3, 5, 12, 16), torch.float32, 3, kernel_device)
    first = 2
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    num = num.clamp(max=12 - first)
    s_ref, _ = chunk_topk_ref(q, lo[:, first:].contiguous(), hi[:, first:].contiguous(), num, 4)
    s_tri, _ = chunk_topk(q_t, lo[:, first:], hi[:, first:], num, 4)
    _assert_scores_close(
        s_tri.cpu(), s_ref.cpu(), q.cpu(), lo[:, first:].cpu(), hi[:, first:].cpu()
    )


def test_chunk_topk_auto_on_cpu_is_ref():
    q, lo, hi, num = _inputs((2, 3, 7, 8), torch.float32, 1, "cpu")
    s_auto, t_auto = chunk_topk_auto(q, lo, hi, num, 3)
    s_ref, t_ref = chunk_topk_ref(q, lo, hi, num, 3)
    assert torch.equal(s_auto, s_ref) and torch.equal(t_auto, t_ref)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: {**a, "q": a["q"][0]}, r"q: expected a 3-D tensor \[R, G, D\], got shape"),
        (lambda a: {**a, "q": a["q"].double()}, "q: expected dtype float16 or bfloat16 or float32"),
        (lambda a: {**a, "kmax": a["kmax"].half()}, "kmax: expected dtype float32, got float16"),
        (lambda a: {**a, "kmin": a["kmin"][:, :, :3]}, r"kmin: expected shape \(2, \*, 4\)"),
        (lambda a: {**a, "num_chunks": a["num_chunks"].float()}, "num_chunks: expected dtype"),
        (lambda a: {**a, "num_chunks": a["num_chunks"][:1]}, r"num_chunks: expected shape \(2,\)"),
        (lambda a: {**a, "k": -1}, "k: expected a non-negative int, got -1"),
    ],
)
def test_chunk_topk_validation(mutate, match):
    args = {
        "q": torch.zeros(2, 3, 4),
        "kmin": torch.zeros(2, 5, 4),
        "kmax": torch.zeros(2, 5, 4),
        "num_chunks": torch.zeros(2, dtype=torch.int32),
        "k": 2,
    }
    for fn in (chunk_topk_ref, chunk_topk):
        with pytest.raises(ValueError, match=match):
            fn(**mutate(args))


def test_chunk_topk_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "interpret_enabled", lambda: False)
    q, lo, hi, num = _inputs((1, 1, 2, 2), torch.float32, 0, "cpu")
    with pytest.raises(ValueError, match=r"expected CUDA tensors.*chunk_topk_ref.*chunk_topk_auto"):
        chunk_topk(q, lo, hi, num, 1)
