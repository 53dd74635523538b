"""window_attention equals the naive masked softmax (GQA, causal) and never looks ahead."""

from __future__ import annotations

import pytest
import torch
from policy_testlib import naive_window_attention

from hybridkv_sglang.policy import window_attention

# (w, N, H_q, H_kv, D): awkward sizes on purpose (1, primes, G = 7 like Qwen2.5-VL-7B).
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 9, 2, 1, 4),
    (5, 37, 6, 2, 8),
    (7, 7, 4, 4, 3),
    (32, 101, 28, 4, 16),
    (13, 64, 3, 1, 13),
]


@pytest.mark.parametrize("w,n,hq,hkv,d", SHAPES)
def test_matches_naive_reference(w: int, n: int, hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(w * 1000 + n)
    q = torch.randn(w, hq, d, generator=gen)
    k = torch.randn(n, hkv, d, generator=gen)
    scale = d**-0.5 * 2.0
    got = window_attention(q, k, scale)
    assert got.shape == (hkv, w, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_window_attention(q, k, scale), atol=1e-5, rtol=0)


@pytest.mark.parametrize("w,n,hq,hkv,d", SHAPES)
def test_rows_are_causal_distributions(w: int, n: int, hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(7)
    got = window_attention(torch.randn(w, hq, d, generator=gen), torch.randn(n, hkv, d), 1.0)
    torch.testing.assert_close(got.sum(-1), torch.ones(hkv, w), atol=1e-5, rtol=0)
    limit = torch.arange(w) + (n - w)  # row i sees keys <= N - w + i
    future = torch.arange(n)[None, :] > limit[:, None]
    assert torch.all(got[:, future] == 0)
    assert torch.all(got[:, ~future] > 0)


def test_gqa_group_mapping_is_contiguous() -> None:
    """Query heads 0..G-1 belong to kv head 0: changing them must not move kv head 1's rows."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 6, 8, generator=gen)
    k = torch.randn(20, 2, 8, generator=gen)
    base = window_attention(q, k, 1.0)
    q2 = q.clone()
    q2[:, :3] = torch.randn(4, 3, 8, generator=gen)
    moved = window_attention(q2, k, 1.0)
    assert not torch.allclose(moved[0], base[0])
    torch.testing.assert_close(moved[1], base[1])


def test_low_precision_inputs_are_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 4, 16, generator=gen).bfloat16()
    k = torch.randn(50, 2, 16, generator=gen).bfloat16()
    got = window_attention(q, k, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), naive_window_attention(q.float(), k.float(), 0.25), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "q_shape,k_shape,match",
    [
        ((4, 6, 8), (20, 4, 8), "multiple of H_kv"),
        ((4, 4, 8), (20, 2, 7), "head_dim"),
        ((21, 4, 8), (20, 2, 8), "window <= prompt length"),
        ((4, 8), (20, 2, 8), "expected q_window"),
    ],
)
def test_bad_shapes_raise(q_shape: tuple, k_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        window_attention(torch.randn(q_shape), torch.randn(k_shape), 1.0)
