"""ragged_chunk_scores (Triton) against its torch twin, and against the padded chunk_topk_ref."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels.chunk_topk import chunk_topk_ref
from hybridkv_sglang.kernels.ragged_chunk_scores import (
    ragged_chunk_scores,
    ragged_chunk_scores_auto,
    ragged_chunk_scores_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (R, G, J, D): ones, primes, non powers of two, a real head_dim, D beyond one tile
SHAPES = [(1, 1, 1, 1), (3, 7, 29, 24), (5, 4, 64, 128), (2, 3, 13, 300), (4, 16, 40, 64)]


def _inputs(shape, dtype, seed, device):
    rows, groups, chunks, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, groups, dim, generator=gen).to(dtype)
    lo = torch.randn(chunks, dim, generator=gen)
    hi = (lo + torch.rand(chunks, dim, generator=gen)).to(dtype)
    # rows in [-1, R]: -1 and R mark unused chunks
    row = torch.randint(-1, rows + 1, (chunks,), generator=gen)
    row[0] = 0
    return [t.to(device) for t in (q, lo.to(dtype), hi, row)]


def _bound(q, lo, hi, row):
    """Magnitude of the summed terms per chunk, the scale of float32 summation error."""
    qa = q.float().abs().amax(1)[row.clamp(0, q.shape[0] - 1)]
    return (qa * torch.maximum(lo.abs(), hi.abs()).float()).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ragged_chunk_scores_matches_ref(kernel_device, shape, dtype):
    q, lo, hi, row = _inputs(shape, dtype, hash((shape, str(dtype))) % 1000, kernel_device)
    expected = ragged_chunk_scores_ref(q, lo, hi, row).cpu()
    actual = ragged_chunk_scores(q, lo, hi, row).cpu()
    assert actual.dtype == torch.float32 and actual.shape == (shape[2],)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert finite.any()
    err = (actual[finite] - expected[finite]).abs()
    bound = _bound(q.cpu(), lo.cpu(), hi.cpu(), row.cpu())[finite]
    assert bool((err <= 1e-5 * bound + 1e-6).all()), float(err.max())


def test_ragged_scores_equal_padded_scores():
    """Chunks laid out back to back score exactly as the padded op scores them per row."""
    gen = torch.Generator().manual_seed(7)
    rows, groups, c_max, dim = 4, 3, 9, 16
    q = torch.randn(rows, groups, dim, generator=gen)
    lo = torch.randn(rows, c_max, dim, generator=gen)
    hi = lo + torch.rand(rows, c_max, dim, generator=gen)
    num = torch.tensor([9, 0, 4, 7], dtype=torch.int32)
    padded, _ = chunk_topk_ref(q, lo, hi, num, 2)
    row = torch.cat([torch.full((int(n),), r) for r, n in enumerate(num.tolist())])
    col = torch.cat([torch.arange(int(n)) for n in num.tolist()])
    flat = ragged_chunk_scores_auto(q, lo[row, col], hi[row, col], row)
    assert torch.allclose(flat, padded[row, col], rtol=1e-6, atol=1e-6)


def test_ragged_chunk_scores_rejects_mismatched_bounds():
    q = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="kmin: expected shape"):
        ragged_chunk_scores_ref(q, torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_row: expected dtype"):
        ragged_chunk_scores_ref(q, torch.randn(3, 8), torch.randn(3, 8), torch.zeros(3))
