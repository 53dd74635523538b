"""The backend's decode protocol on CPU with SGLang's real KV pool: the dense and hybridkv graph
variants, the in-graph table build equal to the eager step, and eager fallbacks."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.runner_utils.capture_mode import _set_capture_attention_variant
from torch.utils._python_dispatch import TorchDispatchMode

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.backend import HybridKVAttnBackend
from hybridkv_sglang.runtime.decode.crossover import Crossover
from hybridkv_sglang.runtime.decode.graph_variants import DENSE, SPARSE
from hybridkv_sglang.runtime.hooks.scheduler import (
    limit_graph_to_fit,
    record_forward_batch,
    use_hybridkv_variants,
)
from hybridkv_sglang.runtime.prefill.compression import PrefillOutcome
from hybridkv_sglang.runtime.prefill.requests import PrefillEnd
from hybridkv_sglang.runtime.session.compact_storage import CompactStorage
from hybridkv_sglang.runtime.session.current import open_session
from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
from hybridkv_sglang.runtime.session.stats import HybridKVStats
from hybridkv_sglang.storage.compact_layout import (
    build_compact_layout,
    compact_shape,
    staging_slots,
)
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.host_tier import HostTier
from tests.unit.runtime.folded_steps import folded_for
from tests.unit.runtime.test_compact_layout import CHUNK, _real_pool, _request_rows
from tests.unit.runtime.test_decode_layout import BOUNDS, DIM, GROUP, HEADS, LAYERS, SM_SCALE, _plan

PROMPTS, TAIL, GRAPH_BS = [150, 203, 97, 61], 6, 6


class _Dense(AttentionBackend):
    """Stands in for the dense backend over SGLang's real pool; counts what it is asked."""

    def __init__(self, pool: MHATokenToKVPool, req_to_token: torch.Tensor) -> None:
        super().__init__()
        self.token_to_kv_pool = pool
        self.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token, size=8)
        self.calls: list[str] = []

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self.calls.append("graph_state")

    def init_forward_metadata(self, forward_batch) -> None:
        self.calls.append("metadata")

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        self.calls.append("out_graph")

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        self.calls.append("in_graph")

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append("decode")
        return torch.zeros(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)


def _on_host_tier(layouts, pool, allocator, req_to_token) -> tuple[dict, HostTier]:
    """The layouts moved to compact storage with their dynamic heads on a host tier."""
    tier = HostTier(400, CHUNK, DIM, DIM, torch.float32, pin_memory=False)
    storage = CompactStorage(pool, LAYERS, tier, decode_meta=None)
    compact = {}
    for row, layout in layouts.items():
        staging = staging_slots(layout.dynamic_rows, layout.top_k_chunks, 1.0)
        shape = compact_shape(layout, staging)
        prompt = req_to_token[row, : layout.prompt_len].to(torch.int64)
        slots = allocator.alloc(shape.num_slots).to(torch.int64)
        built, copies = build_compact_layout(
            layout, prompt, slots, tier.alloc(shape.host_chunks), staging
        )
        storage.fill(copies)
        compact[row] = built
    return compact, tier


@pytest.fixture(params=["in_place", "host_tier"])
def served(request: pytest.FixtureRequest):
    """A backend with two compressed requests (pool rows 2 and 3) among four, in place or in
    compact storage with their dynamic heads on a host tier."""
    pool, allocator = _real_pool(seed=4)
    req_to_token = _request_rows(allocator, PROMPTS, TAIL)
    keys = torch.stack([pool.get_key_buffer(layer) for layer in range(LAYERS)])
    index, dynamic_budget = BOUNDS[1]  # 8-bit codes: request 3's heads are all dynamic
    plans = {
        2: _plan("hybridkv", req_to_token[2], keys, 203, 4, budget=0.2, **index),
        3: _plan("all_dynamic", req_to_token[3], keys, 97, 4, budget=dynamic_budget, **index),
    }
    layouts = {row: CompressedLayout.from_plan(p, "cpu") for row, p in plans.items()}
    assert bool(plans[3].is_dynamic.all())
    tier = None
    if request.param == "host_tier":
        layouts, tier = _on_host_tier(layouts, pool, allocator, req_to_token)
        assert all(layout.on_host for layout in layouts.values())
    folded = folded_for(
        layouts,
        pool_rows=req_to_token.shape[0],
        layers=LAYERS,
        heads=HEADS,
        group=GROUP,
        dim=DIM,
        chunk=CHUNK,
        use_triton=True,
        host_tier=tier,
    )
    config = HybridKVConfig(window=8, sink=4, chunk_size=CHUNK, top_k_chunks=3)
    session = SchedulerSession(config, HybridKVStats(), decode_meta=folded.meta)
    backend = HybridKVAttnBackend(_Dense(pool, req_to_token), session, LAYERS, folded)
    session.backend = backend
    open_session(session)
    backend.init_cuda_graph_state(GRAPH_BS, GRAPH_BS)
    return backend, pool


def _forward_batch(rows: list[int], pad_to: int | None = None) -> SimpleNamespace:
    """A decode batch; ``pad_to``: the graph runner's padded view (pool row 0, length 1)."""
    lens = [PROMPTS[r - 1] + TAIL for r in rows]
    pad = 0 if pad_to is None else pad_to - len(rows)
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(rows) + pad,
        req_pool_indices_cpu=torch.tensor(rows + [0] * pad),
        req_pool_indices=torch.tensor(rows + [0] * pad),
        seq_lens=torch.tensor(lens + [1] * pad),
        seq_lens_cpu=torch.tensor(lens + [1] * pad),
        out_cache_loc=torch.zeros(len(rows) + pad, dtype=torch.int64),
    )


def _layer(layer_id: int) -> SimpleNamespace:
    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=HEADS * GROUP,
        qk_head_dim=DIM,
        v_head_dim=DIM,
        scaling=SM_SCALE,
    )


def _step(backend, forward_batch, queries) -> list[torch.Tensor]:
    return [
        backend.forward_decode(q, None, None, _layer(layer), forward_batch, save_kv_cache=False)
        for layer, q in enumerate(queries)
    ]


class _HostReads(TorchDispatchMode):
    """Records every aten op outside Triton kernels that reads the device from the host,
    syncs, or allocates host memory for a copy."""

    FORBIDDEN = frozenset({"_local_scalar_dense", "item", "nonzero", "_pin_memory", "tolist"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN or (name == "_to_copy" and "device" in (kwargs or {})):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_launches() -> Iterator[list[str]]:
    """The kernels launched in the block, one name per launch (under the interpreter, by
    wrapping its per-launch entry point, as ``bench/decode_overhead.py`` counts them)."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    launched: list[str] = []

    def counted(fn, *args, grid, warmup, **kwargs):
        if not warmup:
            launched.append(fn.fn.__name__)
        return run(fn, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield launched
    finally:
        InterpretedFunction.run = run


def test_retrieval_and_staging_are_one_launch_per_layer(served):
    """``FoldedDecode.retrieve`` launches one kernel per layer, host-tier staging included, and
    leaves its block counters at zero."""
    backend, pool = served
    folded = backend.folded
    rows = [1, 2, 3, 4]
    backend.init_forward_metadata(_forward_batch(rows))
    gen = torch.Generator().manual_seed(5)
    moves = backend.decode_meta.moves.sum(dim=0).clone()
    for layer in range(LAYERS):
        q_rows = torch.randn(len(rows) * HEADS, GROUP, DIM, generator=gen)
        k_buffer, v_buffer = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
        with _triton_launches() as launched:
            folded.retrieve(layer, q_rows, k_buffer, v_buffer)
        assert launched == ["_chunk_retrieval_kernel"]
        assert not bool(folded.retrieval_done.any())
    moved, selected = (backend.decode_meta.moves.sum(dim=0) - moves).tolist()
    if folded._host_tier is not None:
        assert 0 < moved <= selected  # staged in that launch
    else:
        assert moved == selected == 0


def test_the_host_read_check_sees_a_sync():
    with _HostReads() as reads:
        torch.tensor([0, 3]).nonzero()
        torch.tensor(2.0).item()
    assert reads.seen == ["nonzero", "_local_scalar_dense"]


def test_captured_hybridkv_variant_attends_like_the_eager_step(served):
    backend, _ = served
    rows = [1, 2, 3, 4]
    gen = torch.Generator().manual_seed(9)
    runner = SimpleNamespace(attn_backend=backend)
    assert limit_graph_to_fit(True, runner, _forward_batch(rows)) is True  # host tier included
    for _ in range(2):  # the second step finds chunks staged by the first
        queries = [torch.randn(GRAPH_BS, HEADS * GROUP * DIM, generator=gen) for _ in range(LAYERS)]
        eager_batch = _forward_batch(rows)
        backend.init_forward_metadata(eager_batch)
        eager = _step(backend, eager_batch, [q[: len(rows)] for q in queries])
        view = _forward_batch(rows, pad_to=GRAPH_BS)
        _set_capture_attention_variant(SPARSE)
        try:
            backend.init_forward_metadata_out_graph(view, in_capture=True)
        finally:
            _set_capture_attention_variant(None)
        with _HostReads() as reads:
            backend.init_forward_metadata_in_graph(view)  # captured: runs inside the graph
            graph = _step(backend, view, queries)
        assert reads.seen == []
        for a, b in zip(graph, eager, strict=True):
            torch.testing.assert_close(a[: len(rows)], b, rtol=0, atol=0)
    assert backend.dense.calls == ["graph_state"]  # nothing of the dense backend ran
    assert backend.stats.snapshot()["totals"].get("graph_fallbacks", 0) == 0
    moved, selected = backend.decode_meta.moves.sum(dim=0).tolist()
    if backend.folded._host_tier is not None:
        assert 0 < moved < selected


def test_replays_pick_the_variant_from_the_batch(served):
    backend, _ = served
    variants = use_hybridkv_variants(None, None)
    assert variants.select(_forward_batch([1, 4], pad_to=GRAPH_BS)) == DENSE
    view = _forward_batch([1, 4], pad_to=GRAPH_BS)
    backend.init_forward_metadata_out_graph(view)
    assert backend.dense.calls[-1] == "out_graph"  # the dense graph: stock's own metadata
    assert variants.select(_forward_batch([1, 3], pad_to=GRAPH_BS)) == SPARSE
    before = list(backend.dense.calls)
    backend.init_forward_metadata_out_graph(_forward_batch([1, 3], pad_to=GRAPH_BS))
    assert backend.dense.calls == before  # the hybridkv graph: nothing outside it


def test_an_eager_dense_batch_takes_the_dense_backend_only(served):
    backend, _ = served
    batch = _forward_batch([1, 4])
    backend.init_forward_metadata(batch)
    _step(backend, batch, [torch.randn(2, HEADS * GROUP * DIM) for _ in range(LAYERS)])
    assert backend.dense.calls[1:] == ["metadata"] + ["decode"] * LAYERS


def test_batches_the_buffers_cannot_hold_run_eagerly(served):
    backend, _ = served
    runner = SimpleNamespace(attn_backend=backend)
    assert limit_graph_to_fit(True, runner, _forward_batch([2, 3])) is True
    backend.folded.shape = dataclasses.replace(backend.folded.shape, max_rows=HEADS)  # 1 request
    before = backend.stats.snapshot()["totals"].get("graph_fallbacks", 0)
    assert limit_graph_to_fit(True, runner, _forward_batch([2, 3])) is False
    assert limit_graph_to_fit(True, runner, _forward_batch([1, 4])) is True  # dense variant
    assert backend.stats.snapshot()["totals"]["graph_fallbacks"] == before + 1


def test_pool_rows_reach_the_host_only_while_requests_are_compressed(served):
    backend, _ = served
    reqs = [SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in (3, 1)]
    mirror = torch.tensor([3, 1])  # SGLang's ScheduleBatch.req_pool_indices_cpu: taken as is
    with_mirror = SimpleNamespace(
        reqs=reqs, forward_mode=ForwardMode.DECODE, req_pool_indices_cpu=mirror
    )
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices_cpu=None)
    assert record_forward_batch(fb, type(fb), with_mirror).req_pool_indices_cpu is mirror
    batch = SimpleNamespace(reqs=reqs, forward_mode=ForwardMode.DECODE)  # no mirror: the reqs
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices_cpu=None)
    assert record_forward_batch(fb, type(fb), batch).req_pool_indices_cpu.tolist() == [3, 1]
    for row in (2, 3):
        backend.decode_meta.release(row)
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices_cpu=None)
    assert record_forward_batch(fb, type(fb), batch).req_pool_indices_cpu is None
    assert not backend.decode_meta.compressed_rows.any()
    backend.init_forward_metadata(_forward_batch([1, 2]))  # applies the releases on the device
    assert bool((backend.decode_meta.slot_of_row == -1).all())
    assert np.count_nonzero(backend.decode_meta.prompt_lens) == 0


def test_a_request_whose_records_fail_is_served_dense(served):
    backend, _ = served
    request = PrefillEnd(0, "r-broken", 4, PROMPTS[3], 0, 0, ((0, 40),))
    outcome = PrefillOutcome(request, None, backend.policy, layout=object())  # not recordable
    backend.session.register([outcome], [outcome], torch.device("cpu"))
    assert outcome.layout is None and outcome.dense_reason == "compression_error"
    assert backend.session.requests.entry("r-broken") is None
    assert not backend.decode_meta.compressed_rows[4]
    assert backend.decode_meta.usage()["requests"] == 2  # the others are untouched
    record = backend.stats.snapshot()["requests"]["r-broken"]
    assert not record["compressed"] and record["dense_reason"] == "compression_error"


def test_small_in_place_batches_decode_dense_below_the_crossover(served):
    """Below the device's crossover a batch of in-place requests replays the dense graph
    (stock speed, full-cache answers), counted; compact requests cannot fall back."""
    backend, _ = served
    backend.crossover = Crossover(((4096, 3), (1 << 20, 2)))
    compact = bool(backend.decode_meta.compact_rows[[2, 3]].any())
    batch = _forward_batch([2, 3])  # the graph's batch: its size is what the step costs
    assert backend.select_graph_variant(batch) == (SPARSE if compact else DENSE)
    backend.init_forward_metadata_out_graph(batch)
    totals = backend.stats.snapshot()["totals"]
    assert totals.get("dense_crossover_steps", 0) == (0 if compact else 1)
    assert backend.select_graph_variant(_forward_batch([1, 2, 3])) == SPARSE  # at the crossover


@pytest.mark.parametrize(
    ("batch", "context", "dense"),
    [(1, 1000, True), (7, 32768, True), (8, 32768, False), (4, 200_000, True), (9, 10, False)],
)
def test_the_crossover_table_of_a_measured_device(batch, context, dense):
    h200 = Crossover.for_device("cuda", "NVIDIA H200")
    assert h200.prefers_dense(batch, context) is dense
    assert Crossover.for_device("cuda", "an unknown GPU").prefers_dense(batch, context) is dense
    assert not Crossover.for_device("cpu", None).prefers_dense(batch, context)
