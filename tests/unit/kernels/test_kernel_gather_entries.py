"""gather_entries (Triton) against gather_entries_ref (torch): bit-exact copies."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels.gather_entries import (
    gather_entries,
    gather_entries_auto,
    gather_entries_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.uint8)
        if t.element_size() == 1
        else t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    )


def _random(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("entries", "dst_entries", "dim", "n"),
    [(1, 1, 1, 1), (13, 7, 7, 5), (40, 64, 130, 37), (17, 3, 64, 0)],
)
def test_gather_entries_matches_ref(kernel_device, dtype, entries, dst_entries, dim, n):
    gen = torch.Generator().manual_seed(entries * 31 + dim)
    n = min(n, entries, dst_entries)
    src_k, src_v = _random((entries, dim), dtype, gen), _random((entries, dim), dtype, gen)
    dst_k, dst_v = _random((dst_entries, dim), dtype, gen), _random((dst_entries, dim), dtype, gen)
    src_idx = torch.randperm(entries, generator=gen)[:n]
    dst_idx = torch.randperm(dst_entries, generator=gen)[:n]
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    gather_entries_ref(src_k, src_v, ref_k, ref_v, src_idx, dst_idx)
    dev = [t.to(kernel_device) for t in (src_k, src_v, dst_k, dst_v, src_idx, dst_idx)]
    gather_entries(*dev)
    assert torch.equal(_bits(dev[2].cpu()), _bits(ref_k))
    assert torch.equal(_bits(dev[3].cpu()), _bits(ref_v))
    if n:
        assert torch.equal(_bits(ref_k[dst_idx]), _bits(src_k[src_idx]))


def test_gather_entries_same_buffer_folded_view(kernel_device):
    """Compact mode: copy head slices of a [slots, H_kv, D] buffer to other slots of the same
    buffer (disjoint index sets), through the folded view [slots * H_kv, D]."""
    gen = torch.Generator().manual_seed(4)
    slots, heads, dim = 11, 3, 10
    k = torch.randn(slots, heads, dim, generator=gen).to(kernel_device)
    v = torch.randn(slots, heads, dim, generator=gen).to(kernel_device)
    perm = torch.randperm(slots * heads, generator=gen)
    src_idx, dst_idx = perm[:8].to(kernel_device), perm[8:16].to(kernel_device)
    ref_k, ref_v = k.clone().view(-1, dim), v.clone().view(-1, dim)
    gather_entries_ref(ref_k, ref_v, ref_k, ref_v, src_idx, dst_idx)
    fk, fv = k.view(-1, dim), v.view(-1, dim)
    gather_entries(fk, fv, fk, fv, src_idx, dst_idx)
    assert torch.equal(fk, ref_k) and torch.equal(fv, ref_v)


def test_gather_entries_strided_rows_and_int32_indices(kernel_device):
    gen = torch.Generator().manual_seed(8)
    big = torch.randn(9, 20, generator=gen).to(kernel_device)
    src_k, src_v = big[:, :6], big[:, 10:16]  # row stride 20
    dst_k = torch.zeros(5, 6, device=kernel_device)
    dst_v = torch.zeros(5, 6, device=kernel_device)
    src_idx = torch.tensor([8, 0, 3], dtype=torch.int32, device=kernel_device)
    dst_idx = torch.tensor([4, 1, 0], dtype=torch.int32, device=kernel_device)
    gather_entries(src_k, src_v, dst_k, dst_v, src_idx, dst_idx)
    assert torch.equal(dst_k[dst_idx.long()], src_k[src_idx.long()])
    assert torch.equal(dst_v[dst_idx.long()], src_v[src_idx.long()])
    assert dst_k[[2, 3]].abs().sum() == 0


def test_gather_entries_auto_on_cpu_is_ref():
    src = torch.arange(12.0).view(4, 3)
    dk, dv = torch.zeros(2, 3), torch.zeros(2, 3)
    gather_entries_auto(src, src + 100, dk, dv, torch.tensor([3, 1]), torch.tensor([0, 1]))
    assert dk.tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]
    assert dv[0, 0] == 109.0


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("src_k", torch.zeros(4, 3, 1), r"src_k: expected a 2-D tensor \[E, D\]"),
        (
            "dst_k",
            torch.zeros(2, 3, dtype=torch.float16),
            "dst_k: expected dtype float32, got float16",
        ),
        ("dst_v", torch.zeros(2, 5), r"dst_v: expected shape \(2, 3\)"),
        ("src_idx", torch.zeros(2), "src_idx: expected dtype int32 or int64, got float32"),
        ("dst_idx", torch.zeros(1, dtype=torch.int64), r"dst_idx: expected shape \(2,\)"),
    ],
)
def test_gather_entries_validation(name, value, match):
    args = {
        "src_k": torch.zeros(4, 3),
        "src_v": torch.zeros(4, 3),
        "dst_k": torch.zeros(2, 3),
        "dst_v": torch.zeros(2, 3),
        "src_idx": torch.zeros(2, dtype=torch.int64),
        "dst_idx": torch.zeros(2, dtype=torch.int64),
    }
    args[name] = value
    for fn in (gather_entries_ref, gather_entries):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_gather_entries_requires_contiguous_last_dim(kernel_device):
    src = torch.zeros(3, 4, device=kernel_device).T  # last-dim stride 4
    dst = torch.zeros(2, 3, device=kernel_device)
    idx = torch.zeros(1, dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        gather_entries(src, src, dst, dst, idx, idx)
