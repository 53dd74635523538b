"""The attention over the folded tables (Triton, interpreter mode on CPU) against its torch twin
on random mixed batches, the split offsets against theirs, and the twin's rows against the
definition of a row (fixed values, chunks, post, tail)."""

from __future__ import annotations

import time

import pytest
import torch

from hybridkv_sglang.kernels._common import interpret_enabled
from hybridkv_sglang.kernels.folded_attention import (
    folded_attention,
    folded_attention_ref,
    folded_entries_ref,
)
from hybridkv_sglang.kernels.folded_tables import (
    MAX_ROW_SPLITS,
    NUM_SEL,
    TOP_START,
    chunk_retrieval_ref,
    folded_lengths,
    folded_lengths_ref,
    row_split_cap,
    split_capacity,
)
from tests.unit.kernels.folded_meta_testlib import RandomBatch, random_batch

needs_interpreter = pytest.mark.skipif(
    not interpret_enabled(), reason="Triton runs on CPU only with TRITON_INTERPRET=1"
)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(time.time_ns() % 100_000)


def _rows(batch: RandomBatch) -> int:
    return batch.req_pool_indices.numel() * batch.row_meta.shape[2]


def _split_offsets(batch: RandomBatch, fn, cap: int, target: int):
    device = batch.row_meta.device
    indptr = torch.full((batch.num_layers, _rows(batch) + 3), -7, dtype=torch.int32, device=device)
    fn(
        batch.req_pool_indices,
        batch.seq_lens,
        batch.slot_of_row,
        batch.row_meta,
        indptr,
        chunk_size=batch.chunk_size,
        max_row_splits=cap,
        target_programs=target,
    )
    return indptr


def _top(batch: RandomBatch, layer: int):
    """``chunk_top`` of ``layer`` after the twin's retrieval."""
    top = torch.full((batch.top_slots,), -1, dtype=torch.int32)
    chunk_retrieval_ref(
        batch.q,
        batch.kmin,
        batch.kmax,
        batch.bound_channels,
        batch.bound_affine,
        torch.zeros(batch.candidate_slots),
        torch.zeros(batch.candidate_slots, dtype=torch.int32),
        top,
        batch.req_pool_indices,
        batch.slot_of_row,
        batch.row_meta,
        layer,
        torch.zeros(_rows(batch), dtype=torch.int32),
        max_chunks=1 << 12,
        max_selected=int(batch.row_meta[..., NUM_SEL].max()),
    )
    return top


@needs_interpreter
@pytest.mark.parametrize(("cap", "target"), [(4, 40), (16, 40), (64, 4000)])
def test_split_offsets_kernel_matches_twin(cap, target):
    """Every row takes 1..cap splits, all rows at most ``split_capacity``; the scratch slots
    past the rows are left alone."""
    batch = random_batch(_seed())
    got = _split_offsets(batch, folded_lengths, cap, target)
    want = _split_offsets(batch, folded_lengths_ref, cap, target)
    assert torch.equal(got, want)
    rows = _rows(batch)
    splits = want[:, 1 : rows + 1] - want[:, :rows]
    assert bool((splits >= 1).all()) and bool((splits <= cap).all())
    assert bool((want[:, rows] <= split_capacity(rows, target)).all())
    assert bool((want[:, rows + 1 :] == -7).all())


def test_row_split_cap_rises_when_few_rows_run():
    assert row_split_cap(4, 2112, 16) == MAX_ROW_SPLITS
    assert row_split_cap(128, 2112, 16) == 17
    assert row_split_cap(512, 2112, 16) == 16


def _attend(batch: RandomBatch, fn, layer: int, k, v, indptr, top, cap: int, target: int):
    rows = _rows(batch)
    capacity = split_capacity(rows, target)
    dim_v = v.shape[1]
    return fn(
        batch.q,
        k,
        v,
        batch.req_to_token,
        batch.req_pool_indices,
        batch.seq_lens,
        batch.slot_of_row,
        batch.row_meta,
        batch.fixed_values,
        top,
        indptr[layer],
        torch.full((capacity, batch.q.shape[1], dim_v), float("nan"), device=batch.q.device),
        torch.full((capacity, batch.q.shape[1]), float("nan"), device=batch.q.device),
        layer,
        sm_scale=batch.q.shape[2] ** -0.5,
        chunk_size=batch.chunk_size,
        max_row_splits=cap,
    )


@needs_interpreter
@pytest.mark.parametrize(
    ("dtype", "group", "cap", "target", "tol"),
    [
        (torch.float32, 3, 4, 40, 2e-5),  # most rows one split (written by stage 1)
        (torch.float32, 7, 64, 4000, 2e-5),  # most rows split, empty tail splits
        (torch.bfloat16, 3, 16, 400, 2e-2),
    ],
)
def test_attention_kernel_matches_twin(dtype, group, cap, target, tol):
    """Random mixed batches (dense, padding, in-place and compact static and dynamic rows):
    outputs agree to the dtype's precision, relative to the outputs' scale."""
    gen = _seed()
    batch = random_batch(gen, dtype=dtype, group=group, ctx=400)
    entries = int(batch.req_to_token.numel() * batch.row_meta.shape[2]) + 4096 * 2
    dim = batch.q.shape[2]
    k = torch.randn(entries, dim, generator=gen).to(dtype)
    v = torch.randn(entries, dim + 8, generator=gen).to(dtype)
    indptr = _split_offsets(batch, folded_lengths_ref, cap, target)
    splits = indptr[:, 1 : _rows(batch) + 1] - indptr[:, : _rows(batch)]
    assert int(splits.max()) > 1
    for layer in range(batch.num_layers):
        top = _top(batch, layer)
        got = _attend(batch, folded_attention, layer, k, v, indptr, top, cap, target).float()
        want = _attend(batch, folded_attention_ref, layer, k, v, indptr, top, cap, target).float()
        assert torch.isfinite(got).all()
        err = (got - want).abs().max() / want.abs().max()
        assert err < tol, (layer, float(err))


def test_twin_lists_each_row_by_definition():
    """Row by row, with plain Python over the metadata: fixed, chunks, post, tail."""
    batch = random_batch(_seed())
    heads, c = batch.row_meta.shape[2], batch.chunk_size
    for layer in range(batch.num_layers):
        top = _top(batch, layer)
        indptr, out = folded_entries_ref(
            batch.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            batch.slot_of_row,
            batch.row_meta,
            batch.fixed_values,
            top,
            layer,
            chunk_size=c,
        )
        for r in range(_rows(batch)):
            b, h = divmod(r, heads)
            pool, seq = int(batch.req_pool_indices[b]), int(batch.seq_lens[b])
            tokens = batch.req_to_token[pool].tolist()
            slot = int(batch.slot_of_row[pool])
            if slot < 0:
                want = [tokens[p] * heads + h for p in range(seq)]
            else:
                m = batch.row_meta[slot, layer, h, : TOP_START + 1].tolist()
                fixed = batch.fixed_values.tolist()
                start, pre, pstart, post, tail, nsel, _, first, _, cbase, direct, _, _, at = m
                want = [v if direct else tokens[v] * heads + h for v in fixed[start : start + pre]]
                for cid in top[at : at + nsel].tolist():
                    for i in range(c):
                        v = (first + cid) * c + i
                        want.append(fixed[cbase + v] if direct else tokens[v] * heads + h)
                want += fixed[pstart : pstart + post]
                want += [tokens[p] * heads + h for p in range(tail, seq)]
            got = out[int(indptr[r]) : int(indptr[r + 1])].tolist()
            assert got == want, (layer, r)
