"""The ``hybridkv`` attention backend: SGLang's dense backend plus two compression hook points.

Prefill runs dense. The hook points are (1) every layer of an extend forward that holds a
request's last prefill chunk (still inside the forward, so the overlap scheduler cannot race
it) and (2) decode metadata. Everything else is delegated to the device's dense backend:
FlashInfer on CUDA, SGLang's torch-native backend on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from hybridkv_sglang.attention.sparse_decode import (
    FlashInferFoldedDecode,
    sparse_decode_reference,
)
from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.policy import build_policy
from hybridkv_sglang.runtime import compaction, window_prefill
from hybridkv_sglang.runtime.compressed_requests import COMPRESSED, CompressedRequest
from hybridkv_sglang.runtime.graph_decode import DECODE_BATCHES, GraphDecode, graph_limits
from hybridkv_sglang.runtime.prefill_compression import PrefillCompression
from hybridkv_sglang.runtime.requests import PrefillChunk, dense_reason, find_prefill_ends
from hybridkv_sglang.runtime.stats import STATS
from hybridkv_sglang.runtime.window_queries import WINDOW_TAILS
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from hybridkv_sglang.storage.host_tier import HostTier
from hybridkv_sglang.storage.static_decode import StaticDecodeTables

logger = logging.getLogger(__name__)


def dense_backend_name(device: str | torch.device) -> str:
    """The dense backend hybridkv wraps on this device."""
    return "flashinfer" if torch.device(device).type == "cuda" else "torch_native"


def check_supported(
    server_args: Any, sliding_window_size: int | None, storage: str = "in_place"
) -> None:
    """Refuse, at start-up, combinations whose dense bookkeeping would bypass the plugin."""
    compact = storage == "compact"
    refusals = {
        "models with sliding-window attention layers": sliding_window_size is not None
        and sliding_window_size > 0,
        "speculative decoding (--speculative-algorithm)": server_args.speculative_algorithm
        is not None,
        "--page-size > 1 (hybridkv selects single tokens; use --page-size 1)": (
            server_args.page_size or 1
        )
        > 1,
        "--enable-mixed-chunk (decode rows would take the dense extend path)": bool(
            server_args.enable_mixed_chunk
        ),
        "prefill CUDA graphs (add --disable-prefill-cuda-graph; decode CUDA graphs are "
        "supported)": str(server_args.device).startswith("cuda")
        and prefill_graph_backend(server_args) != "disabled",
        "storage='compact' without the radix cache (remove --disable-radix-cache)": compact
        and bool(server_args.disable_radix_cache),
        "storage='compact' with --enable-hierarchical-cache": compact
        and bool(server_args.enable_hierarchical_cache),
        "storage='compact' with PD disaggregation": compact
        and str(server_args.disaggregation_mode) != "null",
        "storage='compact' with --tp-size/--pp-size/--dp-size > 1 (slot decisions must match "
        "across ranks)": compact
        and max(server_args.tp_size, server_args.pp_size, server_args.dp_size) > 1,
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise NotImplementedError(
            "--attention-backend hybridkv does not support " + "; ".join(refused) + " yet"
        )


def prefill_graph_backend(server_args: Any) -> str:
    """The prefill CUDA-graph backend SGLang resolved (``"disabled"`` when off)."""
    if server_args.disable_cuda_graph or getattr(server_args, "disable_prefill_cuda_graph", False):
        return "disabled"
    config = getattr(server_args, "cuda_graph_config", None)
    prefill = getattr(config, "prefill", None)
    return str(getattr(prefill, "backend", "disabled"))


@dataclass(frozen=True)
class DecodeGeometry:
    """What the fixed decode buffers are sized from (read once from the model runner)."""

    group_size: int
    head_dim: int
    max_context_len: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    device: torch.device


class HybridKVAttnBackend(AttentionBackend):
    """Wraps a dense backend; owns prefill-end and decode-metadata hooks."""

    forward = AttentionBackend.forward

    def __init__(
        self,
        dense: AttentionBackend,
        config: HybridKVConfig,
        num_layers: int,
        geometry: DecodeGeometry | None = None,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.config = config
        self.num_layers = num_layers
        self.geometry = geometry
        self.policy = build_policy(config.policy, **config.policy_values())
        self.prefill_compression: PrefillCompression | None = None
        self.middle_chunks: list[PrefillChunk] = []
        self.decode_batch: DecodeBatchLayout | None = None
        self._folded_decode: FlashInferFoldedDecode | None = None
        self.graph: GraphDecode | None = None
        self._planned_shape: torch.Tensor | None = None
        """Host indptr of the last eager sparse-decode layer (its FlashInfer plan's shape)."""
        self._static_step = False
        """This forward's decode reads the fixed buffers (a graph replay, or eager when
        ``static_tables_eager``)."""
        self._delegate_base_api()

    def _delegate_base_api(self) -> None:
        """Bind the dense backend's capability flags and methods we do not change.

        ``AttentionBackend`` defines these on the class, so ``__getattr__`` never sees them.
        """
        own = set(type(self).__dict__)
        for name, value in vars(AttentionBackend).items():
            if name.startswith("__") or name in own or isinstance(value, property):
                continue
            setattr(self, name, getattr(self.dense, name))

    def __getattr__(self, name: str) -> Any:
        if name == "dense":
            raise AttributeError(name)
        return getattr(self.dense, name)

    @property
    def forward_metadata(self) -> Any:
        return self.dense.forward_metadata

    @forward_metadata.setter
    def forward_metadata(self, value: Any) -> None:
        self.dense.forward_metadata = value

    def init_forward_metadata(self, forward_batch: Any) -> None:
        self.dense.init_forward_metadata(forward_batch)
        storage = compaction.installed()
        if storage is not None and torch.cuda.is_available():
            storage.forward_stream = torch.cuda.current_stream()
        self.prefill_compression = None
        self.middle_chunks = []
        self.decode_batch = None
        self._static_step = False
        mode = forward_batch.forward_mode
        if mode == ForwardMode.EXTEND:
            self._on_extend_metadata(forward_batch)
        elif mode.is_decode():
            self._on_decode_metadata(forward_batch)
            if self.config.static_tables_eager:
                self._stage_static_step(self.decode_batch, eager=True)

    # CUDA graphs (decode) ---------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """The dense backend's graph state (graphs of other modes stay its own), plus the fixed
        decode tables when compression is on."""
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        if self.config.enabled:
            self.graph = self.build_graph_decode(max_bs)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False):
        """Before a decode graph's capture or replay (host side): stage the fixed tables."""
        if self.graph is None or not forward_batch.forward_mode.is_decode():
            return self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)
        self.prefill_compression = None
        self.middle_chunks = []
        self.decode_batch = self._replay_batch(forward_batch, in_capture)
        self._stage_static_step(self.decode_batch, eager=False)
        return None

    def graph_misfit(self, forward_batch: Any) -> str | None:
        """Why this decode batch cannot replay a graph (``None``: it can); counted."""
        if self.graph is None or not forward_batch.forward_mode.is_decode():
            return None
        if forward_batch.seq_lens_cpu is None:
            reason = "no host seq_lens"
        else:
            reason = self.graph.misfit(self._batch_layout(forward_batch))
        if reason is not None:
            STATS.count("graph_fallbacks")
            logger.debug("hybridkv: decode batch runs eagerly: %s", reason)
        return reason

    def forward_extend(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.middle_chunks:
            rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            for chunk in self.middle_chunks:
                WINDOW_TAILS.record(chunk, layer.layer_id, rows)
        if self.prefill_compression is not None:
            self._on_prefill_end_layer(q, layer)
        return out

    def forward_decode(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        if self._static_step:
            return self._static_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if self.decode_batch is None or not self.decode_batch.has_compressed:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self._sparse_decode(q, k, v, layer, forward_batch, save_kv_cache)

    # Hook points ---------------------------------------------------------------------------

    def _on_extend_metadata(self, forward_batch: Any) -> None:
        ends, self.middle_chunks, extended = find_prefill_ends(forward_batch)
        for rid in extended:
            STATS.record_prefill_chunk(rid)
        if ends:
            self.prefill_compression = PrefillCompression(
                self.policy,
                [(r, dense_reason(r, self.config)) for r in ends],
                self.num_layers,
                WINDOW_TAILS,
            )

    def _on_prefill_end_layer(self, q: torch.Tensor, layer: Any) -> None:
        """Runs after every layer's dense attention of a forward holding last prefill chunks."""
        pool = self.dense.token_to_kv_pool
        self.prefill_compression.observe(
            layer,
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            pool.get_key_buffer(layer.layer_id),
            self.dense.req_to_token_pool.req_to_token,
            pool.get_value_buffer(layer.layer_id),
        )
        if layer.layer_id != self.num_layers - 1:
            return
        device = pool.get_key_buffer(layer.layer_id).device
        for outcome in self.prefill_compression.finish(device):
            request = outcome.request
            WINDOW_TAILS.drop(request.rid)
            if outcome.layout is not None:
                COMPRESSED.add(CompressedRequest(request.rid, request.req_pool_idx, outcome.layout))
            STATS.record_prefill_end(outcome.stats())
            logger.info("hybridkv: %s", outcome.summary())
        self.prefill_compression = None

    def _flashinfer_decode(
        self, group: int, head_dim: int, device: torch.device
    ) -> FlashInferFoldedDecode:
        """One FlashInfer folded-decode wrapper per backend, planned per layer and step."""
        if self._folded_decode is None:
            self._folded_decode = FlashInferFoldedDecode(group, head_dim, device)
        return self._folded_decode

    def _on_decode_metadata(self, forward_batch: Any) -> None:
        STATS.record_decode_step(list(forward_batch.rids or []))
        self.decode_batch = self._batch_layout(forward_batch)

    def _batch_layout(self, forward_batch: Any) -> DecodeBatchLayout:
        """The decode batch's layouts, from a real ``ForwardBatch`` (rids and host pool rows)."""
        rids = list(forward_batch.rids or [])
        pool_rows = forward_batch.req_pool_indices_cpu
        if pool_rows is None:
            pool_rows = forward_batch.req_pool_indices.cpu()
        return self._layouts_for(rids, pool_rows.tolist(), forward_batch.seq_lens_cpu.tolist())

    def _layouts_for(
        self, rids: list[str], pool_rows: list[int], seq_lens: list[int]
    ) -> DecodeBatchLayout:
        layouts = [
            COMPRESSED.layout_for(rid, row) for rid, row in zip(rids, pool_rows, strict=True)
        ]
        padding = len(seq_lens) - len(rids)  # a graph's padded requests read slot 0, densely
        return DecodeBatchLayout(
            req_pool_indices=pool_rows + [0] * padding,
            seq_lens=seq_lens,
            layouts=layouts + [None] * padding,
            num_kv_heads=self.dense.token_to_kv_pool.head_num,
        )

    def _replay_batch(self, view: Any, in_capture: bool) -> DecodeBatchLayout:
        """The batch behind a graph's replay view, which has no rids (see ``graph_decode``)."""
        if view.seq_lens_cpu is None:
            raise RuntimeError("hybridkv: a decode graph replay came without host seq_lens")
        seq_lens = view.seq_lens_cpu[: view.batch_size].tolist()
        record = None if in_capture else DECODE_BATCHES.find(view.out_cache_loc)
        if record is None:
            if not in_capture and len(COMPRESSED):
                raise RuntimeError(
                    "hybridkv: a decode graph replay whose batch was never recorded at "
                    "ForwardBatch.init_new; compressed requests cannot be matched to it"
                )
            return self._layouts_for([], [], seq_lens)
        if list(record.seq_lens) != seq_lens[: len(record.seq_lens)]:
            raise RuntimeError(
                f"hybridkv: a decode graph replay does not match its recorded batch (seq_lens "
                f"{seq_lens} vs {list(record.seq_lens)})"
            )
        STATS.record_decode_step(list(record.rids))
        return self._layouts_for(list(record.rids), list(record.req_pool_indices), seq_lens)

    def _stage_static_step(self, batch: DecodeBatchLayout | None, eager: bool) -> None:
        if self.graph is None or batch is None:
            return
        if eager and self.graph.misfit(batch) is not None:
            STATS.count("static_table_misfits")
            return
        assert self.geometry is not None  # the graph was built from it
        self.graph.stage(batch, self.dense.req_to_token_pool.req_to_token, self.geometry.kv_dtype)
        self._static_step = True
        STATS.count("static_table_steps")

    def build_graph_decode(self, max_bs: int) -> GraphDecode:
        """The fixed decode buffers for batches of up to ``max_bs`` requests."""
        geo = self.geometry
        if geo is None:
            raise RuntimeError("hybridkv: fixed decode tables need the model's decode geometry")
        pool = self.dense.token_to_kv_pool
        cfg = self.config
        limits = graph_limits(
            max_bs,
            pool.head_num,
            geo.max_context_len,
            cfg.chunk_size,
            cfg.top_k_chunks,
            cfg.graph_table_entries,
            cfg.graph_bound_chunks,
        )
        tables = StaticDecodeTables(
            self.num_layers, pool.head_num, geo.head_dim, limits, geo.kv_dtype, geo.device
        )
        logger.info(
            "hybridkv: fixed decode tables for %d rows, %d entries and %d chunk bounds per "
            "layer (%.1f MiB)",
            limits.max_rows,
            limits.max_entries,
            limits.max_bound_chunks,
            tables.nbytes / 2**20,
        )
        return GraphDecode(tables, geo.group_size, geo.head_dim, geo.q_dtype)

    def _static_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        """One layer over the fixed buffers: device work only, so it can be captured."""
        assert self.graph is not None
        pool = self.dense.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        heads, dim = pool.head_num, layer.qk_head_dim
        group = layer.tp_q_head_num // heads
        out = self.graph.attend(
            layer.layer_id,
            q.reshape(-1, heads, group, dim).reshape(-1, group, dim),
            pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id),
            self.dense.req_to_token_pool.req_to_token,
            layer.scaling,
        )
        return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    def _sparse_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        """One sparse call over every (request, kv head) row of this layer."""
        pool = self.dense.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        heads, dim = pool.head_num, layer.qk_head_dim
        group = layer.tp_q_head_num // heads
        q_rows = q.reshape(-1, heads, group, dim).reshape(-1, group, dim)
        storage = compaction.installed()
        table = self.decode_batch.layer_table(
            layer.layer_id,
            q_rows,
            self.dense.req_to_token_pool.req_to_token,
            stager=None if storage is None else storage.stager,
        )
        k_buffer = pool.get_key_buffer(layer.layer_id)
        v_buffer = pool.get_value_buffer(layer.layer_id)
        shape = self._planned_shape
        new_shape = shape is None or not torch.equal(shape, table.kv_indptr_host)
        if new_shape:
            self._planned_shape = table.kv_indptr_host
        STATS.count("decode_layer_tables")
        STATS.count("decode_plans", int(new_shape))  # FlashInfer plans once per row shape
        if k_buffer.is_cuda:
            decode = self._flashinfer_decode(group, dim, k_buffer.device)
            decode.plan(
                table, q_dtype=q_rows.dtype, kv_dtype=k_buffer.dtype, sm_scale=layer.scaling
            )
            out = decode.run(q_rows.contiguous(), k_buffer, v_buffer)
        else:
            out = sparse_decode_reference(
                q_rows,
                k_buffer.view(-1, dim),
                v_buffer.view(-1, layer.v_head_dim),
                table.kv_indptr,
                table.kv_indices,
                layer.scaling,
            )
        return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)


def create_hybridkv_backend(model_runner: Any) -> HybridKVAttnBackend:
    """Factory registered as ``--attention-backend hybridkv``; runs in the scheduler process."""
    config = HybridKVConfig.from_env()
    check_supported(
        model_runner.server_args,
        getattr(model_runner, "sliding_window_size", None),
        config.storage,
    )
    dense = ATTENTION_BACKENDS[dense_backend_name(model_runner.device)](model_runner)
    num_layers = model_runner.token_to_kv_pool.layer_num
    WINDOW_TAILS.window = config.window
    window_prefill.install(config)
    compaction.install(
        create_compact_storage(config, model_runner.token_to_kv_pool, num_layers)
        if config.storage == "compact" and config.enabled
        else None
    )
    logger.info(
        "hybridkv: wrapping %s over %d layers with %s",
        type(dense).__name__,
        num_layers,
        config.model_dump_json(),
    )
    backend = HybridKVAttnBackend(dense, config, num_layers, decode_geometry(model_runner))
    if config.enabled and config.static_tables_eager:
        backend.graph = backend.build_graph_decode(model_runner.req_to_token_pool.size)
    return backend


def decode_geometry(model_runner: Any) -> DecodeGeometry:
    """Head shapes, context length and dtypes of the model this backend serves."""
    from sglang.srt.runtime_context import get_parallel

    pool = model_runner.token_to_kv_pool
    key = pool.get_key_buffer(0)
    q_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
    return DecodeGeometry(
        group_size=max(1, q_heads // pool.head_num),
        head_dim=key.shape[-1],
        max_context_len=model_runner.req_to_token_pool.req_to_token.shape[1],
        q_dtype=model_runner.dtype,
        kv_dtype=key.dtype,
        device=key.device,
    )


def create_compact_storage(
    config: HybridKVConfig, kv_pool: Any, num_layers: int
) -> compaction.CompactStorage:
    """Compact storage over SGLang's pool, with a host tier of ``config.host_tier_mib``."""
    host_tier = None
    if config.host_tier_mib > 0:
        k, v = kv_pool.get_key_buffer(0), kv_pool.get_value_buffer(0)
        host_tier = HostTier.sized(
            config.host_tier_mib,
            config.chunk_size,
            k.shape[-1],
            v.shape[-1],
            k.dtype,
            pin=k.is_cuda,
        )
        logger.info(
            "hybridkv: host tier of %d chunks (%.1f MiB) for dynamic heads",
            host_tier.capacity,
            config.host_tier_mib,
        )
    return compaction.CompactStorage(kv_pool, num_layers, host_tier)
