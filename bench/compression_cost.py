"""What compressing one request costs at its prefill end, and how often it waits on the device.

The stages are the runtime's own calls, in the runtime's order (``PrefillCompression.observe`` /
``finish`` in ``runtime/prefill/compression.py``, then ``SchedulerSession._write_decode_metadata``
or, in ``compact`` storage, ``CompactStorage.compact``): each layer's window observation over the
prompt keys gathered from the pool (``policy.observe_layer``), the plan (``policy.finalize``:
classify, allocate, select, the CSR of kept positions; and the plan's reported stats), its
``in_place`` layout (``CompressedLayout.from_plan``), the decode records (``request_rows`` and
``DecodeMetadata.add``) and, for ``compact``, compaction (``build_compact_layout``, the copies of
``CompactStorage.fill`` into new slots and the host tier, the records over the compact entries).
They are called directly rather than through ``PrefillCompression``, whose module imports the
config (pydantic) and SGLang's allocator, neither of which a device machine has.

:class:`HostSyncCounter` counts the ops that make the host wait for a device value: scalar reads
(``.item()``, ``int()``, ``bool()``), ops whose output size depends on values (``nonzero``, boolean
masks, ``unique``, ``repeat_interleave`` without ``output_size``) and blocking copies between
devices. On a CPU every tensor is a host tensor, so the count there also holds reads of host
mirrors that cost no sync on a GPU: an upper bound, which the unit test holds constant in the
number of layers and heads.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from hybridkv_sglang.policy import CompressionPolicy, LayerObservation, build_policy
from hybridkv_sglang.runtime.session.compact_storage import CompactStorage
from hybridkv_sglang.storage.compact_layout import build_compact_layout, compact_shape
from hybridkv_sglang.storage.compact_layout import staging_slots as host_staging_slots
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RequestRows, request_rows
from hybridkv_sglang.storage.host_tier import HostTier

aten = torch.ops.aten
_VALUE_READS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero}
_VALUE_SIZED = {
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
STAGES = ("observe", "plan", "layout", "register", "compact")
"""Timed stages (``compact`` only in compact storage)."""


class HostSyncCounter(TorchDispatchMode):
    """Counts, by op, what makes the host wait for the device (see the module docstring).

    ``device_type``: ops are counted when one of their tensors lives there (``"cpu"``: every
    value read, host mirrors included).
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        reason = self._syncs(func, args, kwargs)
        if reason is not None:
            self.counts[reason] += 1
        return func(*args, **kwargs)

    def _syncs(self, func: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        indices = [t for a in args if isinstance(a, list | tuple) for t in a]
        if not any(t.device.type == self.device_type for t in tensors):
            return None
        packet = func.overloadpacket
        if packet in _VALUE_READS or packet in _VALUE_SIZED:
            return packet.__name__
        repeats_tensor = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
        if func in repeats_tensor and kwargs.get("output_size") is None:
            return "repeat_interleave"
        if packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(t, Tensor) and t.dtype == torch.bool for t in indices
        ):
            return f"{packet.__name__} (bool mask)"
        if packet in (aten._to_copy, aten.copy_) and not kwargs.get("non_blocking", False):
            src = args[1] if packet is aten.copy_ else args[0]
            dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
            if src.device.type != torch.device(dst).type:
                return f"{packet.__name__} {src.device.type}->{torch.device(dst).type}"
        return None


@dataclass
class Prompt:
    """One request at its prefill end, as the pool holds it.

    ``q_windows``: per layer ``[w, H_q, D]``; ``k_pool`` / ``v_pool``: per layer ``[slots, H_kv,
    D]`` (the prompt in slots ``req_to_token[row, :N]``, free slots after it);
    ``req_to_token``: ``[rows, ctx]`` int32; ``is_text``: ``[N]`` bool.
    """

    q_windows: list[Tensor]
    k_pool: list[Tensor]
    v_pool: list[Tensor]
    req_to_token: Tensor
    row: int
    prompt_len: int
    is_text: Tensor
    scale: float

    @property
    def device(self) -> torch.device:
        return self.req_to_token.device


class _Pool:
    """SGLang's KV pool as ``CompactStorage`` reads it."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt

    def get_key_buffer(self, layer: int) -> Tensor:
        return self.prompt.k_pool[layer]

    def get_value_buffer(self, layer: int) -> Tensor:
        return self.prompt.v_pool[layer]


def synthetic_prompt(
    prompt_len: int,
    layers: int,
    kv_heads: int,
    q_heads: int,
    head_dim: int,
    device: torch.device | str,
    dtype: torch.dtype,
    window: int = 32,
    seed: int = 0,
) -> Prompt:
    """A prompt with a text head and tail around one visual span, its keys drawn at random
    (a few keys per layer made salient, so heads differ in focus); room in the pool for
    compact entries."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots = 2 * prompt_len + 1
    k_pool, v_pool, q_windows = [], [], []
    for _ in range(layers):
        k = torch.randn(slots, kv_heads, head_dim, generator=gen, device=device)
        salient = torch.randint(0, prompt_len, (kv_heads, 64), generator=gen, device=device)
        for h in range(kv_heads // 2):  # half the heads focus on a few keys
            k[salient[h] + 1, h] *= 4
        k_pool.append(k.to(dtype))
        v = torch.randn(slots, kv_heads, head_dim, generator=gen, device=device)
        v_pool.append(v.to(dtype))
        q_windows.append(
            torch.randn(window, q_heads, head_dim, generator=gen, device=device).to(dtype)
        )
    req_to_token = torch.zeros(2, prompt_len, dtype=torch.int32, device=device)
    req_to_token[1] = torch.arange(1, prompt_len + 1, dtype=torch.int32, device=device)
    is_text = torch.ones(prompt_len, dtype=torch.bool, device=device)
    is_text[prompt_len // 16 : prompt_len - prompt_len // 16] = False
    return Prompt(q_windows, k_pool, v_pool, req_to_token, 1, prompt_len, is_text, head_dim**-0.5)


def observe(policy: CompressionPolicy, prompt: Prompt) -> list[LayerObservation]:
    """Every layer's observation, keys (and values, if asked) gathered from the pool as
    ``compression._observe`` gathers them."""
    slots = prompt.req_to_token[prompt.row, : prompt.prompt_len].to(torch.int64)
    out = []
    for layer, q_window in enumerate(prompt.q_windows):
        values = {"values": prompt.v_pool[layer][slots]} if policy.needs_values else {}
        out.append(
            policy.observe_layer(
                layer, q_window, prompt.k_pool[layer][slots], prompt.scale, **values
            )
        )
    return out


def records_meta(
    rows: RequestRows, layers: int, heads: int, pool_rows: int, copies: int = 2
) -> DecodeMetadata:
    """Decode metadata pools that hold ``copies`` of ``rows`` (a re-add allocates before it
    frees), as the server sizes them at start-up."""
    return DecodeMetadata(
        layers,
        heads,
        max(rows.kmin.shape[1], 1),
        max_requests=copies,
        pool_rows=pool_rows,
        fixed_capacity=copies * rows.fixed_values.numel(),
        bound_capacity=copies * rows.kmin.shape[0],
        param_capacity=copies * rows.bound_channels.shape[0],
        candidate_capacity=copies * rows.candidate_slots,
        top_capacity=copies * rows.top_slots,
        bound_dtype=rows.kmin.dtype if rows.kmin.numel() else torch.uint8,
        device=rows.fixed_values.device,
        stage_capacity=copies * rows.stage_slots,
        host_id_capacity=copies * rows.host_chunk_ids.numel(),
    )


@dataclass
class Compressor:
    """One request's compression, stage by stage, over fixed pools (built by :meth:`setup`)."""

    policy: CompressionPolicy
    prompt: Prompt
    storage: str
    meta: DecodeMetadata
    host_tier: HostTier | None = None
    staging_slack: float = 1.0

    @classmethod
    def setup(cls, prompt: Prompt, storage: str, budget: float = 0.1) -> Compressor:
        """The server's policy at ``budget``, and pools sized from one untimed run."""
        policy = build_policy("hybridkv", budget=budget)
        layout = CompressedLayout.from_plan(
            policy.finalize(observe(policy, prompt), prompt.is_text), prompt.device
        )
        layers, heads = len(prompt.k_pool), prompt.k_pool[0].shape[1]
        host_tier = None
        if storage == "compact":
            staging = host_staging_slots(layout.dynamic_rows, layout.top_k_chunks, 1.0)
            chunks = compact_shape(layout, staging).host_chunks
            dim = prompt.k_pool[0].shape[-1]
            host_tier = HostTier(
                2 * chunks, layout.dynamic_rows.chunk_size, dim, dim, prompt.k_pool[0].dtype,
                pin_memory=prompt.device.type == "cuda",
            )  # fmt: skip
        pool_rows = prompt.req_to_token.shape[0]
        meta = records_meta(request_rows(layout), layers, heads, pool_rows)
        compressor = cls(policy, prompt, storage, meta, host_tier)
        if storage == "compact":
            _, rows = compressor.compact(layout)
            compressor.meta = records_meta(rows, layers, heads, pool_rows)
        return compressor

    def run(self, clock: Callable[[str], None] = lambda stage: None) -> CompressedLayout:
        """Compress the request once; ``clock(stage)`` is called as each stage ends."""
        observations = observe(self.policy, self.prompt)
        clock("observe")
        plan = self.policy.finalize(observations, self.prompt.is_text)
        plan.reported_stats()
        clock("plan")
        layout = CompressedLayout.from_plan(plan, self.prompt.device)
        clock("layout")
        if not self.meta.add(self.prompt.row, request_rows(layout)):
            raise RuntimeError("decode metadata pools too small")
        clock("register")
        if self.storage == "compact":
            compact, rows = self.compact(layout)
            if not self.meta.add(self.prompt.row, rows):
                raise RuntimeError("decode metadata pools too small")
            if self.host_tier is not None:
                self.host_tier.free(compact.host_chunk_ids)
            clock("compact")
        return layout

    def compact(self, layout: CompressedLayout) -> tuple[Any, RequestRows]:
        """``CompactStorage.compact`` without SGLang's allocator: new slots after the prompt,
        the host tier's chunks for the dynamic heads, the copies, the records."""
        prompt = self.prompt
        staging = None
        host_ids = None
        if self.host_tier is not None:
            staging = host_staging_slots(layout.dynamic_rows, layout.top_k_chunks, 1.0)
            host_ids = self.host_tier.alloc(compact_shape(layout, staging).host_chunks)
            if host_ids is None:
                raise RuntimeError("host tier too small")
        shape = compact_shape(layout, staging)
        start = prompt.prompt_len + 1
        slots = torch.arange(start, start + shape.num_slots, device=prompt.device)
        prompt_slots = prompt.req_to_token[prompt.row, : prompt.prompt_len].to(torch.int64)
        compact, copies = build_compact_layout(layout, prompt_slots, slots, host_ids, staging)
        rows = request_rows(layout, compact)
        storage = CompactStorage(
            _Pool(prompt), len(prompt.k_pool), self.host_tier, self.meta, self.staging_slack
        )
        storage.fill(copies)
        return compact, rows


def count_syncs(compressor: Compressor) -> HostSyncCounter:
    """Host syncs of one compression, by op."""
    counter = HostSyncCounter(compressor.prompt.device.type)
    with counter:
        compressor.run()
    return counter


class _StageClock:
    """``clock(stage)``: ms since the last stage ended (the device drained first on CUDA, so a
    stage's queued work is charged to it)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, float] = {}
        self._drain()
        self.last = time.perf_counter()

    def _drain(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, stage: str) -> None:
        self._drain()
        now = time.perf_counter()
        self.marks[stage] = (now - self.last) * 1e3
        self.last = now


def time_stages(compressor: Compressor, repeats: int) -> dict[str, float]:
    """Median ms of each stage over ``repeats`` compressions, and the sum of the medians."""
    cuda = compressor.prompt.device.type == "cuda"
    runs = []
    for _ in range(repeats):
        clock = _StageClock(cuda)
        compressor.run(clock)
        runs.append(clock.marks)
    stages = [s for s in STAGES if s in runs[0]]
    out = {f"{s}_ms": statistics.median(r[s] for r in runs) for s in stages}
    out["total_ms"] = sum(out.values())
    return out
