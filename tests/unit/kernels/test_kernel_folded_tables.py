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
    CANDIDATE_BLOCK,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    TOP_START,
    chunk_retrieval,
    chunk_retrieval_ref,
)
from hybridkv_sglang.policy import byte_cost
from tests.unit.kernels.folded_meta_testlib import SCRATCH_PAD, RandomBatch, random_batch

needs_interpreter = pytest.mark.skipif(
    not interpret_enabled(), reason="Triton runs on CPU only with TRITON_INTERPRET=1"
)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(time.time_ns() % 100_000)


def _retrieve(batch: RandomBatch, fn, layer: int):
    """``chunk_top`` after ``fn``; its scratch, sized as the rows say with ``SCRATCH_PAD``
    slots on each side, is checked untouched outside the rows' ranges."""
    device = batch.kmin.device
    scores = torch.full((batch.candidate_slots,), -7.0, dtype=torch.float32, device=device)
    ids = torch.full((batch.candidate_slots,), -7, dtype=torch.int32, device=device)
    top = torch.full((batch.top_slots,), -1, dtype=torch.int32, device=device)
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
    for arena, untouched in ((scores, -7), (ids, -7), (top, -1)):
        assert bool((arena[:SCRATCH_PAD] == untouched).all())
        assert bool((arena[arena.numel() - SCRATCH_PAD :] == untouched).all())
    return top


def _dynamic_rows(batch: RandomBatch, layer: int):
    """``(row, nsel, num_chunks, bounds_start, param_row, top_start)`` of each dynamic row of
    ``layer``."""
    heads = batch.row_meta.shape[2]
    for r in range(batch.req_pool_indices.numel() * heads):
        b, h = divmod(r, heads)
        slot = int(batch.slot_of_row[int(batch.req_pool_indices[b])])
        if slot < 0:
            continue
        m = batch.row_meta[slot, layer, h]
        if int(m[NUM_SEL]) > 0:
            fields = (NUM_SEL, NUM_CHUNKS, BOUNDS_START, PARAM_ROW, TOP_START)
            yield r, *(int(m[f]) for f in fields)


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
    _check_retrieval(
        random_batch(_seed(), dtype=dtype, ctx=ctx, group=group, width=width, codes=codes)
    )


@needs_interpreter
def test_retrieval_kernel_matches_twin_selecting_more_than_a_block():
    """Rows selecting more than ``CANDIDATE_BLOCK`` chunks (each row its own ``NUM_SEL``, so
    its own candidate stride) over several blocks of chunks."""
    batch = random_batch(_seed(), ctx=900, width=5, codes=True, min_selected=CANDIDATE_BLOCK + 1)
    selected = batch.row_meta[..., NUM_SEL]
    assert int(selected.max()) > CANDIDATE_BLOCK and selected[selected > 0].unique().numel() > 1
    _check_retrieval(batch)


def test_kernel_blocks_are_the_cost_models():
    """The cost model charges candidates per block of its ``CANDIDATE_BLOCK`` chunks, the
    fewest the kernel's first pass blocks hold."""
    assert CANDIDATE_BLOCK == byte_cost.CANDIDATE_BLOCK


def _check_retrieval(batch: RandomBatch) -> None:
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval, layer)
        top_ref = _retrieve(batch, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param, at in _dynamic_rows(batch, layer):
            got, want = top[at : at + nsel].long(), top_ref[at : at + nsel].long()
            assert got.unique().numel() == nsel and bool((got >= 0).all() & (got < n).all())
            scores, magnitude = _exact_scores(batch, r, n, start, param)
            assert torch.allclose(
                scores[got].sort().values, scores[want].sort().values, rtol=0, atol=1e-5 * magnitude
            ), (layer, r)


@pytest.mark.parametrize(("width", "codes"), [(None, False), (5, True)])
def test_retrieval_twin_takes_the_best_chunks(width, codes):
    batch = random_batch(_seed(), width=width, codes=codes)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param, at in _dynamic_rows(batch, layer):
            scores, magnitude = _exact_scores(batch, r, n, start, param)
            picked = top[at : at + nsel].long()
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
