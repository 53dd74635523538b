"""What one decode step launches and runs on the host: hybridkv's folded decode vs stock SGLang.

The real decode-step code at Qwen2.5-VL-7B attention shapes (28 layers, 28 query / 4 KV heads,
head dim 128), context ``--context`` (32K), batches ``--batches`` (1/8/32/128), counted the way
SGLang's decode CUDA graph runner runs it:

- **outside the graph** (host work before every replay): for hybridkv the ``ForwardBatch.init_new``
  AFTER hook ``record_forward_batch`` (its decode-batch pool rows, ``record_pool_rows`` below),
  ``backend.select_graph_variant``, ``backend.graph_misfit`` (the
  ``can_run_graph`` hook) and ``backend.init_forward_metadata_out_graph(fb_view)``; for stock, the
  stock ``triton`` backend's ``init_forward_metadata_out_graph(fb_view)`` (what SGLang's decode
  graph runner calls before a replay);
- **inside the graph** (what the captured graph replays), per layer: the backend's
  ``init_forward_metadata_in_graph`` once per step divided by 28, plus one layer's
  ``forward_decode`` (KV write; hybridkv's chunk retrieval and its folded attention, which
  derives each row's entries itself; stock's ``decode_attention_fwd``), averaged over the 28
  layers.

Both systems are real objects: stock is SGLang's own ``TritonAttnBackend`` built on CPU from a
minimal model runner (a small real ``MHATokenToKVPool``, a real ``KVIndexTranslator``) with its
real ``init_cuda_graph_state``; hybridkv is ``HybridKVAttnBackend(dense=<that object>, ...)`` with
a ``FoldedDecode(use_triton=True)`` over a real ``DecodeMetadata``. ``device_core_count`` of the
stock backend is set to an H200's 132 SMs (on CPU SGLang reads 0 and skips the split-count kernel
it launches on a GPU); hybridkv's ``target_programs`` is 16 x 132, what ``build_folded_decode``
sets on an H200.

Compressed requests hold metadata shaped as a plan at a 10 % budget would shape it, built by
``bench/synthetic_rows.py`` (the rows the device check uses; real policy plans at 32K on CPU are
too slow): per layer half the KV heads dynamic (resident prefix of one chunk, chunk size 16, top-8
of the ~2K retrievable chunks, window tail 32), half static, keeping sorted random positions plus
the window, as many as make all four heads read 10 % of the prompt per step; written with
``DecodeMetadata.add``. The
"dense" batch holds requests with nothing compressed while the compressed ones stay live in the
server (so the hooks do their host lookups); ``ops_outside_graph_idle`` is the same batch with no
compressed request alive anywhere.

Counting: aten ops with a ``TorchDispatchMode`` (every op, views included; ops the Triton
interpreter itself issues to copy arguments are not counted), Triton launches by wrapping
``triton.runtime.interpreter.InterpretedFunction.run`` (``TRITON_INTERPRET=1``, set before triton
is imported): one per kernel launch, not per program. Counts do not depend on the values a kernel
computes (no host reads in either path), so the counting passes record each launch without
running it in the interpreter, at the full context; a validation pass at a small context runs
every kernel, checks that it launches and dispatches exactly what the counting pass recorded,
that hybridkv's dense variant returns stock's output bit for bit and that hybridkv's compressed
output matches the torch twins (``decode_kernel="torch"``).

``host_us``: median wall time per step of the outside-graph calls above (perf_counter; both
systems alternate step by step; 5 rounds spread over the run, a row keeps its lowest round
median), Python-side only: Triton launches cost nothing here (on a GPU each costs a few us of
launch overhead; stock launches two per step outside the graph, hybridkv none), torch ops run on
CPU.
``table_bytes``: hybridkv ``FoldedDecode.table_bytes`` (the split offsets of 28 layers; a row's
entries are derived inside the attention, never stored) after
``HybridKVAttnBackend.init_cuda_graph_state(bs, bs)`` vs stock's decode ``cuda_graph_kv_indices``
(``max_num_tokens x max_context_len`` int64) for the same max batch. The step buffers start from
``bs x H_kv`` rows here (``reserve`` only grows them); ``build_folded_decode`` starts them at
every ``req_to_token`` row, so a server holds more than the row shows when its request pool has
more rows than its largest graph batch.

Run: ``TRITON_INTERPRET=1 python bench/decode_overhead.py`` (``make bench-overhead``, about 80 s
on 2 CPU cores); ``--quick`` (batches 1 and 8, fewer repeats) for tests. Writes
``bench/results/decode_overhead.json`` and ``.png``. The full run holds the chunk index of 128
compressed requests at 32K in ``DecodeMetadata``: ~14.6 M chunks of ``2 r`` bound bytes plus 12
of retrieval scratch each (1.1 GB with the config's default, 8-bit codes over 32 channels; 7.7 GB
with bf16 bounds over all 128). The results also state the decode metadata's reserve per KV
token beside the KV pool's own, at these shapes, in both storage modes
(``decode_metadata_reserve``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model folder is local

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from synthetic_rows import synthetic_rows
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 28, 28, 4, 128
GROUP = Q_HEADS // KV_HEADS
BUDGET = 0.10
SINK, WINDOW, CHUNK, TOP_K = 16, 32, 16, 8
"""The config's; the synthetic plans' resident prefix is one chunk (= ``SINK``)."""
DECODED = 64
"""Tokens decoded after the prompt: seq_len = prompt_len + DECODED = context - DECODED."""
H200_SMS = 132
TARGET_PROGRAMS = 16 * H200_SMS
"""``FoldedDecode.target_programs`` as ``build_folded_decode`` sets it on an H200."""
POOL_SLOTS = 1024
"""A small KV pool for the counting passes: only counts matter, and they never read KV."""
VALIDATION_CONTEXT, VALIDATION_BATCH, VALIDATION_LAYERS = 512, 2, 2
"""The validation pass runs every kernel in the interpreter: a small step, its first layers."""
VALIDATION_BUDGET = 0.4
"""At 384 prompt tokens a 10 % budget leaves the static heads nothing but their window (the
dynamic heads' fixed reads use it up); 40 % gives them random positions to read, and the batch
still fits the graph's table (2 x stock's: 1024 entries a request at context 512)."""
ROUNDS = 5
"""Host timing rounds, spread over the run (see :func:`time_rows`)."""
SYSTEMS = ("hybridkv", "stock")
KINDS = ("compressed", "dense")


# ----------------------------------------------------------------------------- counting
class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (and not paused)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class Launches:
    """Wraps the interpreter's per-launch entry point: counts launches, runs them or not."""

    def __init__(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self._cls = InterpretedFunction
        self._run = InterpretedFunction.run
        self.counts: Counter[str] = Counter()
        self.execute = False
        self.counter: OpCounter | None = None
        launches = self

        def run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return launches._run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            launches.counts[fn.fn.__name__] += 1
            if not launches.execute:
                return None
            if launches.counter is not None:
                launches.counter.paused += 1
            try:
                return launches._run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                if launches.counter is not None:
                    launches.counter.paused -= 1

        InterpretedFunction.run = run

    def restore(self) -> None:
        self._cls.run = self._run


LAUNCHES: Launches | None = None


@dataclass
class Count:
    ops: Counter[str] = field(default_factory=Counter)
    launches: Counter[str] = field(default_factory=Counter)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_launches(self) -> int:
        return sum(self.launches.values())


@contextlib.contextmanager
def counting() -> Iterator[Count]:
    """Ops and Triton launches of the block."""
    assert LAUNCHES is not None
    result = Count()
    before = Counter(LAUNCHES.counts)
    counter = OpCounter()
    LAUNCHES.counter = counter
    try:
        with counter:
            yield result
    finally:
        LAUNCHES.counter = None
    result.ops = counter.ops
    result.launches = Counter(LAUNCHES.counts)
    result.launches.subtract(before)
    result.launches = +result.launches


def host_us(
    systems: dict[str, dict[str, Callable[[], None]]],
    prepare: Callable[[], None],
    repeats: int,
    warmup: int = 50,
) -> dict[str, tuple[float, dict[str, float]]]:
    """Per system, the median microseconds of a step made of its ``parts`` (run in order) and
    each part's median. Systems alternate repeat by repeat, so that the load of a shared machine
    falls on all of them alike; ``prepare`` runs untimed before each step."""
    times = {s: {name: [] for name in parts} for s, parts in systems.items()}
    totals: dict[str, list[float]] = {s: [] for s in systems}
    gc.disable()
    try:
        for i in range(warmup + repeats):
            for system, parts in systems.items():
                prepare()
                total = 0.0
                for name, part in parts.items():
                    t0 = time.perf_counter()
                    part()
                    elapsed = time.perf_counter() - t0
                    if i >= warmup:
                        times[system][name].append(elapsed)
                    total += elapsed
                if i >= warmup:
                    totals[system].append(total)
    finally:
        gc.enable()
    return {
        system: (
            round(statistics.median(totals[system]) * 1e6, 1),
            {name: round(statistics.median(t) * 1e6, 1) for name, t in times[system].items()},
        )
        for system in systems
    }


# ----------------------------------------------------------------------------- the systems
def publish_server_args(model_dir: Path) -> None:
    """The process-wide SGLang config the stock backend reads (triton attention on CPU), for a
    local model folder holding only the 7B attention shapes' ``config.json``."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    hf_config(32768).save_pretrained(model_dir)
    publish(
        ServerArgs(model_path=str(model_dir), device="cpu", attention_backend="triton"),
        role="scheduler",
    )


def hf_config(context: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_size=Q_HEADS * HEAD_DIM,
        num_hidden_layers=LAYERS,
        max_position_embeddings=context,
        architectures=["Qwen2ForCausalLM"],
    )


@dataclass
class Setup:
    """Stock backend, KV pool and metadata for one context; per-batch backends on demand."""

    context: int
    max_batch: int
    model_runner: Any
    stock: Any
    meta: Any
    idle_meta: Any
    req_to_token: torch.Tensor
    prompt_len: int
    seq_len: int
    compressed_rows: list[int]
    dense_rows: list[int]
    static_kept: int
    """Positions a static head keeps (its window included)."""
    _backends: dict[tuple[int, bool, bool], Any] = field(default_factory=dict)
    _shape: Any = None

    def rows(self, kind: str, batch: int) -> list[int]:
        return (self.compressed_rows if kind == "compressed" else self.dense_rows)[:batch]

    def backend(self, batch: int, idle: bool = False, use_triton: bool = True) -> Any:
        """``HybridKVAttnBackend`` whose largest graph batch is ``batch`` (cached): the step
        buffers sized as ``build_folded_decode`` sizes them, but over this setup's metadata and
        left to ``init_cuda_graph_state`` to grow to the batch."""
        from hybridkv_sglang.attention.folded_decode import FoldedDecode
        from hybridkv_sglang.runtime.backend import HybridKVAttnBackend
        from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
        from hybridkv_sglang.runtime.session.stats import HybridKVStats
        from hybridkv_sglang.runtime.startup.factory import build_folded_decode

        key = (batch, idle, use_triton)
        if key not in self._backends:
            config = bench_config("triton" if use_triton else "torch")
            if self._shape is None:
                self._shape = build_folded_decode(config, self.model_runner).shape
            shape = dataclasses.replace(self._shape, max_rows=KV_HEADS)
            folded = FoldedDecode(
                self.idle_meta if idle else self.meta,
                shape,
                use_triton=use_triton,
                target_programs=TARGET_PROGRAMS,
                device="cpu",
            )
            session = SchedulerSession(config, HybridKVStats(), decode_meta=folded.meta)
            session.backend = HybridKVAttnBackend(self.stock, session, LAYERS, folded)
            self._backends[key] = session.backend
        return self._backends[key]


def bench_config(decode_kernel: str = "triton") -> Any:
    """The hybridkv config of every run: these shapes, the config's chunk index (its
    ``bound_channels`` and ``bound_precision`` defaults)."""
    from hybridkv_sglang.config import HybridKVConfig

    return HybridKVConfig(
        decode_kernel=decode_kernel,
        chunk_size=CHUNK,
        top_k_chunks=TOP_K,
        sink=SINK,
        window=WINDOW,
        budget=BUDGET,
    )


def metadata_reserve() -> dict[str, Any]:
    """The decode metadata's reserve over the KV pool's bytes per token at these shapes (bf16
    KV), in both storage modes at ``BUDGET``: for this run's chunk index and for 8-bit codes
    over 16 key channels."""
    from hybridkv_sglang.storage.decode_metadata import reserve_fraction

    config = bench_config()
    indexes = {
        "run": (config.bound_channels, config.bound_precision == "uint8"),
        "uint8_r16": (16, True),
    }
    return {
        name: {
            "bound_channels": channels or HEAD_DIM,
            "bound_precision": "uint8" if codes else "kv",
            **{
                storage: round(
                    reserve_fraction(
                        LAYERS,
                        KV_HEADS,
                        HEAD_DIM,
                        2,
                        bound_channels=channels,
                        uint8_bounds=codes,
                        chunk_size=CHUNK,
                        max_dynamic_fraction=config.most_dynamic_fraction(),
                        storage=storage,
                        budget=BUDGET,
                        min_prompt_tokens=config.min_prompt_tokens,
                        fixed_fraction=config.decode_metadata_fraction,
                        top_k_chunks=config.top_k_chunks,
                    ),
                    4,
                )
                for storage in ("in_place", "compact")
            },
        }
        for name, (channels, codes) in indexes.items()
    }


def build_setup(context: int, max_batch: int, *, validation: bool, seed: int = 0) -> Setup:
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from hybridkv_sglang.kernels.folded_tables import PRE_LEN
    from hybridkv_sglang.runtime.startup.memory_accounting import pool_sizing
    from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RequestRows

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # pool row 0 is SGLang's padding row; compressed requests 1..B, dense ones B+1..2B
    rows = 2 * max_batch + 1
    prompt_len, seq_len = context - 2 * DECODED, context - DECODED
    # validation runs the kernels: every request its own slots; else a small pool (the
    # counting passes never read KV) that the requests' slots are drawn from
    slots = (rows - 1) * seq_len if validation else POOL_SLOTS
    pool = MHATokenToKVPool(
        size=slots,
        page_size=1,
        dtype=torch.float32,
        head_num=KV_HEADS,
        head_dim=HEAD_DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(slots, torch.float32, "cpu", pool, need_sort=False)
    req_to_token = torch.zeros(rows, context, dtype=torch.int32)
    if validation:
        for layer in range(LAYERS):
            pool.get_key_buffer(layer).normal_()
            pool.get_value_buffer(layer).normal_()
        for row in range(1, rows):
            req_to_token[row, :seq_len] = allocator.alloc(seq_len).to(torch.int32)
    else:
        req_to_token[1:, :seq_len] = torch.randint(1, slots, (rows - 1, seq_len), dtype=torch.int32)
    model_config = SimpleNamespace(
        attention_arch=AttentionArch.MHA,
        hf_config=hf_config(context),
        get_max_num_attention_heads=lambda: Q_HEADS,
        get_num_kv_heads=lambda tp_size, dcp_size=1: KV_HEADS,
        head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        swa_v_head_dim=HEAD_DIM,
        context_len=context,
        linear_attn_registry_result=None,
        is_draft_model=False,
        is_encoder_decoder=False,
    )
    model_runner = SimpleNamespace(
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token, size=rows - 1),
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=allocator,
        sliding_window_size=None,
        page_size=1,
        kv_index_translator=KVIndexTranslator(
            req_to_token=req_to_token,
            token_to_kv_pool_allocator=allocator,
            token_to_kv_pool=pool,
            page_size=1,
            device="cpu",
        ),
        decode_num_tokens_per_req=lambda: 1,
        model_config=model_config,
        is_draft_worker=False,
        device="cpu",
        gpu_id=0,
        kv_cache_dtype=torch.float32,
    )
    stock = TritonAttnBackend(model_runner)
    stock.device_core_count = H200_SMS  # a GPU's path: the split-count kernel, not a fill

    sizing = pool_sizing(bench_config())
    bound_width = sizing.bound_width(HEAD_DIM)
    bound_dtype = sizing.bound_dtype(torch.float32 if validation else torch.bfloat16)

    def request() -> RequestRows:
        # the counting passes never read bounds: zero-stride ones, no memory for the source
        return synthetic_rows(
            prompt_len,
            layers=LAYERS,
            heads=KV_HEADS,
            head_dim=HEAD_DIM,
            budget=VALIDATION_BUDGET if validation else BUDGET,
            chunk=CHUNK,
            top_k=TOP_K,
            window=WINDOW,
            gen=gen,
            device="cpu",
            dtype=bound_dtype,
            random_bounds=validation,
            bound_width=bound_width,
        )

    first = request()
    per_request_fixed, per_request_bounds = first.fixed_values.numel(), first.kmin.shape[0]
    per_request_params = first.bound_channels.shape[0]
    per_request_scratch = first.candidate_slots, first.top_slots

    def metadata(requests_held: int) -> DecodeMetadata:
        return DecodeMetadata(
            LAYERS,
            KV_HEADS,
            bound_width,
            max_requests=max(requests_held, 1) + 1,
            pool_rows=rows,
            fixed_capacity=per_request_fixed * requests_held,
            bound_capacity=per_request_bounds * requests_held,
            param_capacity=per_request_params * requests_held,
            candidate_capacity=per_request_scratch[0] * requests_held,
            top_capacity=per_request_scratch[1] * requests_held,
            bound_dtype=bound_dtype,
            device="cpu",
        )

    meta = metadata(max_batch)
    compressed_rows = list(range(1, max_batch + 1))
    for i, row in enumerate(compressed_rows):
        rows_i = first if i == 0 else request()
        if not meta.add(row, rows_i):
            raise RuntimeError(f"decode metadata refused pool row {row}")
    return Setup(
        context=context,
        max_batch=max_batch,
        model_runner=model_runner,
        stock=stock,
        meta=meta,
        idle_meta=metadata(0),
        req_to_token=req_to_token,
        prompt_len=prompt_len,
        seq_len=seq_len,
        compressed_rows=compressed_rows,
        dense_rows=list(range(max_batch + 1, 2 * max_batch + 1)),
        static_kept=int(first.meta[0, KV_HEADS - 1, PRE_LEN]),  # heads [H/2, H) are static
    )


# ----------------------------------------------------------------------------- batches
@dataclass
class Step:
    """One decode step's inputs: SGLang's ForwardBatch (fields the hooks and backends read), its
    ScheduleBatch (``reqs``), the graph runner's replay view and the captured graph's batch."""

    forward_batch: SimpleNamespace
    schedule_batch: SimpleNamespace
    view: SimpleNamespace
    graph_batch: SimpleNamespace


def make_step(setup: Setup, pool_rows: list[int]) -> Step:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

    bs = len(pool_rows)
    req_pool_indices = torch.tensor(pool_rows, dtype=torch.int64)
    seq_lens = torch.full((bs,), setup.seq_len, dtype=torch.int64)
    out_cache_loc = setup.req_to_token[req_pool_indices, setup.seq_len - 1].to(torch.int64)
    translator = setup.model_runner.kv_index_translator
    plan = translator.plan(
        req_pool_indices=req_pool_indices,
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        write_virtual=out_cache_loc,
    )
    forward_batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=bs,
        input_ids=torch.zeros(bs, dtype=torch.int64),
        positions=seq_lens - 1,
        req_pool_indices=req_pool_indices,
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        seq_lens_sum=bs * setup.seq_len,
        max_seq_len_host=setup.seq_len,
        out_cache_loc=out_cache_loc,
        out_cache_loc_virtual=None,
        out_cache_loc_is_physical=False,
        kv_loc_plan=plan,
        kv_loc_cols=None,
        max_seq_len_override=None,
        encoder_lens=None,
        spec_info=None,
        lora_ids=None,
        can_run_decode_cuda_graph=True,
        req_pool_indices_cpu=None,  # SGLang records it for extend batches only
    )
    buffers = SimpleNamespace(
        input_ids=forward_batch.input_ids.clone(),
        positions=forward_batch.positions.clone(),
        req_pool_indices=req_pool_indices.clone(),
        seq_lens=seq_lens.clone(),
        seq_lens_cpu=seq_lens.clone(),
        encoder_lens=None,
        mamba_track_indices=None,
    )
    view = build_replay_fb_view(
        forward_batch=forward_batch,
        buffers=buffers,
        bs=bs,
        raw_bs=bs,
        num_tokens=bs,
        global_num_tokens_cpu=None,
        seq_len_fill_value=setup.stock.get_cuda_graph_seq_len_fill_value(),
        capture_forward_mode=ForwardMode.DECODE,
        is_encoder_decoder=False,
    )
    graph_batch = SimpleNamespace(**vars(forward_batch))
    graph_batch.req_pool_indices, graph_batch.seq_lens = view.req_pool_indices, view.seq_lens
    # SGLang's Req keeps its pool row in ``req.kv.req_pool_idx`` (ReqKvInfo)
    reqs = [SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in pool_rows]
    schedule_batch = SimpleNamespace(
        reqs=reqs,
        forward_mode=ForwardMode.DECODE,
        req_pool_indices_cpu=torch.tensor(pool_rows, dtype=torch.int64),  # SGLang's own mirror
    )
    return Step(forward_batch, schedule_batch, view, graph_batch)


def layer_of(layer_id: int) -> SimpleNamespace:
    """The RadixAttention fields both backends read."""
    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=Q_HEADS,
        tp_k_head_num=KV_HEADS,
        tp_v_head_num=KV_HEADS,
        qk_head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        head_dim=HEAD_DIM,
        scaling=HEAD_DIM**-0.5,
        logit_capping_method="tanh",
        logit_cap=0.0,
        k_scale=None,
        v_scale=None,
        k_scale_float=None,
        v_scale_float=None,
        sliding_window_size=-1,
        xai_temperature_len=-1,
        is_cross_attention=False,
    )


LAYER_OBJECTS = [layer_of(i) for i in range(LAYERS)]


# ----------------------------------------------------------------------------- one step
def hybridkv_parts(backend: Any, setup: Setup, step: Step) -> dict[str, Callable[[], None]]:
    """hybridkv's host work before a replay, in SGLang's order."""
    from hybridkv_sglang.runtime.hooks.scheduler import record_forward_batch

    fb = step.forward_batch
    return {
        "record_pool_rows": lambda: record_forward_batch(
            fb, step.schedule_batch, setup.model_runner
        ),
        "select_graph_variant": lambda: backend.select_graph_variant(fb),
        "graph_misfit": lambda: backend.graph_misfit(fb),
        "init_forward_metadata_out_graph": lambda: backend.init_forward_metadata_out_graph(
            step.view
        ),
    }


def stock_parts(stock: Any, step: Step) -> dict[str, Callable[[], None]]:
    """Stock's host work before a replay."""
    return {
        "init_forward_metadata_out_graph": lambda: stock.init_forward_metadata_out_graph(step.view)
    }


def run_parts(parts: dict[str, Callable[[], None]]) -> None:
    for part in parts.values():
        part()


def check_fits(backend: Any, step: Step) -> None:
    """After :func:`hybridkv_parts`: the graph's fixed buffers hold the batch (else SGLang runs
    it eagerly, and replaying it would write past them)."""
    reason = backend.graph_misfit(step.forward_batch)
    if reason is not None:
        raise RuntimeError(f"the benchmark's batch would not replay a graph: {reason}")


Inputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def in_graph(
    system_backend: Any, step: Step, inputs: Inputs, layers: int = LAYERS
) -> list[torch.Tensor]:
    """What the captured graph runs: in-graph metadata, then the first ``layers`` layers'
    forward_decode (all of them but in the validation pass)."""
    system_backend.init_forward_metadata_in_graph(step.graph_batch)
    return [
        system_backend.forward_decode(q, k, v, layer, step.graph_batch)
        for layer, (q, k, v) in zip(LAYER_OBJECTS[:layers], inputs[:layers], strict=True)
    ]


def make_inputs(batch: int, seed: int) -> Inputs:
    """Every layer's (q, k, v) of this step's new token."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, Q_HEADS * HEAD_DIM, generator=gen),
            torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen),
            torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen),
        )
        for _ in range(LAYERS)
    ]


def reset(step: Step) -> None:
    """A new step's forward batch, as ``ForwardBatch.init_new`` makes it for decode: no pool
    rows recorded yet (the ``ScheduleBatch`` keeps its own, as SGLang's does while the batch
    stays)."""
    step.forward_batch.req_pool_indices_cpu = None


def measure_batch(setup: Setup, batch: int, bar: Any) -> dict[tuple[str, str], dict]:
    """The four rows (system x batch kind) of one batch size, but their host times."""
    from hybridkv_sglang.runtime.session.current import open_session

    backend = setup.backend(batch)
    open_session(backend.session)
    backend.init_cuda_graph_state(batch, batch)  # the stock state too (same dense object)
    stock = setup.stock
    table = {
        "hybridkv": backend.folded.table_bytes,
        "stock": stock.cuda_graph_kv_indices.numel() * stock.cuda_graph_kv_indices.element_size(),
    }
    inputs = make_inputs(batch, seed=batch)
    rows: dict[tuple[str, str], dict] = {}
    for kind in KINDS:
        step = make_step(setup, setup.rows(kind, batch))
        # the dense graph's capture-time prep (stock and hybridkv's dense variant share it)
        stock.init_forward_metadata_out_graph(step.view, in_capture=True)
        outside = {
            "hybridkv": hybridkv_parts(backend, setup, step),
            "stock": stock_parts(stock, step),
        }
        for system in SYSTEMS:
            reset(step)
            run_parts(outside[system])  # steady state: the step before met this batch already
            reset(step)
            with counting() as out_count:
                run_parts(outside[system])
            if system == "hybridkv":
                check_fits(backend, step)
            # the backend state the replay left (hybridkv: variant chosen, _sparse_step) is
            # what the graph was captured with
            with counting() as graph_count:
                in_graph(backend if system == "hybridkv" else stock, step, inputs)
            per_layer = graph_count.num_ops / LAYERS
            rows[system, kind] = {
                "system": system,
                "batch_kind": kind,
                "batch": batch,
                "context": setup.context,
                "ops_outside_graph": out_count.num_ops,
                "launches_outside_graph": out_count.num_launches,
                "ops_per_layer_in_graph": (
                    int(per_layer) if per_layer.is_integer() else round(per_layer, 1)
                ),
                "launches_per_layer_in_graph": round(graph_count.num_launches / LAYERS, 3),
                "host_us": None,
                "table_bytes": table[system],
                "ops_outside_graph_detail": dict(sorted(out_count.ops.items())),
                "launches_outside_graph_detail": dict(sorted(out_count.launches.items())),
                "ops_in_graph_detail": dict(sorted(graph_count.ops.items())),
                "launches_in_graph_detail": dict(sorted(graph_count.launches.items())),
            }
            if system == "hybridkv":
                rows[system, kind]["graph_variant"] = backend._selected_variant
            bar.update()
        if kind == "dense":  # the same batch while no compressed request is alive anywhere
            idle = setup.backend(batch, idle=True)
            open_session(idle.session)
            reset(step)
            with counting() as idle_count:
                run_parts(hybridkv_parts(idle, setup, step))
            rows["hybridkv", kind]["ops_outside_graph_idle"] = idle_count.num_ops
            rows["stock", kind]["ops_outside_graph_idle"] = rows["stock", kind]["ops_outside_graph"]
            open_session(backend.session)
    return rows


def time_rows(setup: Setup, rows: list[dict], repeats: int, rounds: int, bar: Any) -> None:
    """Every row's ``host_us``: ``rounds`` rounds spread over the batch sizes, each timing
    ``repeats // rounds`` steps of both systems alternately; a row keeps the lowest round
    median (a shared machine's load bursts last longer than a round)."""
    from hybridkv_sglang.runtime.session.current import open_session

    by = {(r["system"], r["batch_kind"], r["batch"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    steps = {(b, k): make_step(setup, setup.rows(k, b)) for b in batches for k in KINDS}
    samples: dict[tuple[str, str, int], list[tuple[float, dict[str, float]]]] = {
        key: [] for key in by
    }
    for _ in range(rounds):
        for batch in batches:
            backend = setup.backend(batch)
            open_session(backend.session)
            backend.init_cuda_graph_state(batch, batch)
            for kind in KINDS:
                step = steps[batch, kind]
                outside = {
                    "hybridkv": hybridkv_parts(backend, setup, step),
                    "stock": stock_parts(setup.stock, step),
                }
                timed = host_us(outside, lambda step=step: reset(step), max(1, repeats // rounds))
                for system, result in timed.items():
                    samples[system, kind, batch].append(result)
            bar.update()
    for key, row in by.items():
        row["host_us"], row["host_us_parts"] = min(samples[key], key=lambda t: t[0])
        row["host_us_rounds"] = [t[0] for t in samples[key]]


# ----------------------------------------------------------------------------- validation
def validate() -> dict:
    """Small context, every kernel run: counts as recorded, outputs as the references."""
    from hybridkv_sglang.runtime.session import current

    assert LAUNCHES is not None
    setup = build_setup(VALIDATION_CONTEXT, VALIDATION_BATCH, validation=True, seed=1)
    batch = VALIDATION_BATCH
    backend = setup.backend(batch)
    current.open_session(backend.session)
    backend.init_cuda_graph_state(batch, batch)
    stock = setup.stock
    report: dict[str, Any] = {
        "context": VALIDATION_CONTEXT,
        "batch": batch,
        "layers_run": VALIDATION_LAYERS,
    }
    inputs = make_inputs(batch, seed=7)
    outputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    same_counts = True
    for kind in KINDS:
        step = make_step(setup, setup.rows(kind, batch))
        stock.init_forward_metadata_out_graph(step.view, in_capture=True)
        for system in SYSTEMS:
            system_backend = backend if system == "hybridkv" else stock
            counts = []
            for execute in (False, True):
                LAUNCHES.execute = execute
                reset(step)
                if system == "hybridkv":
                    run_parts(hybridkv_parts(backend, setup, step))
                    check_fits(backend, step)
                else:
                    run_parts(stock_parts(stock, step))
                with counting() as count:
                    outs = in_graph(system_backend, step, inputs, VALIDATION_LAYERS)
                counts.append((count.num_ops, dict(count.launches)))
            LAUNCHES.execute = False
            same_counts &= counts[0] == counts[1]
            outputs[system, kind] = outs
    report["counts_equal_with_kernels_run"] = same_counts
    report["outputs_finite"] = all(
        bool(torch.isfinite(o).all()) for v in outputs.values() for o in v
    )
    report["dense_variant_equals_stock"] = all(
        torch.equal(a, b)
        for a, b in zip(outputs["hybridkv", "dense"], outputs["stock", "dense"], strict=True)
    )
    # hybridkv's compressed step through the torch twins over the same metadata
    twin = setup.backend(batch, use_triton=False)
    current.open_session(twin.session)
    twin.init_cuda_graph_state(batch, batch)
    step = make_step(setup, setup.rows("compressed", batch))
    reset(step)
    run_parts(hybridkv_parts(twin, setup, step))
    check_fits(twin, step)
    reference = in_graph(twin, step, inputs, VALIDATION_LAYERS)
    error = max(
        float((a - b).abs().max())
        for a, b in zip(outputs["hybridkv", "compressed"], reference, strict=True)
    )
    report["compressed_max_abs_error_vs_torch_twins"] = error
    report["compressed_matches_torch_twins"] = error < 1e-4
    report["passed"] = all(
        report[k]
        for k in (
            "counts_equal_with_kernels_run",
            "outputs_finite",
            "dense_variant_equals_stock",
            "compressed_matches_torch_twins",
        )
    )
    current.reset()
    return report


# ----------------------------------------------------------------------------- goals, plot
def goals(rows: list[dict]) -> dict:
    by = {(r["system"], r["batch_kind"], r["batch"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})

    def get(system: str, kind: str, batch: int, key: str):
        return by[system, kind, batch][key]

    within = all(
        get("hybridkv", k, b, "ops_outside_graph") <= get("stock", k, b, "ops_outside_graph") + 5
        for k in KINDS
        for b in batches
    )
    lo, hi = batches[0], batches[-1]
    constant = all(
        get("hybridkv", k, lo, "ops_outside_graph") == get("hybridkv", k, hi, "ops_outside_graph")
        for k in KINDS
    )
    dense_equal = all(
        get("hybridkv", "dense", b, key) == get("stock", "dense", b, key)
        for b in batches
        for key in ("ops_outside_graph", "launches_outside_graph")
    )
    dense_equal_idle = all(
        get("hybridkv", "dense", b, "ops_outside_graph_idle")
        == get("stock", "dense", b, "ops_outside_graph")
        for b in batches
    )
    host = None
    host_ratio = {}
    if 32 in batches:
        host_ratio = {
            k: round(get("hybridkv", k, 32, "host_us") / get("stock", k, 32, "host_us"), 3)
            for k in KINDS
        }
        host = all(v <= 1.5 for v in host_ratio.values())
    flat = None
    flat_ratio = {}
    if len(batches) > 1 and lo == 1 and hi >= 128:
        flat_ratio = {
            k: round(get("hybridkv", k, hi, "host_us") / get("hybridkv", k, lo, "host_us"), 3)
            for k in KINDS
        }
        flat = all(v <= 1.2 for v in flat_ratio.values())
    dense_host_ratio = {
        b: round(get("hybridkv", "dense", b, "host_us") / get("stock", "dense", b, "host_us"), 3)
        for b in batches
    }
    dense_host_extra = {
        b: round(get("hybridkv", "dense", b, "host_us") - get("stock", "dense", b, "host_us"), 1)
        for b in batches
    }
    launches = max(get("hybridkv", "compressed", b, "launches_per_layer_in_graph") for b in batches)
    table_ratio = {
        b: round(
            get("hybridkv", "compressed", b, "table_bytes")
            / get("stock", "compressed", b, "table_bytes"),
            4,
        )
        for b in batches
    }
    return {
        "ops_outside_le_stock_plus_5_every_batch": within,
        f"ops_outside_same_at_batch_{lo}_and_{hi}": constant,
        "dense_batch_ops_outside_equal_stock": dense_equal,
        "dense_batch_ops_outside_equal_stock_no_live_compressed": dense_equal_idle,
        "host_us_batch_32_le_1_5x_stock": host,
        f"host_us_batch_{hi}_le_1_2x_batch_1": flat,
        "dense_batch_host_us_le_1_1x_stock": all(v <= 1.1 for v in dense_host_ratio.values()),
        "launches_per_layer_in_graph_le_3": launches <= round(3 + 1 / LAYERS, 3),
        "table_bytes_le_2x_stock_kv_indices": all(v <= 2.0 for v in table_ratio.values()),
        "thresholds": {
            "ops_outside_graph": "hybridkv <= stock + 5 at every batch and batch kind",
            "constant": f"hybridkv's ops outside the graph equal at batch {lo} and {hi}",
            "dense": "hybridkv's all-dense batch: exactly stock's ops and launches outside",
            "host_us": "hybridkv <= 1.5 x stock at batch 32 (both batch kinds)",
            "flat": "hybridkv's host_us at the largest batch (>= 128) <= 1.2 x at batch 1",
            "dense_host_us": "hybridkv's all-dense batch (compressed requests alive elsewhere) "
            "<= 1.1 x stock's host_us at every batch",
            "launches": "a compressed batch's Triton launches in the graph per layer <= 3, "
            "plus the step's one split-offsets launch (1/28 per layer)",
            "table_bytes": "hybridkv table_bytes <= 2 x stock's cuda_graph_kv_indices bytes",
        },
        "host_us_ratio_batch_32": host_ratio,
        f"host_us_ratio_batch_{hi}_over_1": flat_ratio,
        "dense_batch_host_us_ratio": dense_host_ratio,
        "dense_batch_host_us_extra": dense_host_extra,
        "table_bytes_ratio": table_ratio,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("ops_outside_graph", "aten ops outside the graph / step"),
        ("host_us", "host µs outside the graph / step"),
        ("ops_per_layer_in_graph", "aten ops in the graph / layer"),
        ("table_bytes", "decode table MiB (graph buffers)"),
    ]
    styles = {
        ("hybridkv", "compressed"): ("tab:red", "-", "o"),
        ("hybridkv", "dense"): ("tab:orange", "-", "s"),
        ("stock", "compressed"): ("tab:blue", "--", "o"),
        ("stock", "dense"): ("tab:cyan", ":", "s"),
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for (system, kind), (color, line, marker) in styles.items():
            pts = sorted(
                (r["batch"], r[key])
                for r in rows
                if r["system"] == system and r["batch_kind"] == kind
            )
            xs = [p[0] for p in pts]
            ys = [p[1] / 2**20 if key == "table_bytes" else p[1] for p in pts]
            ax.plot(xs, ys, color=color, linestyle=line, marker=marker, label=f"{system}, {kind}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title, fontsize=10)
        if key in ("host_us", "table_bytes"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    context = rows[0]["context"]
    fig.suptitle(
        f"Decode step overhead, Qwen2.5-VL-7B attention shapes, context {context}: hybridkv "
        "(folded decode, 10 % plans) vs stock SGLang triton backend",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, no GPU (Triton interpreter); "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> dict:
    global LAUNCHES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=1000, help="host timing repeats per row")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, 100 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = [1, 8], 100
    batches = sorted(set(args.batches))

    from hybridkv_sglang.kernels._common import interpret_enabled

    if not interpret_enabled():
        raise SystemExit("set TRITON_INTERPRET=1 before Python starts (triton was imported first)")
    import sglang
    import triton

    started = time.perf_counter()
    model_dir = Path(tempfile.mkdtemp(prefix="decode_overhead_model_"))
    publish_server_args(model_dir)
    LAUNCHES = Launches()
    try:
        setup = build_setup(args.context, max(batches), validation=False)
        static_kept = setup.static_kept
        rows: list[dict] = []
        with tqdm(total=len(batches) * len(SYSTEMS) * len(KINDS), desc="rows (counts)") as bar:
            for batch in batches:
                measured = measure_batch(setup, batch, bar)
                rows += [measured[system, kind] for kind in KINDS for system in SYSTEMS]
        with tqdm(total=ROUNDS * len(batches), desc="host time (rounds x batches)") as bar:
            time_rows(setup, rows, args.repeats, ROUNDS, bar)
        del setup
        gc.collect()
        validation = validate()
    finally:
        LAUNCHES.restore()
        shutil.rmtree(model_dir, ignore_errors=True)
    result = {
        "machine": machine(),
        "context": args.context,
        "in_graph_context": args.context,
        "batches": batches,
        "shapes": {
            "layers": LAYERS,
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "budget": BUDGET,
            "static_heads_per_layer": KV_HEADS // 2,
            "static_kept_per_head": static_kept,
            "dynamic": {"prefix": CHUNK, "chunk_size": CHUNK, "top_k": TOP_K, "window": WINDOW},
            "prompt_len": args.context - 2 * DECODED,
            "seq_len": args.context - DECODED,
            "target_programs": TARGET_PROGRAMS,
            "stock_device_core_count": H200_SMS,
        },
        "decode_metadata_reserve": metadata_reserve(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "sglang": getattr(sglang, "__version__", "?"),
        },
        "repeats": args.repeats,
        "notes": (
            "ops: aten ops seen by a TorchDispatchMode (views included), launches: Triton kernel "
            "launches (interpreter entry point, one per launch). Counting passes record launches "
            "without running them (counts do not depend on kernel results); the validation pass "
            "runs every kernel at a small context and checks the counts are the same. host_us: "
            "Python-side only, Triton launches free, torch ops on CPU; per row the lowest of "
            f"{ROUNDS} round medians (rounds spread over the run, both systems alternating step "
            "by step; host_us_rounds lists them). Dense batch: requests with "
            "nothing compressed while compressed ones are live elsewhere (ops_outside_graph_idle: "
            "none live). Stock rows of both batch kinds run the same dense code. table_bytes: "
            "the buffers after init_cuda_graph_state(bs, bs), grown from bs x H_kv rows and one "
            "index entry; build_folded_decode starts them at every req_to_token row and context "
            "x H_kv entries (reserve only grows), so a server whose largest graph batch is 2 or "
            "less, or whose request pool has more rows than that batch, holds more than its row "
            "shows. Synthetic plans: bench/synthetic_rows.py (static heads keep "
            "static_kept_per_head positions; dynamic heads' chunk index: the run's entry of "
            "decode_metadata_reserve). decode_metadata_reserve: the decode metadata pools' "
            "bytes per KV token over the KV pool's own (bf16), per storage mode."
        ),
        "rows": rows,
        "goals": goals(rows),
        "validation": validation,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    out = main()
    for row in out["rows"]:
        print(
            f"{row['system']:9s} {row['batch_kind']:10s} bs={row['batch']:4d} "
            f"ops_out={row['ops_outside_graph']:3d} launches_out={row['launches_outside_graph']} "
            f"ops/layer={row['ops_per_layer_in_graph']} host_us={row['host_us']:8.1f} "
            f"table={row['table_bytes'] / 2**20:8.2f} MiB"
        )
    print(json.dumps(out["goals"], indent=2))
    print(json.dumps(out["validation"], indent=2))
