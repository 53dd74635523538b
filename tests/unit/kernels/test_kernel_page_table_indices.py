"""build_page_table_indices (Triton) against its torch twin and a per-row loop: exact match."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.kernels.page_table_indices import (
    build_page_table_indices,
    build_page_table_indices_auto,
    build_page_table_indices_ref,
    kv_indptr_from_lengths,
)


def _case(rows, num_kv_heads, ctx, seed, sel_dtype=torch.int32):
    """Random rows over a pool of distinct slots; selections, empty rows and empty tails."""
    gen = torch.Generator().manual_seed(seed)
    num_pool = 3
    slots = num_pool * ctx + 5
    req_to_token = torch.randperm(slots, generator=gen)[: num_pool * ctx].view(num_pool, ctx)
    req_to_token = req_to_token.to(torch.int32)
    row_req = torch.randint(0, num_pool, (rows,), generator=gen)
    row_head = torch.randint(0, num_kv_heads, (rows,), generator=gen)
    sel_len = torch.randint(0, ctx + 1, (rows,), generator=gen)
    sel_len[torch.rand(rows, generator=gen) < 0.3] = 0
    sel_indptr = torch.zeros(rows + 1, dtype=sel_dtype)
    sel_indptr[1:] = torch.cumsum(sel_len, 0)
    sel_positions = torch.randint(0, ctx, (int(sel_len.sum()),), generator=gen, dtype=torch.int32)
    tail_start = torch.randint(0, ctx + 1, (rows,), generator=gen)
    tail_end = torch.randint(0, ctx + 1, (rows,), generator=gen)  # may be < start: empty
    args = (
        req_to_token,
        row_req,
        row_head,
        sel_indptr,
        sel_positions,
        tail_start.to(torch.int32),
        tail_end.to(torch.int32),
        kv_indptr_from_lengths(sel_len, tail_end - tail_start),
        num_kv_heads,
    )
    return args


def _loop_definition(req_to_token, row_req, row_head, sel_indptr, sel_positions, ts, te, _, heads):
    out = []
    for r in range(row_req.numel()):
        req, h = int(row_req[r]), int(row_head[r])
        positions = sel_positions[int(sel_indptr[r]) : int(sel_indptr[r + 1])].tolist()
        positions += list(range(int(ts[r]), int(te[r])))
        out += [int(req_to_token[req, p]) * heads + h for p in positions]
    return out


@pytest.mark.parametrize("block", [4, 256])
@pytest.mark.parametrize(
    ("rows", "num_kv_heads", "ctx"), [(1, 1, 1), (2, 4, 7), (7, 3, 13), (13, 8, 37), (5, 28, 64)]
)
def test_page_table_indices_match_ref_exactly(kernel_device, rows, num_kv_heads, ctx, block):
    args = _case(rows, num_kv_heads, ctx, seed=rows * 100 + ctx)
    ref = build_page_table_indices_ref(*args)
    assert ref.dtype == torch.int32
    assert ref.tolist() == _loop_definition(*args)
    dev_args = tuple(a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args)
    tri = build_page_table_indices(*dev_args, block=block)
    assert tri.dtype == torch.int32
    assert torch.equal(tri.cpu(), ref)


def test_page_table_indices_int64_indptr_and_out_buffer(kernel_device):
    args = _case(6, 2, 9, seed=3, sel_dtype=torch.int64)
    ref = build_page_table_indices_ref(*args)
    dev_args = tuple(a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args)
    buf = torch.full((ref.numel() + 4,), -1, dtype=torch.int32, device=kernel_device)
    out = build_page_table_indices(*dev_args, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[: ref.numel()].cpu(), ref)
    assert buf[ref.numel() :].tolist() == [-1] * 4


def test_page_table_indices_zero_rows(kernel_device):
    req_to_token = torch.zeros(1, 4, dtype=torch.int32, device=kernel_device)
    empty = torch.zeros(0, dtype=torch.int64, device=kernel_device)
    indptr = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    args = (req_to_token, empty, empty, indptr, empty.int(), empty.int(), empty.int(), indptr, 2)
    assert build_page_table_indices(*args).numel() == 0
    assert build_page_table_indices_ref(*args).numel() == 0


def test_page_table_indices_auto_on_cpu_is_ref():
    args = _case(4, 2, 8, seed=9)
    assert torch.equal(build_page_table_indices_auto(*args), build_page_table_indices_ref(*args))


def test_kv_indptr_from_lengths():
    indptr = kv_indptr_from_lengths(torch.tensor([2, 0, 3]), torch.tensor([1, -4, 0]))
    assert indptr.dtype == torch.int32 and indptr.tolist() == [0, 3, 3, 6]
    assert kv_indptr_from_lengths(torch.zeros(0), torch.zeros(0)).tolist() == [0]


def test_ref_rejects_inconsistent_indptr():
    args = list(_case(3, 2, 6, seed=1))
    args[7] = args[7] + torch.tensor([0, 1, 1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indptr: expected row lengths"):
        build_page_table_indices_ref(*args)


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, torch.zeros(4, dtype=torch.int32), r"req_to_token: expected a 2-D tensor \[P, ctx\]"),
        (0, torch.zeros(2, 4), "req_to_token: expected dtype int32 or int64, got float32"),
        (2, torch.zeros(2, dtype=torch.int64), r"row_head: expected shape \(3,\)"),
        (3, torch.zeros(3, dtype=torch.int32), r"sel_indptr: expected shape \(4,\)"),
        (7, torch.zeros(4, dtype=torch.float32), "kv_indptr: expected dtype int32 or int64"),
        (8, 0, "num_kv_heads: expected a positive int, got 0"),
    ],
)
def test_page_table_indices_validation(index, value, match):
    args = list(_case(3, 2, 6, seed=2))
    args[index] = value
    for fn in (build_page_table_indices_ref, build_page_table_indices):
        with pytest.raises(ValueError, match=match):
            fn(*args)
