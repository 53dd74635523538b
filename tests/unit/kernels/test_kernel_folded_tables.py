"""Folded-table kernels (Triton, interpreter mode on CPU) against their torch twins, and the
twins against the definition of a row (fixed values, chunks, post, tail) and of a chunk's score
(the Quest bound over the dequantised bounds of the bounded channels)."""

from __future__ import annotations

import time

import pytest
import torch

from hybridkv_sglang.kernels._common import interpret_enabled
from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    chunk_retrieval,
    chunk_retrieval_ref,
    fill_folded_indices,
    fill_folded_indices_ref,
    folded_lengths,
    folded_lengths_ref,
)
from tests.unit.kernels.folded_meta_testlib import RandomBatch, random_batch

needs_interpreter = pytest.mark.skipif(
    not interpret_enabled(), reason="Triton runs on CPU only with TRITON_INTERPRET=1"
)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(time.time_ns() % 100_000)


def _lengths(batch: RandomBatch, fn, max_splits: int = 16):
    rows = batch.req_pool_indices.numel() * batch.row_meta.shape[2]
    device = batch.row_meta.device
    indptr = torch.full((batch.num_layers, rows + 3), -7, dtype=torch.int32, device=device)
    splits = torch.full((batch.num_layers, rows + 2), -7, dtype=torch.int32, device=device)
    fn(
        batch.req_pool_indices,
        batch.seq_lens,
        batch.slot_of_row,
        batch.row_meta,
        indptr,
        splits,
        chunk_size=batch.chunk_size,
        max_kv_splits=max_splits,
        target_programs=40,
    )
    return indptr, splits


def _retrieve(batch: RandomBatch, fn, layer: int):
    device = batch.kmin.device
    scores = torch.zeros(batch.kmin.shape[0], dtype=torch.float32, device=device)
    ids = torch.zeros(batch.kmin.shape[0], dtype=torch.int32, device=device)
    top = torch.full((batch.kmin.shape[0],), -1, dtype=torch.int32, device=device)
    fn(
        batch.q,
        batch.kmin,
        batch.kmax,
        batch.bound_channels,
        batch.bound_affine,
        scores,
        ids,
        top,
        batch.req_pool_indices,
        batch.slot_of_row,
        batch.row_meta,
        layer,
        max_chunks=int(batch.row_meta[..., NUM_CHUNKS].max()),
        max_selected=int(batch.row_meta[..., NUM_SEL].max()),
    )
    return top


def _fill(batch: RandomBatch, fn, layer: int, indptr, top):
    size = int(indptr[layer, -3]) + 5
    indices = torch.full((size,), -1, dtype=torch.int64, device=batch.req_to_token.device)
    fn(
        batch.req_to_token,
        batch.req_pool_indices,
        batch.seq_lens,
        batch.slot_of_row,
        batch.row_meta,
        batch.fixed_values,
        top,
        indptr[layer],
        indices,
        layer,
        chunk_size=batch.chunk_size,
    )
    return indices


@needs_interpreter
def test_lengths_kernel_matches_twin():
    batch = random_batch(_seed())
    indptr, splits = _lengths(batch, folded_lengths)
    indptr_ref, splits_ref = _lengths(batch, folded_lengths_ref)
    assert torch.equal(indptr, indptr_ref)
    assert torch.equal(splits, splits_ref)
    assert bool((splits_ref[:, :-2] >= 1).all()) and bool((splits_ref <= 16).all())


def _dynamic_rows(batch: RandomBatch, layer: int):
    """``(row, nsel, num_chunks, bounds_start, param_row)`` of each dynamic row of ``layer``."""
    heads = batch.row_meta.shape[2]
    for r in range(batch.req_pool_indices.numel() * heads):
        b, h = divmod(r, heads)
        slot = int(batch.slot_of_row[int(batch.req_pool_indices[b])])
        if slot < 0:
            continue
        m = batch.row_meta[slot, layer, h]
        if int(m[NUM_SEL]) > 0:
            yield r, int(m[NUM_SEL]), int(m[NUM_CHUNKS]), int(m[BOUNDS_START]), int(m[PARAM_ROW])


def _exact_scores(batch: RandomBatch, r: int, n: int, start: int, param: int):
    """Float64 Quest bounds of a row's chunks, by the definition, and each one's magnitude
    (what float32 rounding is relative to)."""
    offset, scale = batch.bound_affine[param].double()
    lo = offset + scale * batch.kmin[start : start + n].double()
    hi = offset + scale * batch.kmax[start : start + n].double()
    q = batch.q[r].double()[:, batch.bound_channels[param].long()]
    scores = torch.maximum(q[:, None, :] * lo, q[:, None, :] * hi).sum(-1).amax(0)
    magnitude = (q.abs().amax(0) * torch.maximum(lo.abs(), hi.abs())).sum(-1).max()
    return scores, float(magnitude)


BOUND_CASES = [
    # (q dtype, ctx, group, bound width (None: D), uint8 codes)
    (torch.float32, 160, 3, None, False),
    (torch.bfloat16, 160, 3, None, False),
    (torch.float32, 900, 3, None, False),  # rows of up to ~220 chunks: several blocks
    (torch.float32, 160, 7, 5, False),
    (torch.bfloat16, 160, 7, None, True),
    (torch.float32, 900, 3, 5, True),
    (torch.bfloat16, 160, 1, 16, True),
]


@needs_interpreter
@pytest.mark.parametrize(("dtype", "ctx", "group", "width", "codes"), BOUND_CASES)
def test_retrieval_kernel_matches_twin(dtype, ctx, group, width, codes):
    """Kernel and twin pick chunks of the same exact scores (their float32 rounding differs,
    so only near-ties may swap), ``NUM_SEL`` distinct ones per row."""
    batch = random_batch(_seed(), dtype=dtype, ctx=ctx, group=group, width=width, codes=codes)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval, layer)
        top_ref = _retrieve(batch, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param in _dynamic_rows(batch, layer):
            got, want = top[start : start + nsel].long(), top_ref[start : start + nsel].long()
            assert got.unique().numel() == nsel and bool((got >= 0).all() & (got < n).all())
            scores, magnitude = _exact_scores(batch, r, n, start, param)
            assert torch.allclose(
                scores[got].sort().values, scores[want].sort().values, rtol=0, atol=1e-5 * magnitude
            ), (layer, r)


@needs_interpreter
def test_fill_kernel_matches_twin():
    batch = random_batch(_seed())
    indptr, _ = _lengths(batch, folded_lengths_ref)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval_ref, layer)
        triton_out = _fill(batch, fill_folded_indices, layer, indptr, top)
        assert torch.equal(triton_out, _fill(batch, fill_folded_indices_ref, layer, indptr, top))


def test_twins_list_each_row_by_definition():
    """Row by row, with plain Python over the metadata: fixed, chunks, post, tail."""
    batch = random_batch(_seed())
    heads, c = batch.row_meta.shape[2], batch.chunk_size
    indptr, _ = _lengths(batch, folded_lengths_ref)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval_ref, layer)
        out = _fill(batch, fill_folded_indices_ref, layer, indptr, top)
        for r in range(batch.req_pool_indices.numel() * heads):
            b, h = divmod(r, heads)
            pool, seq = int(batch.req_pool_indices[b]), int(batch.seq_lens[b])
            tokens = batch.req_to_token[pool].tolist()
            slot = int(batch.slot_of_row[pool])
            if slot < 0:
                want = [tokens[p] * heads + h for p in range(seq)]
            else:
                m = batch.row_meta[slot, layer, h].tolist()
                fixed = batch.fixed_values.tolist()
                start, pre, pstart, post, tail, nsel, _, first, bstart, cbase, direct, _ = m
                want = [v if direct else tokens[v] * heads + h for v in fixed[start : start + pre]]
                for cid in top[bstart : bstart + nsel].tolist():
                    for i in range(c):
                        v = (first + cid) * c + i
                        want.append(fixed[cbase + v] if direct else tokens[v] * heads + h)
                want += fixed[pstart : pstart + post]
                want += [tokens[p] * heads + h for p in range(tail, seq)]
            got = out[int(indptr[layer, r]) : int(indptr[layer, r + 1])].tolist()
            assert got == want, (layer, r)


@pytest.mark.parametrize(("width", "codes"), [(None, False), (5, True)])
def test_retrieval_twin_takes_the_best_chunks(width, codes):
    batch = random_batch(_seed(), width=width, codes=codes)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param in _dynamic_rows(batch, layer):
            scores, magnitude = _exact_scores(batch, r, n, start, param)
            picked = top[start : start + nsel].long()
            assert picked.unique().numel() == nsel
            floor = float(scores.topk(nsel).values.min())
            assert float(scores[picked].min()) >= floor - 1e-6 * magnitude


def test_retrieval_refuses_arenas_that_do_not_match():
    batch = random_batch(_seed(), width=5, codes=True)
    good = {"kmin": batch.kmin, "kmax": batch.kmax}
    bad = [
        ({"kmax": batch.kmax.float()}, "kmin/kmax"),
        ({"bound_channels": batch.bound_channels[:, :4]}, "bound_channels: expected"),
        ({"bound_channels": batch.bound_channels.long()}, "int32 and float32"),
        ({"bound_affine": batch.bound_affine[:, :1]}, "bound_affine: expected"),
    ]
    for change, message in bad:
        changed = RandomBatch(**{**vars(batch), **good, **change})
        with pytest.raises(ValueError, match=message):
            _retrieve(changed, chunk_retrieval_ref, 0)
    strided = RandomBatch(**{**vars(batch), "kmin": batch.kmin.T.contiguous().T})
    with pytest.raises(ValueError, match="unit last stride"):
        _retrieve(strided, chunk_retrieval, 0)
