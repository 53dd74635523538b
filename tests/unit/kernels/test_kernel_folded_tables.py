"""Folded-table kernels (Triton, interpreter mode on CPU) against their torch twins, and the
twins against the definition of a row (fixed values, chunks, post, tail) and of a chunk's score
(the Quest bound over the dequantised bounds of the bounded channels)."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from hybridkv_sglang.kernels import folded_tables
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
from hybridkv_sglang.kernels.host_staging import HostStaging
from hybridkv_sglang.policy import byte_cost
from tests.unit.kernels.folded_meta_testlib import (
    INT_OF,
    SCRATCH_PAD,
    RandomBatch,
    attach_host_tier,
    random_batch,
)

needs_interpreter = pytest.mark.skipif(
    not interpret_enabled(), reason="Triton runs on CPU only with TRITON_INTERPRET=1"
)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(time.time_ns() % 100_000)


def _retrieve(batch: RandomBatch, fn, layer: int, staging: HostStaging | None = None):
    """``chunk_top`` after ``fn``; its scratch, sized as the rows say with ``SCRATCH_PAD``
    slots on each side, is checked untouched outside the rows' ranges, and the block counters
    are zeros again."""
    device = batch.kmin.device
    scores = torch.full((batch.candidate_slots,), -7.0, dtype=torch.float32, device=device)
    ids = torch.full((batch.candidate_slots,), -7, dtype=torch.int32, device=device)
    top = torch.full((batch.top_slots,), -1, dtype=torch.int32, device=device)
    done = torch.zeros(batch.q.shape[0] + 2, dtype=torch.int32, device=device)
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
        done,
        max_chunks=int(batch.row_meta[..., NUM_CHUNKS].max()),
        max_selected=int(batch.row_meta[..., NUM_SEL].max()),
        staging=staging,
    )
    assert not bool(done.any())
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


LOW = {torch.uint8: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
"""The 16-bit dtype ``q * scale`` is rounded to, per bound dtype (float32 bounds: none)."""


def _exact_scores(batch: RandomBatch, r: int, n: int, start: int, param: int, rounded=True):
    """Float64 Quest bounds of a row's chunks, by the definition (``q * scale`` rounded to the
    bounds' 16-bit dtype unless ``rounded`` is False: the plain Quest bound), and each one's
    magnitude (what float32 rounding is relative to)."""
    offset, scale = batch.bound_affine[param]
    lo, hi = batch.kmin[start : start + n].double(), batch.kmax[start : start + n].double()
    q = batch.q[r].float()[:, batch.bound_channels[param].long()]
    qs = q * scale
    if rounded:
        qs = qs.to(LOW.get(batch.kmin.dtype, torch.float32))
    qs, q = qs.double(), q.double()
    terms = torch.maximum(qs[:, None, :] * lo, qs[:, None, :] * hi)
    scores = (terms.sum(-1) + (q @ offset.double())[:, None]).amax(0)
    magnitude = (qs.abs().amax(0) * torch.maximum(lo.abs(), hi.abs())).sum(-1).max()
    magnitude += (q.abs() @ offset.double().abs()).max()
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
    (torch.float16, 160, 3, None, False),
    (torch.float16, 160, 4, 7, False),
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


EXACT_CASES = [
    # (q and bound dtype, head dim, bound width (None: D), uint8 codes, context)
    (torch.float32, 128, None, False, 300),  # 32-chunk blocks: rows of 1 to 3 blocks
    (torch.bfloat16, 16, 7, False, 160),
    (torch.float16, 64, None, False, 160),
    (torch.bfloat16, 16, 16, True, 700),  # 128-chunk blocks: rows of 1 or 2 blocks
]


@needs_interpreter
@pytest.mark.parametrize("host_tier", [False, True], ids=["device", "host_tier"])
@pytest.mark.parametrize(("dtype", "dim", "width", "codes", "ctx"), EXACT_CASES)
def test_retrieval_kernel_equals_twins_bit_for_bit(dtype, dim, width, codes, ctx, host_tier):
    """On exact scores (short dyadic values) over mixed batches, three steps of fresh queries:
    the one launch equals the twin, with a host tier the twin composition (retrieval, then
    staging): ``chunk_top`` (staging slots), ``staged``, ``stage_age``, ``moves`` and every bit
    of the KV entries; its block counters are zeros after every call (``_retrieve``)."""
    gen = _seed()
    while True:  # a batch with a compact dynamic row (almost always the first)
        batch = random_batch(
            gen, dtype=dtype, dim=dim, width=width, codes=codes, ctx=ctx, layers=2, exact=True
        )
        staging = attach_host_tier(batch, gen) if host_tier else None
        if staging is None or staging.max_slots > 0:
            break
    staging_ref = copy.deepcopy(staging)
    selected = 0
    for _ in range(3):
        batch.q = (torch.randint(-16, 17, batch.q.shape, generator=gen) * 0.125).to(dtype)
        for layer in range(batch.num_layers):
            top = _retrieve(batch, chunk_retrieval, layer, staging)
            assert torch.equal(top, _retrieve(batch, chunk_retrieval_ref, layer, staging_ref))
            selected += sum(row[1] for row in _dynamic_rows(batch, layer))
            if staging is not None:
                _assert_same_staging(staging, staging_ref)
    assert selected > 0
    if staging is not None:
        moved, chosen = staging.moves.sum(0).tolist()
        assert 0 < moved < chosen  # misses copied, hits kept


@needs_interpreter
def test_retrieval_kernel_selects_by_scans_past_one_sort(monkeypatch):
    """Rows with more candidates than one sort ranks take the scan path (one pass per chunk,
    reading other blocks' candidates): the same chunks as the twin, exactly."""
    monkeypatch.setattr(folded_tables, "_SELECT_SORT", 16)
    batch = random_batch(_seed(), ctx=700, codes=True, width=16, layers=1, exact=True)
    blocks = -(-batch.row_meta[..., NUM_CHUNKS] // 128)  # 16 codes: 128-chunk blocks
    assert int((blocks * batch.row_meta[..., NUM_SEL]).max()) > 16
    top = _retrieve(batch, chunk_retrieval, 0)
    assert torch.equal(top, _retrieve(batch, chunk_retrieval_ref, 0))


def _assert_same_staging(got: HostStaging, want: HostStaging) -> None:
    for name in ("staged", "stage_age", "moves"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("k_entries", "v_entries"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.view(INT_OF[a.dtype]), b.view(INT_OF[b.dtype])), name


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


@pytest.mark.parametrize(
    ("dtype", "width", "codes"),
    [(torch.float32, None, False), (torch.bfloat16, None, False), (torch.float32, 5, True)],
)
def test_retrieval_twin_takes_the_best_chunks(dtype, width, codes):
    """The twin's chunks are the best by its definition (float64 check) and, after rounding
    ``q * scale`` to 16 bits, within that rounding (2**-8 of the magnitude) of the best by the
    plain Quest bound."""
    batch = random_batch(_seed(), dtype=dtype, width=width, codes=codes)
    for layer in range(batch.num_layers):
        top = _retrieve(batch, chunk_retrieval_ref, layer)
        for r, nsel, n, start, param, at in _dynamic_rows(batch, layer):
            picked = top[at : at + nsel].long()
            assert picked.unique().numel() == nsel
            for rounded, tolerance in ((True, 1e-6), (False, 2**-8)):
                scores, magnitude = _exact_scores(batch, r, n, start, param, rounded)
                floor = float(scores.topk(nsel).values.min())
                assert float(scores[picked].min()) >= floor - tolerance * magnitude


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
