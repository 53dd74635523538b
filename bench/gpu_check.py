"""One prepared device check: hybridkv's decode step on a GPU, checked and timed in one call.

1. compiled kernels against their torch twins on fresh random inputs: the folded-table kernels
   (split offsets, chunk retrieval over both chunk indexes: 8-bit codes over a few key channels
   and KV-dtype bounds over all of them), the folded attention (each row's entries derived
   from its record) against the torch reference attention, Quest ``chunk_topk``
   and ``gather_entries`` (compaction);
2. the whole hybridkv step (split offsets + 28 layers of retrieval and attention)
   captured in a CUDA graph and replayed on new inputs, equal to the same step run eagerly;
3. speed at Qwen2.5-VL-7B attention shapes (28 layers, 28 q / 4 kv heads, D 128, bf16), 10 %
   budget, batch 1/8/32 at 32K and 1/8 at 128K: a whole 28-layer attention step, each one CUDA
   graph, interleaved: stock SGLang Triton decode over the paged pool (what ``--attention-backend
   triton`` runs, :class:`StockTriton`), torch SDPA flash decoding over contiguous KV (the best
   dense kernel without FlashInfer), hybridkv's ``dense`` variant (stock's step as a graph of
   its own behind hybridkv's host work: must be within 2 % of stock) and hybridkv ``in_place``
   rows with the retrieval grid sized for the server's 128K context; device ms (CUDA events)
   and host ms, medians of repeats; bytes per step by category and TB/s. Dynamic heads' chunk
   index in 2 and 3: ``--bound-channels`` key channels at ``--bound-precision`` (default 8-bit
   codes over 16 channels);
4. the 7B linear part (every layer's projections and the lm_head) in a CUDA graph per batch
   size, and each shape's projected per-token ratio (attention + linear, dense over hybridkv);
5. one 32K request's compression at prefill end (``bench/compression_cost.py``) per storage,
   timed by stage with its host syncs counted, beside the request's dense prefill.

The device has torch and triton but no sglang: ``bench/device_sglang.py stage .device`` copies
SGLang's decode kernel files with tiny stand-ins beside the tree, and ``gpu_check.sh`` puts them
on ``PYTHONPATH``. Writes ``gpu_check_<device>.json`` (+ ``.png``) into ``--out-dir`` (default
``$OUT`` when set, else ``bench/results``). ``--dry-run`` runs the same code on CPU at small
shapes (kernels under ``TRITON_INTERPRET=1``, graphs eagerly) into a temporary folder.
Exit status 1 when a check fails.

    python bench/device_sglang.py stage .device && bash bench/gpu_check.sh   # on the device
    python bench/gpu_check.py --dry-run
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # Triton fixes interpreter mode when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import dataclasses
import functools
import json
import math
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compression_cost import Compressor, count_syncs, synthetic_prompt, time_stages
from model_shapes import DRY_MODEL, LinearModel, ModelShape, time_prefill
from synthetic_rows import synthetic_rows
from torch.nn.functional import scaled_dot_product_attention
from tqdm import tqdm

from hybridkv_sglang.attention.folded_decode import FoldedDecode, FoldedShape
from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_ref
from hybridkv_sglang.kernels.folded_attention import folded_attention, folded_attention_ref
from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    DIRECT,
    HOST_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    POST_LEN,
    PRE_LEN,
    STAGE_SLOTS,
    STAGE_START,
    TAIL_START,
    TOP_START,
    chunk_retrieval,
    chunk_retrieval_ref,
    folded_lengths,
    folded_lengths_ref,
    row_split_cap,
)
from hybridkv_sglang.kernels.gather_entries import gather_entries, gather_entries_ref
from hybridkv_sglang.kernels.sparse_decode import sparse_decode_reference
from hybridkv_sglang.policy.byte_cost import (
    CANDIDATE_BYTES,
    PARAM_BYTES_PER_CHANNEL,
    SELECTED_BYTES,
    scratch_slots,
)
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RequestRows

RESULTS = Path(__file__).resolve().parent / "results"
CROSSOVER_TABLE = (
    Path(__file__).resolve().parents[1] / "hybridkv_sglang/runtime/decode/crossover.json"
)
Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
GROUP = Q_HEADS // KV_HEADS
SCALE = HEAD_DIM**-0.5
CHUNK, TOP_K, BUDGET = 16, 8, 0.1
MAX_KV_SPLITS = 64
SGLANG_KV_SPLITS = 8
"""SGLang's default ``triton_attention_num_kv_splits`` (the stock ``triton`` backend's max)."""
SERVER_CONTEXT = 131072
"""The server's max context (Qwen2.5-VL-7B's 128K): the decode graph's retrieval grid covers it."""
PREFILL_TOKENS, PREFILL_TOKENS_DRY = 32768, 512
"""The request whose compression is timed beside its dense prefill."""
STAGING_SLACK = 1.0
"""Host-tier rows: staging slots beyond one step's chunks (the config default)."""
HOST_CHUNKS = 4096
"""Pinned host-tier chunks of the host-tier case (read through unified addressing)."""
HOST_SHAPES = [(8, 32768), (32, 32768)]
DEFAULT_MISS_RATE = 0.3
"""Share of a step's chunks copied from the host when no measured rate is committed."""
FULL_SHAPES = [(1, 32768), (8, 32768), (32, 32768), (1, 131072), (8, 131072)]
DRY_SHAPES = [(1, 256), (2, 256)]
BOUND_CHANNELS, BOUND_PRECISION = 16, "uint8"
"""The timed steps' chunk index unless the command line says otherwise."""
SCORE_GAP = 2e-3
"""Chosen chunks' exact scores, compiled vs twin, relative to the row's score magnitude: ties
aside, tf32 rounds the scaled query of 8-bit codes by 2^-11."""

Index = tuple[int, torch.dtype]
"""A chunk index: bound columns ``r`` and the bounds' dtype (uint8: codes)."""


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    norm = expected.norm()
    assert float(norm) > 0, "refusing to compare against an all-zero reference"
    return float((actual.double() - expected).norm() / norm)


# ------------------------------------------------------------------------------ 1. kernels
def check_kernels(device: str, dtype: torch.dtype, small: bool) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(int(time.time()) % 10_000)
    rows, c_max = (8, 40) if small else (32, 2048)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    out = []
    q = randn(rows, GROUP, HEAD_DIM).to(dtype)
    lo = randn(rows, c_max, HEAD_DIM)
    hi = (lo + torch.rand(rows, c_max, HEAD_DIM, generator=gen, device=device)).to(dtype)
    lo = lo.to(dtype)
    num = torch.randint(1, c_max + 1, (rows,), generator=gen, device=device, dtype=torch.int32)
    s_ref, _ = chunk_topk_ref(q, lo, hi, num, TOP_K)
    s_tri, t_tri = chunk_topk(q, lo, hi, num, TOP_K)
    finite = torch.isfinite(s_ref)
    # the chosen chunks carry the reference's top scores (ids may differ only between ties)
    valid = t_tri >= 0
    picked = torch.gather(s_ref, 1, t_tri.clamp(min=0).long())[valid]
    best = torch.topk(s_ref, TOP_K, dim=1).values[valid]
    out.append(
        {
            "check": "chunk_topk compiled vs ref",
            "rel_err": _rel_err(s_tri[finite], s_ref[finite]),
            "top_score_gap": float((best - picked).abs().max()),
            "same_padding": bool(torch.equal(valid.sum(1), num.clamp(max=TOP_K).long())),
        }
    )
    slots = 4096 if small else 1 << 18
    src_k, src_v = randn(slots * KV_HEADS, HEAD_DIM).to(dtype), randn(slots * KV_HEADS, 64)
    src_v = src_v.to(dtype)
    n = slots // 2
    src_idx = torch.randperm(slots * KV_HEADS, generator=gen, device=device)[:n]
    dst_idx = torch.randperm(slots * KV_HEADS, generator=gen, device=device)[:n]
    dst = [torch.full_like(t, float("nan")) for t in (src_k, src_v, src_k, src_v)]
    gather_entries_ref(src_k, src_v, dst[0], dst[1], src_idx, dst_idx)
    gather_entries(src_k, src_v, dst[2], dst[3], src_idx, dst_idx)
    out.append(
        {
            "check": "gather_entries compiled vs ref",
            "exact": bool(
                torch.equal(dst[0][dst_idx], dst[2][dst_idx])
                and torch.equal(dst[1][dst_idx], dst[3][dst_idx])
            ),
        }
    )
    return out


# ------------------------------------------------------------------------------ shared setup
class Step:
    """``batch`` compressed requests of ``context`` tokens over a dense-layout KV cache.

    Layer ``l``'s K is ``[B, H_kv, N, D]`` contiguous: dense SDPA reads it as is, and hybridkv
    reads its folded view, every prompt entry addressed directly (``DIRECT`` rows, as compact
    storage lays them out), so both systems read the same memory.
    """

    def __init__(
        self,
        batch: int,
        context: int,
        layers: int,
        device: str,
        dtype: torch.dtype,
        index: Index,
        miss_rate: float | None = None,
        kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        in_place: bool = False,
        max_context: int | None = None,
    ) -> None:
        """``miss_rate``: dynamic heads stage their chunks from a pinned host tier (compact
        storage), a ``miss_rate`` share of each step's chunks copied from it. ``kv``: another
        step's K and V to read (two steps over one cache fit a device that holds one).
        ``in_place``: rows hold positions read through ``req_to_token`` (the default storage),
        over the same memory seen as SGLang's paged pool ``[B * N, H_kv, D]`` (request ``b`` in
        slots ``[b N, (b + 1) N)``). ``max_context``: the retrieval grid is sized for it, as the
        server sizes it for its own max context (default: this context)."""
        gen = torch.Generator(device=device).manual_seed(batch * 7 + context)
        self.batch, self.context, self.layers = batch, context, layers
        shape = (batch, KV_HEADS, context, HEAD_DIM)
        if kv is None:
            kv = (
                [torch.randn(*shape, dtype=dtype, device=device) for _ in range(layers)],
                [torch.randn(*shape, dtype=dtype, device=device) for _ in range(layers)],
            )
        self.keys, self.values = kv
        self.q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
        rows = [
            synthetic_rows(
                context,
                layers=layers,
                heads=KV_HEADS,
                head_dim=HEAD_DIM,
                budget=BUDGET,
                chunk=CHUNK,
                top_k=TOP_K,
                gen=gen,
                device=device,
                dtype=index[1],
                entry_of=None
                if in_place
                else lambda h, pos, b=b: (b * KV_HEADS + h) * context + pos,
                bound_width=index[0],
            )
            for b in range(batch)
        ]
        self.host_tier: tuple[torch.Tensor, torch.Tensor] | None = None
        if miss_rate is not None:
            rows = [_on_host_tier(r, STAGING_SLACK) for r in rows]
        self.meta = DecodeMetadata(
            layers,
            KV_HEADS,
            index[0],
            max_requests=batch + 1,
            pool_rows=batch + 1,
            fixed_capacity=sum(r.fixed_values.numel() for r in rows),
            bound_capacity=sum(r.kmin.shape[0] for r in rows),
            param_capacity=sum(r.bound_channels.shape[0] for r in rows),
            candidate_capacity=sum(r.candidate_slots for r in rows),
            top_capacity=sum(r.top_slots for r in rows),
            bound_dtype=index[1],
            device=device,
            stage_capacity=sum(r.stage_slots for r in rows),
            host_id_capacity=sum(r.host_chunk_ids.numel() for r in rows),
        )
        for b, r in enumerate(rows):
            assert self.meta.add(b + 1, r)
        self.evict_top = self.evict_base = torch.zeros(0, dtype=torch.int64, device=device)
        if miss_rate is not None:
            self.host_tier = tuple(
                torch.randn(HOST_CHUNKS, CHUNK, HEAD_DIM, dtype=dtype).pin_memory()
                if device == "cuda"
                else torch.randn(HOST_CHUNKS, CHUNK, HEAD_DIM, dtype=dtype)
                for _ in range(2)
            )
            self.evict_top, self.evict_base = _evicted_slots(self.meta.row_meta, miss_rate)
        self.read_fraction = sum(r.prompt_entries for r in rows) / (batch * KV_HEADS * context)
        self.req_pool_indices = torch.arange(1, batch + 1, device=device)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int64, device=device)
        # pool row b + 1 (row 0 unused) holds request b's slots [b N, (b + 1) N)
        self.req_to_token = (
            torch.arange(-context, batch * context, dtype=torch.int32, device=device)
            .clamp(min=0)
            .view(batch + 1, context)
        )
        cores = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 8
        self.folded = FoldedDecode(
            self.meta,
            FoldedShape(
                num_layers=layers,
                num_kv_heads=KV_HEADS,
                group_size=GROUP,
                head_dim=HEAD_DIM,
                v_head_dim=HEAD_DIM,
                max_rows=batch * KV_HEADS,
                max_kv_splits=MAX_KV_SPLITS,
                chunk_size=CHUNK,
                max_chunks=(max_context or context) // CHUNK,
                max_selected=TOP_K,
                max_stage_slots=0 if miss_rate is None else math.ceil((1 + STAGING_SLACK) * TOP_K),
            ),
            use_triton=True,
            target_programs=16 * cores,
            device=device,
        )
        if self.host_tier is not None:
            self.folded.attach_host_tier(*self.host_tier)
        self.pool_rows_host = np.arange(1, batch + 1)

    def hybridkv(self) -> list[torch.Tensor]:
        """The hybridkv step: every layer's table and attention (what the graph holds); with a
        host tier, the measured share of last step's staged chunks is forgotten first, so that
        share moves again."""
        folded = self.folded
        if self.evict_top.numel():
            slots = self.meta.chunk_top[self.evict_top].to(torch.int64) + self.evict_base
            self.meta.staged.index_fill_(0, slots, -1)
        folded.begin_step(self.req_pool_indices, self.seq_lens)
        q_rows = self.q.view(-1, GROUP, HEAD_DIM)
        outs = []
        for layer in range(self.layers):
            folded.retrieve(layer, q_rows, self.keys[layer], self.values[layer])
            outs.append(
                folded.attend(
                    layer, q_rows, self.keys[layer], self.values[layer], self.req_to_token, SCALE
                )
            )
        return outs

    def retrieval(self) -> list[torch.Tensor]:
        """Breakdown: the row offsets and every layer's chunk retrieval (and staging) alone."""
        self.folded.begin_step(self.req_pool_indices, self.seq_lens)
        for layer in range(self.layers):
            q_rows = self.q.view(-1, GROUP, HEAD_DIM)
            self.folded.retrieve(layer, q_rows, self.keys[layer], self.values[layer])
        return []

    def attention(self) -> list[torch.Tensor]:
        """Breakdown: every layer's attention over the chunks already retrieved (each row's
        entries derived inside the kernel)."""
        q_rows = self.q.view(-1, GROUP, HEAD_DIM)
        return [
            self.folded.attend(
                layer, q_rows, self.keys[layer], self.values[layer], self.req_to_token, SCALE
            )
            for layer in range(self.layers)
        ]

    def dense(self) -> list[torch.Tensor]:
        """Dense flash-decoding SDPA over every layer's contiguous KV (the best dense kernel
        without FlashInfer; its index build is timed with it, see :class:`StockTriton`)."""
        q = self.q.unsqueeze(2)
        return [
            scaled_dot_product_attention(
                q, self.keys[layer], self.values[layer], scale=SCALE, enable_gqa=True
            )
            for layer in range(self.layers)
        ]

    def host_lookup(self) -> bool:
        """What the host does per step before either graph: the variant lookup."""
        return self.meta.batch_has_compressed(self.pool_rows_host)


def _on_host_tier(rows: RequestRows, slack: float) -> RequestRows:
    """``rows`` as compact storage lays a host-tier request out: each dynamic row stages its
    chunks into ``ceil((1 + slack) k)`` slots (its first chunks' entries stand in for them),
    from host chunks spread over :data:`HOST_CHUNKS` (timing needs the reads, not distinct
    data)."""
    meta = rows.meta.clone()
    dynamic = meta[..., NUM_SEL] > 0
    n_sel, chunks = meta[..., NUM_SEL], meta[..., NUM_CHUNKS]
    slots = torch.minimum(chunks, torch.ceil((1 + slack) * n_sel.float()).to(torch.int32))
    slots = torch.where(dynamic, slots, 0)
    meta[..., STAGE_SLOTS] = slots
    meta[..., STAGE_START] = (torch.cumsum(slots.reshape(-1), 0) - slots.reshape(-1)).view_as(slots)
    held = torch.where(dynamic, chunks, 0)
    meta[..., HOST_START] = (torch.cumsum(held.reshape(-1), 0) - held.reshape(-1)).view_as(held)
    total = int(held.sum())
    host_ids = torch.arange(total, dtype=torch.int32, device=rows.fixed_values.device) % HOST_CHUNKS
    return dataclasses.replace(rows, meta=meta, host_chunk_ids=host_ids)


def _evicted_slots(row_meta: torch.Tensor, miss_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the staging slots to forget each step are: ``chunk_top`` positions of the first
    ``ceil(miss_rate n)`` selections of every host-tier row (after staging they hold the slot
    each chunk was read from) and the row's ``STAGE_START``. The queries are fixed, so the same
    chunks are selected next step and exactly those miss."""
    m = row_meta.reshape(-1, row_meta.shape[-1]).to(torch.int64).cpu()
    m = m[m[:, STAGE_SLOTS] > 0]
    count = torch.ceil(miss_rate * m[:, NUM_SEL].double()).to(torch.int64)
    offsets = torch.arange(int(count.sum())) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count
    )
    tops = torch.repeat_interleave(m[:, TOP_START], count) + offsets
    bases = torch.repeat_interleave(m[:, STAGE_START], count)
    return tops.to(row_meta.device), bases.to(row_meta.device)


class Runner:
    """A step as a CUDA graph (on CUDA) or eagerly (dry run)."""

    def __init__(self, step: Callable[[], list[torch.Tensor]], device: str) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outs: list[torch.Tensor] = []
        if device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outs = step()
            torch.cuda.synchronize()

    def __call__(self) -> list[torch.Tensor]:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.outs


def time_runners(
    runs: list[tuple[Runner, Callable[[], Any]]], device: str, repeats: int
) -> list[tuple[float, float]]:
    """Median device ms and host ms of ``host(); runner()`` per step for each run, the runs
    interleaved repeat by repeat (after warm-up replays) so clocks and caches treat them alike."""
    for runner, host in runs * 3:
        host()
        runner()
    device_ms: list[list[float]] = [[] for _ in runs]
    host_ms: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, (runner, host) in enumerate(runs):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start.record()
                host()
                runner()
                end.record()
                host_ms[i].append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                device_ms[i].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                host()
                runner()
                host_ms[i].append((time.perf_counter() - t0) * 1e3)
                device_ms[i].append(host_ms[i][-1])
    return [
        (statistics.median(d), statistics.median(h))
        for d, h in zip(device_ms, host_ms, strict=True)
    ]


# ------------------------------------------------------------------------------ 2. tables, graph
def check_retrieval(step: Step, context: int) -> dict[str, Any]:
    """Layer 0's chunk retrieval, compiled vs twin: the chunks each chose, scored exactly (float64,
    by the definition), must carry the same scores (ids may differ between near-ties)."""
    meta = step.meta
    q_rows = step.q.view(-1, GROUP, HEAD_DIM)
    done = torch.zeros(step.batch * KV_HEADS, dtype=torch.int32, device=q_rows.device)
    args = (step.req_pool_indices, meta.slot_of_row, meta.row_meta, 0, done)
    tops = []
    for fn in (chunk_retrieval, chunk_retrieval_ref):
        top = torch.full_like(meta.chunk_top, -1)
        fn(
            q_rows, meta.kmin, meta.kmax, meta.bound_channels, meta.bound_affine,
            meta.chunk_scores, meta.chunk_ids, top, *args, max_chunks=context // CHUNK,
            max_selected=TOP_K,
        )  # fmt: skip
        tops.append(top)
    gap = 0.0
    q = q_rows.double()
    for r in range(step.batch * KV_HEADS):
        slot = int(meta.slot_of_row[r // KV_HEADS + 1])
        record = meta.row_meta[slot, 0, r % KV_HEADS]
        nsel, n, start, param, at = (
            int(record[f]) for f in (NUM_SEL, NUM_CHUNKS, BOUNDS_START, PARAM_ROW, TOP_START)
        )
        if nsel == 0:
            continue
        offset, scale = meta.bound_affine[param].double()
        lo = offset + scale * meta.kmin[start : start + n].double()
        hi = offset + scale * meta.kmax[start : start + n].double()
        qr = q[r][:, meta.bound_channels[param].long()]
        scores = (qr.clamp(min=0) @ hi.T + qr.clamp(max=0) @ lo.T).amax(0)
        magnitude = (qr.abs().amax(0) * torch.maximum(lo.abs(), hi.abs())).sum(-1).max()
        chosen = [scores[t[at : at + nsel].long()].sort().values for t in tops]
        gap = max(gap, float((chosen[0] - chosen[1]).abs().max() / magnitude))
    width, bound_dtype = meta.kmin.shape[1], meta.kmin.dtype
    return {
        "check": f"chunk_retrieval compiled vs ref, {width} channels of {bound_dtype} bounds",
        "same_chunks_fraction": float((tops[0] == tops[1]).float().mean()),
        "selected_score_gap": gap,
    }


def check_tables(
    device: str, dtype: torch.dtype, small: bool, index: Index
) -> list[dict[str, Any]]:
    """Compiled table kernels and folded attention against the twins (retrieval over ``index``
    and over plain bounds); the captured step on new inputs against the eager step."""
    batch, context = (2, 256) if small else (4, 8192)
    step = Step(batch, context, 2 if small else 4, device, dtype, index)
    meta, folded = step.meta, step.folded
    layers = step.layers
    rows = batch * KV_HEADS
    out: list[dict[str, Any]] = []
    args = (step.req_pool_indices, step.seq_lens, meta.slot_of_row, meta.row_meta)
    cap = row_split_cap(rows, folded.target_programs, MAX_KV_SPLITS)
    indptr = [torch.zeros(layers, rows + 1, dtype=torch.int32, device=device) for _ in range(2)]
    for fn, ip in zip((folded_lengths, folded_lengths_ref), indptr, strict=True):
        fn(*args, ip, chunk_size=CHUNK, max_row_splits=cap, target_programs=folded.target_programs)
    out.append({"check": "folded_lengths compiled vs ref", "exact": bool(torch.equal(*indptr))})
    q_rows = step.q.view(-1, GROUP, HEAD_DIM)
    for probe_index in dict.fromkeys([index, (HEAD_DIM, dtype)]):
        probe = (
            step if probe_index == index else Step(batch, context, 1, device, dtype, probe_index)
        )
        out.append(check_retrieval(probe, context))
    top = torch.full_like(meta.chunk_top, -1)
    chunk_retrieval_ref(
        q_rows, meta.kmin, meta.kmax, meta.bound_channels, meta.bound_affine, meta.chunk_scores,
        meta.chunk_ids, top, step.req_pool_indices, *args[2:], 0, folded.retrieval_done,
        max_chunks=context // CHUNK, max_selected=TOP_K,
    )  # fmt: skip
    attention_args = (
        q_rows, step.keys[0].view(-1, HEAD_DIM), step.values[0].view(-1, HEAD_DIM),
        step.req_to_token, *args, meta.fixed_values, top, indptr[1][0], folded.partial_out,
        folded.partial_lse, 0,
    )  # fmt: skip
    attended = [
        fn(*attention_args, sm_scale=SCALE, chunk_size=CHUNK, max_row_splits=cap)
        for fn in (folded_attention, folded_attention_ref)
    ]
    out.append({"check": "folded_attention compiled vs ref", "rel_err": _rel_err(*attended)})
    eager = step.hybridkv()
    reference = []
    for layer in range(layers):
        folded.retrieve(layer, q_rows, step.keys[layer], step.values[layer])
        folded.attend(layer, q_rows, step.keys[layer], step.values[layer], step.req_to_token, SCALE)
        entries = folded.row_entries(layer, step.req_to_token)
        reference.append(
            sparse_decode_reference(
                q_rows,
                step.keys[layer].view(-1, HEAD_DIM),
                step.values[layer].view(-1, HEAD_DIM),
                *entries,
                SCALE,
            )
        )
    out.append(
        {
            "check": "hybridkv step (retrieval and folded attention) vs torch reference",
            "rel_err": max(_rel_err(e, r) for e, r in zip(eager, reference, strict=True)),
        }
    )
    runner = Runner(step.hybridkv, device)
    step.q.copy_(torch.randn_like(step.q))
    replayed = [t.clone() for t in runner()]
    again = step.hybridkv()
    out.append(
        {
            "check": "captured hybridkv step on new queries vs the eager step",
            "graph_captured": runner.graph is not None,
            "rel_err_graph": max(_rel_err(a, b) for a, b in zip(replayed, again, strict=True)),
        }
    )
    return out


# ------------------------------------------------------------------------------ 3. speed
class StockTriton:
    """What ``--attention-backend triton`` runs per decode step, over the step's memory seen as
    SGLang's paged pool ``[B * N, H_kv, D]``: before the graph (``init_forward_metadata_out_graph``)
    ``kv_indptr`` from ``seq_lens``, ``kv_indices`` from each request's ``req_to_token`` row
    (uniform lengths: one gather, the bytes of SGLang's index kernel) and the split counts
    (``get_num_kv_splits_triton``, SGLang's default 8 max splits; on a device without a core
    count every request takes the max, as SGLang does); in the graph every layer's
    ``decode_attention_fwd`` with kv heads not folded."""

    def __init__(self, step: Step, device: str) -> None:
        b, n = step.batch, step.context
        self.step = step
        self.kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(b * n, dtype=torch.int64, device=device)
        self.num_kv_splits = torch.full((b,), SGLANG_KV_SPLITS, dtype=torch.int32, device=device)
        scratch = (b, Q_HEADS, SGLANG_KV_SPLITS)
        self.attn_logits = torch.empty(*scratch, HEAD_DIM, dtype=torch.float32, device=device)
        self.attn_lse = torch.empty(*scratch, dtype=torch.float32, device=device)
        self.cores = (
            torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0
        )
        self.pool = [
            (k.view(-1, KV_HEADS, HEAD_DIM), v.view(-1, KV_HEADS, HEAD_DIM))
            for k, v in zip(step.keys, step.values, strict=True)
        ]
        self.metadata()

    def metadata(self) -> None:
        """The out-of-graph work before each replay."""
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

        s = self.step
        self.kv_indptr[1:] = torch.cumsum(s.seq_lens, dim=0)
        self.kv_indices.copy_(s.req_to_token[s.req_pool_indices, : s.context].reshape(-1))
        if self.cores <= 0:
            self.num_kv_splits.fill_(SGLANG_KV_SPLITS)
            return
        get_num_kv_splits_triton[(1,)](
            self.num_kv_splits, s.seq_lens, s.batch, 1, Q_HEADS, KV_HEADS, SGLANG_KV_SPLITS,
            self.cores, MAX_NUM_SEQ=max(256, triton_next_power_of_2(s.batch)),
        )  # fmt: skip

    def layers(self) -> list[torch.Tensor]:
        """The graph: every layer's decode attention over the paged pool."""
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

        outs = []
        for k, v in self.pool:
            out = torch.empty_like(self.step.q)
            decode_attention_fwd(
                self.step.q, k, v, out, self.kv_indptr, self.kv_indices, self.attn_logits,
                self.attn_lse, self.num_kv_splits, SGLANG_KV_SPLITS, SCALE, 1.0, 1.0,
            )  # fmt: skip
            outs.append(out)
        return outs

    def dense_variant_host(self) -> None:
        """hybridkv's ``dense`` variant before its replay: the batch's variant lookup in the
        host mirror, ``_begin_forward``'s release check, then the wrapped backend's own
        out-of-graph work (the graph itself is stock's, captured on its own)."""
        self.step.host_lookup()
        self.step.meta.apply_releases()
        self.metadata()


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def step_bytes(step: Step, stock: StockTriton, elt: int) -> dict[str, dict[str, int]]:
    """Bytes each system moves per step, by category, counted from its tables and buffers (a
    model of the kernels' traffic, not a profiler's reading): KV entries read, retrieval
    metadata (chunk bounds, their parameters, candidate and selected scratch written and
    read), row metadata and indices (records, kept positions and ``req_to_token`` read by the
    attention as it derives each row's entries, split offsets; stock: its ``kv_indices``
    written and read, offsets) and split scratch (partial outputs of split rows written and
    read)."""
    b, n, layers = step.batch, step.context, step.layers
    entry = 2 * HEAD_DIM * elt  # K and V of one (token, kv head)
    splits = stock.num_kv_splits.long().sum().item()
    stock_bytes = {
        "kv_entries": layers * b * n * KV_HEADS * entry,
        "indices": b * n * (4 + 8) + layers * KV_HEADS * b * n * 8 + layers * (b + 1) * 4,
        "split_scratch": layers * splits * Q_HEADS * (HEAD_DIM + 1) * 4 * 2,
    }
    slots = step.meta.slot_of_row[step.req_pool_indices].long()
    m = step.meta.row_meta[slots].long().cpu()  # [B, L, H, NF]
    entries = m[..., PRE_LEN] + m[..., NUM_SEL] * CHUNK + m[..., POST_LEN] + n - m[..., TAIL_START]
    total_entries = int(entries.sum())
    dynamic = m[..., NUM_SEL] > 0
    width = step.meta.kmin.shape[1]
    candidates, tops = scratch_slots(m[..., NUM_CHUNKS], m[..., NUM_SEL])
    retrieval = (
        2 * int(m[..., NUM_CHUNKS][dynamic].sum()) * width * step.meta.kmin.element_size()
        + int(dynamic.sum()) * width * PARAM_BYTES_PER_CHANNEL
        + 2 * int(candidates.sum()) * CANDIDATE_BYTES
        + 2 * int(tops.sum()) * SELECTED_BYTES
    )
    through_rows = int((m[..., PRE_LEN] + m[..., POST_LEN]).sum())  # fixed values read
    direct = bool(m[..., DIRECT].any())
    rows = b * KV_HEADS
    splits = step.folded.split_indptr[:, 1 : rows + 1] - step.folded.split_indptr[:, :rows]
    split_rows = int(splits[splits > 1].sum())  # rows of one split write no scratch
    hybridkv_bytes = {
        "retrieval_metadata": retrieval,
        "kv_entries": total_entries * entry,
        "row_metadata_indices": layers * rows * NF * 4
        + through_rows * 4
        + (0 if direct else total_entries * 4)
        + layers * (rows + 1) * 4,
        "split_scratch": split_rows * GROUP * (HEAD_DIM + 1) * 4 * 2,
    }
    sdpa = {"kv_entries": stock_bytes["kv_entries"]}
    return {"stock_triton": stock_bytes, "sdpa": sdpa, "hybridkv": hybridkv_bytes}


def speed(
    device: str, dtype: torch.dtype, small: bool, repeats: int, index: Index
) -> list[dict[str, Any]]:
    """Per shape: stock Triton (twice: stock's own graph, and hybridkv's ``dense`` variant, a
    graph of its own behind hybridkv's host work), SDPA and hybridkv ``in_place`` rows with the
    server's retrieval grid, interleaved; then hybridkv's breakdown."""
    shapes = DRY_SHAPES if small else FULL_SHAPES
    layers = 2 if small else 28
    server_context = max(context for _, context in shapes) if small else SERVER_CONTEXT
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    for batch, context in tqdm(shapes, desc="speed"):
        step = Step(
            batch, context, layers, device, dtype, index, in_place=True, max_context=server_context
        )
        stock = StockTriton(step, device)
        sdpa, sparse = Runner(step.dense, device), Runner(step.hybridkv, device)
        stock_graph, variant_graph = Runner(stock.layers, device), Runner(stock.layers, device)
        timed = time_runners(
            [
                (sdpa, stock.metadata),
                (stock_graph, stock.metadata),
                (variant_graph, stock.dense_variant_host),
                (sparse, step.host_lookup),
            ],
            device,
            repeats,
        )
        (sdpa_ms, sdpa_host), (stock_ms, stock_host), (variant_ms, variant_host) = timed[:3]
        sparse_ms, sparse_host = timed[3]
        parts = [Runner(fn, device) for fn in (step.retrieval, step.attention)]
        breakdown = time_runners([(p, lambda: None) for p in parts], device, repeats)
        moved = step_bytes(step, stock, elt)
        times = {"stock_triton": stock_ms, "sdpa": sdpa_ms, "hybridkv": sparse_ms}
        rows.append(
            {
                "batch": batch,
                "context": context,
                "layers": layers,
                "budget": BUDGET,
                "placement": "in_place",
                "max_chunks": server_context // CHUNK,
                "read_fraction": step.read_fraction,
                "stock_triton_ms": stock_ms,
                "stock_triton_host_ms": stock_host,
                "stock_kv_splits": stock.num_kv_splits.tolist(),
                "dense_sdpa_ms": sdpa_ms,
                "dense_sdpa_host_ms": sdpa_host,
                "dense_variant_ms": variant_ms,
                "dense_variant_host_ms": variant_host,
                "dense_variant_overhead": variant_ms / stock_ms - 1,
                "hybridkv_ms": sparse_ms,
                "hybridkv_host_ms": sparse_host,
                "retrieval_ms": breakdown[0][0],
                "attention_ms": breakdown[1][0],
                "speedup": stock_ms / sparse_ms,
                "speedup_vs_sdpa": sdpa_ms / sparse_ms,
                "bytes_per_step": moved,
                "tb_per_s": {
                    system: sum(moved[system].values()) / (times[system] * 1e-3) / 1e12
                    for system in moved
                },
                "table_bytes": step.folded.table_bytes,
                "graph_captured": sparse.graph is not None,
            }
        )
        del step, stock, sdpa, sparse, stock_graph, variant_graph, parts
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def linear_part(
    device: str, dtype: torch.dtype, small: bool, repeats: int, batches: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A 7B decode step's linear part in one CUDA graph per batch size, and a 32K prefill's
    dense work (see ``bench/model_shapes.py``)."""
    shape = DRY_MODEL if small else ModelShape()
    model = LinearModel(shape, device, dtype)
    rows = []
    for batch in tqdm(batches, desc="linear part"):
        x = torch.randn(batch, shape.hidden, device=device).to(dtype)
        runner = Runner(functools.partial(model.decode_linear, x), device)
        ((ms, _),) = time_runners([(runner, lambda: None)], device, repeats)
        rows.append(
            {
                "batch": batch,
                "linear_ms": ms,
                "weight_bytes": model.bytes,
                "tb_per_s": model.bytes / (ms * 1e-3) / 1e12,
            }
        )
        del runner
    prefill = time_prefill(model, PREFILL_TOKENS_DRY if small else PREFILL_TOKENS, device, 3)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, prefill


def project(rows: list[dict[str, Any]], linear: list[dict[str, Any]]) -> None:
    """Per-token time of attention plus the linear part at each shape, stock (Triton and SDPA)
    over hybridkv, written into the speed rows."""
    by_batch = {r["batch"]: r["linear_ms"] for r in linear}
    for r in rows:
        lin = by_batch[r["batch"]]
        r["linear_ms"] = lin
        r["projected_ratio"] = (r["stock_triton_ms"] + lin) / (r["hybridkv_ms"] + lin)
        r["projected_ratio_vs_sdpa"] = (r["dense_sdpa_ms"] + lin) / (r["hybridkv_ms"] + lin)


def compression_cost(
    device: str, dtype: torch.dtype, small: bool, repeats: int, prefill: dict[str, Any]
) -> list[dict[str, Any]]:
    """One request's compression at its prefill end (``bench/compression_cost.py``, the
    project's policy and storage code) per storage, its host syncs counted (dispatch mode; on
    CUDA also the syncs CUDA's sync-debug mode reports), beside the request's dense prefill."""
    shape = DRY_MODEL if small else ModelShape()
    tokens = PREFILL_TOKENS_DRY if small else PREFILL_TOKENS
    prompt = synthetic_prompt(
        tokens, shape.layers, shape.kv_heads, shape.q_heads, shape.head_dim, device, dtype
    )
    rows = []
    for storage in tqdm(("in_place", "compact"), desc="compression"):
        compressor = Compressor.setup(prompt, storage)
        stages = time_stages(compressor, repeats)
        counter = count_syncs(compressor)
        cuda_syncs = None
        if device == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    compressor.run()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
        rows.append(
            {
                "storage": storage,
                "prompt_len": tokens,
                "layers": shape.layers,
                **stages,
                "host_syncs": counter.total,
                "host_syncs_by_op": dict(counter.counts),
                "cuda_sync_warnings": cuda_syncs,
                "prefill_ms": prefill["prefill_ms"],
                "share_of_prefill": stages["total_ms"] / prefill["prefill_ms"],
            }
        )
        del compressor
    return rows


def measured_miss_rate() -> float:
    """Steady-state share of a step's chunks copied from the host at 10 % with the default
    staging slack, as ``bench/host_tier_traffic.py`` measured it (else a default)."""
    path = RESULTS / "host_tier_traffic.json"
    if not path.exists():
        return DEFAULT_MISS_RATE
    for row in json.loads(path.read_text())["rows"]:
        if row["default"] and row["budget"] == BUDGET and row["mean_selected_chunks_per_step"]:
            return row["mean_moved_chunks_per_step"] / row["mean_selected_chunks_per_step"]
    return DEFAULT_MISS_RATE


def host_tier(
    device: str, dtype: torch.dtype, small: bool, repeats: int, index: Index, miss_rate: float
) -> list[dict[str, Any]]:
    """``compact`` requests whose dynamic heads stage ``miss_rate`` of their chunks from a pinned
    host tier each step: captured in a CUDA graph (host tier included), equal to the eager
    step, and timed beside the same requests in place and beside dense."""
    shapes = DRY_SHAPES[-1:] if small else HOST_SHAPES
    layers = 1 if small else 28
    rows = []
    for batch, context in tqdm(shapes, desc="host tier"):
        in_place = Step(batch, context, layers, device, dtype, index)
        kv = (in_place.keys, in_place.values)
        staged = Step(batch, context, layers, device, dtype, index, miss_rate=miss_rate, kv=kv)
        staged.hybridkv()  # the first step fills every slot
        eager = [t.clone() for t in staged.hybridkv()]
        runner = Runner(staged.hybridkv, device)
        replayed = [t.clone() for t in runner()]
        moves_before = staged.meta.moves.sum(dim=0)
        steps = 1 if small else 3
        for _ in range(steps):
            runner()
        moved, selected = ((staged.meta.moves.sum(dim=0) - moves_before) / steps).tolist()
        dense, sparse = Runner(in_place.dense, device), Runner(in_place.hybridkv, device)
        timed = time_runners(
            [(dense, lambda: None), (sparse, in_place.host_lookup), (runner, staged.host_lookup)],
            device,
            repeats,
        )
        (dense_ms, _), (in_place_ms, _), (host_ms, host_host_ms) = timed
        chunk_bytes = 2 * CHUNK * HEAD_DIM * torch.empty((), dtype=dtype).element_size()
        rows.append(
            {
                "batch": batch,
                "context": context,
                "layers": layers,
                "budget": BUDGET,
                "staging_slack": STAGING_SLACK,
                "miss_rate": miss_rate,
                "moved_chunks_per_step": moved,
                "selected_chunks_per_step": selected,
                "h2d_bytes_per_step": moved * chunk_bytes,
                "dense_ms": dense_ms,
                "in_place_ms": in_place_ms,
                "host_tier_ms": host_ms,
                "host_tier_host_ms": host_host_ms,
                "host_tier_over_in_place": host_ms / in_place_ms,
                "speedup": dense_ms / host_ms,
                "graph_captured": runner.graph is not None,
                "rel_err_graph": max(_rel_err(a, b) for a, b in zip(replayed, eager, strict=True)),
            }
        )
        del in_place, staged, runner, dense, sparse
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def crossover_points(rows: list[dict[str, Any]]) -> list[list[int]]:
    """Per context, the smallest measured batch whose hybridkv step beat dense (batches between
    two measured ones count as the larger: the runtime decodes dense below it)."""
    points = []
    for context in sorted({r["context"] for r in rows}):
        runs = sorted((r["batch"], r["speedup"]) for r in rows if r["context"] == context)
        faster = [batch for batch, speedup in runs if speedup >= 1.0]
        points.append([context, faster[0] if faster else runs[-1][0] + 1])
    return points


def update_crossover(results: Path) -> None:
    """Merge a device check's crossover into the runtime's table (``crossover.json``)."""
    payload = json.loads(results.read_text())
    if payload.get("dry_run"):
        raise SystemExit(f"{results}: a dry run measures no device")
    table = json.loads(CROSSOVER_TABLE.read_text())
    table[payload["device"]] = crossover_points(payload["speed"])
    CROSSOVER_TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{payload['device']}: {table[payload['device']]} -> {CROSSOVER_TABLE}")


SPEEDUP_GOALS = {(8, 32768): 3.0, (32, 32768): 5.0, (1, 131072): 1.5}
PROJECTED_GOALS = {(8, 32768): 1.3, (32, 32768): 2.0}
DENSE_VARIANT_COMPARES = (
    "stock: SGLang's Triton decode step (out-of-graph kv_indptr / kv_indices / split counts, "
    "then one CUDA graph of every layer's decode_attention_fwd over the paged pool); dense "
    "variant: the same step captured as a graph of its own (SGLang captures one per variant), "
    "replayed behind hybridkv's host work for a batch with nothing compressed (the variant "
    "lookup in the host mirror and the release check). Both time the host work and the replay "
    "in one CUDA-event window, interleaved."
)


def _goal_key(name: str, value: float) -> str:
    return f"{name}_ge_{str(value).replace('.', '_').removesuffix('_0')}"


def goals(
    rows: list[dict[str, Any]],
    host_rows: list[dict[str, Any]],
    compression: list[dict[str, Any]],
) -> dict[str, bool | None]:
    """The issues' targets, table build included; a speed-up counts against the faster of
    the two dense references. ``None``: the shape was not measured (the dry run)."""
    out: dict[str, bool | None] = {}
    for r in host_rows:
        at = f"batch {r['batch']}, {r['context']}"
        out[f"compact host-tier step <= 1.3x in place at {at}"] = (
            r["host_tier_over_in_place"] <= 1.3
        )
        if r["batch"] == 32:
            out[f"compact host-tier step >= 2x dense at {at}"] = r["speedup"] >= 2.0
    at = {(r["batch"], r["context"]): r for r in rows}
    out["dense_batch_within_2pct"] = all(abs(r["dense_variant_overhead"]) <= 0.02 for r in rows)
    out["ge_1x_stock_triton_every_shape"] = all(r["speedup"] >= 1.0 for r in rows)
    out["ge_1x_sdpa_every_shape"] = all(r["speedup_vs_sdpa"] >= 1.0 for r in rows)
    for (batch, context), want in SPEEDUP_GOALS.items():
        r = at.get((batch, context))
        key = _goal_key(f"speedup_b{batch}_{context // 1024}k", want)
        out[key] = None if r is None else min(r["speedup"], r["speedup_vs_sdpa"]) >= want
    for (batch, context), want in PROJECTED_GOALS.items():
        r = at.get((batch, context))
        key = _goal_key(f"projected_ratio_b{batch}", want)
        best = None if r is None else min(r["projected_ratio"], r["projected_ratio_vs_sdpa"])
        out[key] = None if best is None else best >= want
    out["compression_le_5pct_of_prefill"] = all(r["share_of_prefill"] <= 0.05 for r in compression)
    return out


def check_stock(device: str, dtype: torch.dtype, small: bool) -> dict[str, Any]:
    """Stock's Triton step over the paged pool against SDPA over each request's slots."""
    batch, context = (2, 256) if small else (4, 8192)
    step = Step(batch, context, 1, device, dtype, (16, torch.uint8), in_place=True)
    (out,) = StockTriton(step, device).layers()
    k, v = (
        t[0].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        for t in (step.keys, step.values)
    )
    reference = scaled_dot_product_attention(
        step.q.unsqueeze(2).float(), k.float(), v.float(), scale=SCALE, enable_gqa=True
    ).squeeze(2)
    return {
        "check": "SGLang Triton decode over the paged pool (stock) vs SDPA",
        "rel_err": _rel_err(out, reference),
    }


# ------------------------------------------------------------------------------ driver
def passed(check: dict[str, Any], dtype: torch.dtype) -> bool:
    """Tolerances: float32 far under 1e-3, bf16/fp16 operands under 1e-2."""
    if "skipped" in check:
        return True
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    ok = all(check.get(key, True) for key in ("exact", "same_unused", "same_padding"))
    errors = [v for key, v in check.items() if key.startswith("rel_err")]
    ok &= all(err <= tolerance for err in errors)
    if "top_score_gap" in check:
        ok &= check["top_score_gap"] <= 1e-2
    if "selected_score_gap" in check:
        ok &= check["selected_score_gap"] <= SCORE_GAP
    return bool(ok)


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu-dry-run"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, temp folder")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--plot", type=Path, default=None, help="only draw the PNG of an existing results JSON"
    )
    parser.add_argument(
        "--update-crossover",
        type=Path,
        default=None,
        help="only merge an existing results JSON's dense/sparse crossover into the runtime's "
        "table (hybridkv_sglang/runtime/decode/crossover.json)",
    )
    parser.add_argument(
        "--bound-channels", type=int, default=BOUND_CHANNELS, help="key channels a bound covers"
    )
    parser.add_argument(
        "--bound-precision", choices=("kv", "uint8"), default=BOUND_PRECISION, help="bounds dtype"
    )
    parser.add_argument(
        "--miss-rate",
        type=float,
        default=measured_miss_rate(),
        help="host-tier case: share of a step's chunks copied from the host (default: measured "
        "by bench/host_tier_traffic.py at 10 %%)",
    )
    args = parser.parse_args(argv)
    if args.update_crossover is not None:
        update_crossover(args.update_crossover)
        return 0
    if args.plot is not None:
        payload = json.loads(args.plot.read_text())
        plot(payload["speed"], payload["device"], args.plot.with_suffix(".png"))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script on CPU")
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    out_dir = args.out_dir
    if out_dir is None:
        env_out = os.environ.get("OUT")
        out_dir = Path(tempfile.mkdtemp()) if args.dry_run else Path(env_out or RESULTS)
    started = time.monotonic()
    index = (
        min(args.bound_channels, HEAD_DIM),
        torch.uint8 if args.bound_precision == "uint8" else dtype,
    )
    name = device_name(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check_{name}.json"
    payload: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "dry_run": args.dry_run,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
        },
        "dtype": str(dtype).replace("torch.", ""),
        "chunk_index": {"bound_channels": index[0], "bound_precision": args.bound_precision},
        "complete": False,
        "dense_variant_compares": DENSE_VARIANT_COMPARES,
    }

    def save(**parts: Any) -> None:
        """Write what is measured so far: a run stopped by its time limit still returns it
        (``complete`` false)."""
        payload.update(parts, seconds=time.monotonic() - started)
        for check in payload.get("checks", []):
            check["passed"] = passed(check, dtype)
        path.write_text(json.dumps(payload, indent=1))

    checks = check_kernels(device, dtype, args.dry_run)
    checks += check_tables(device, dtype, args.dry_run, index)
    repeats = 2 if args.dry_run else args.repeats
    checks.append(check_stock(device, dtype, args.dry_run))
    save(checks=checks)
    rows = speed(device, dtype, args.dry_run, repeats, index)
    save(speed=rows, crossover=crossover_points(rows))
    host_rows = host_tier(device, dtype, args.dry_run, repeats, index, args.miss_rate)
    checks += [
        {
            "check": f"captured compact host-tier step vs the eager step (batch {r['batch']})",
            "graph_captured": r["graph_captured"],
            "rel_err_graph": r["rel_err_graph"],
        }
        for r in host_rows
    ]
    save(checks=checks, host_tier=host_rows)
    batches = sorted({r["batch"] for r in rows})
    linear, prefill = linear_part(device, dtype, args.dry_run, repeats, batches)
    project(rows, linear)
    save(speed=rows, linear=linear, prefill=prefill)
    compression = compression_cost(device, dtype, args.dry_run, 1 if args.dry_run else 3, prefill)
    save(compression=compression, goals=goals(rows, host_rows, compression), complete=True)
    plot(rows, payload["device"], path.with_suffix(".png"))
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}")
    print(
        "| batch | context | read | stock triton / sdpa / dense variant ms | hybridkv ms "
        "| x triton / sdpa | projected x triton / sdpa | hybridkv TB/s |"
    )
    for r in rows:
        print(
            f"| {r['batch']} | {r['context']} | {r['read_fraction']:.3f} | "
            f"{r['stock_triton_ms']:.3f} / {r['dense_sdpa_ms']:.3f} / {r['dense_variant_ms']:.3f} "
            f"| {r['hybridkv_ms']:.3f} | {r['speedup']:.2f} / {r['speedup_vs_sdpa']:.2f} | "
            f"{r['projected_ratio']:.2f} / {r['projected_ratio_vs_sdpa']:.2f} | "
            f"{r['tb_per_s']['hybridkv']:.2f} |"
        )
    for r in compression:
        print(
            f"compression ({r['storage']}, {r['prompt_len']} tokens): {r['total_ms']:.1f} ms, "
            f"{r['share_of_prefill']:.1%} of a {r['prefill_ms']:.1f} ms prefill, "
            f"{r['host_syncs']} host syncs"
        )
    for goal, met in payload["goals"].items():
        print(f"{'n/a ' if met is None else 'MET ' if met else 'MISS'}  {goal}")
    print(f"wrote {path}")
    return 0 if all(check["passed"] for check in checks) else 1


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def plot(rows: list[dict[str, Any]], device: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the device machine may lack it: draw later with --plot
        print(f"matplotlib missing: draw the plot with --plot {path.with_suffix('.json')}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [
        ("stock_triton_ms", "stock Triton (paged pool, 8 max splits)"),
        ("dense_sdpa_ms", "dense SDPA flash decoding + index build"),
        ("dense_variant_ms", "all-dense batch under hybridkv"),
        ("hybridkv_ms", "hybridkv in place (table build + folded attention)"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(configs)
    for i, (key, label) in enumerate(configs):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    for j, r in enumerate(rows):
        ax.annotate(
            f"{r['speedup']:.1f}x", (j + 3 * width, r["hybridkv_ms"]), ha="center", va="bottom"
        )
    ax.set_xticks([j + width for j in range(len(rows))])
    ax.set_xticklabels([f"b{r['batch']}\n{r['context'] // 1024}K" for r in rows])
    ax.set_ylabel("ms per 28-layer attention step (median)")
    ax.set_title(f"{device}: decode attention step, 10 % budget")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
