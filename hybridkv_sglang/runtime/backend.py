"""The ``hybridkv`` attention backend: SGLang's dense backend plus two compression hook points.

Prefill runs dense. The hook points are (1) every layer of an extend forward that holds a
request's last prefill chunk (still inside the forward, so the overlap scheduler cannot race
it) and (2) decode metadata. Everything else is delegated to the device's dense backend:
FlashInfer on CUDA, SGLang's torch-native backend on CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from hybridkv_sglang.attention.folded_decode import FoldedDecode
from hybridkv_sglang.config import HybridKVConfig, HybridKVConfigError
from hybridkv_sglang.policy import CompressionPolicy, build_policy
from hybridkv_sglang.runtime.decode.crossover import Crossover
from hybridkv_sglang.runtime.decode.graph_variants import (
    DENSE,
    SPARSE,
    capture_variant,
)
from hybridkv_sglang.runtime.prefill.compression import PrefillCompression
from hybridkv_sglang.runtime.prefill.requests import (
    PrefillChunk,
    PrefillEnd,
    dense_reason,
    find_prefill_ends,
)
from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession

logger = logging.getLogger(__name__)


class HybridKVAttnBackend(AttentionBackend):
    """Wraps a dense backend; owns prefill-end and decode hooks."""

    forward = AttentionBackend.forward

    def __init__(
        self,
        dense: AttentionBackend,
        session: SchedulerSession,
        num_layers: int,
        folded: FoldedDecode | None = None,
        crossover: Crossover | None = None,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.session = session
        self.config = session.config
        self.num_layers = num_layers
        self.folded = folded
        self.decode_meta = session.decode_meta
        self.stats = session.stats
        self._policies: dict[tuple[Any, ...], CompressionPolicy] = {}
        """Policies by hyper-parameters: one per distinct budget requests ask for."""
        self.policy = self._policy_for(self.config)
        self.prefill_compression: PrefillCompression | None = None
        self.middle_chunks: list[PrefillChunk] = []
        self._sparse_step = False
        """This forward's decode runs over the folded tables (else: the dense backend)."""
        self._selected_variant = DENSE
        """The decode-graph variant SGLang chose for the batch it is about to replay."""
        self._last_batch: tuple[Any, int] = (None, -1)
        """The last decode batch looked up: its host pool-row tensor (SGLang keeps one while
        the batch does not change) and the metadata's version then (see batch_is_sparse)."""
        self._last_rows = np.zeros(0, dtype=np.int64)
        self._last_compressed = False
        self._last_retrieval = (0, 0)
        """The last compressed batch's most (chunks, selected chunks) of a dynamic row."""
        self._last_may_cross = False
        """The last batch is small enough, and all in place, to decode dense below the
        crossover (which then depends on its context, checked every step)."""
        self._last_crossover = False
        """The last batch holds compressed requests but decodes dense: below the crossover."""
        self.crossover = crossover or Crossover()
        self._on_cuda = torch.cuda.is_available()
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

    # Which decode batches are sparse (host only) ---------------------------------------------

    def batch_is_sparse(self, forward_batch: Any) -> bool:
        """Whether this decode batch decodes over the folded tables: it holds a compressed
        request and is not below the crossover. Host only, and looked up again only when the
        batch or the metadata changed (SGLang asks for the graph check, the variant and the
        metadata of every step, and keeps the batch's pool-row tensor while the batch stays)."""
        rows_cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
        meta = self.decode_meta
        if rows_cpu is None or meta is None:
            return False
        if rows_cpu is not self._last_batch[0] or meta.version != self._last_batch[1]:
            self._last_batch = (rows_cpu, meta.version)
            rows = self._last_rows = rows_cpu.numpy()[: forward_batch.batch_size]
            self._last_compressed = meta.batch_has_compressed(rows)
            if self._last_compressed:
                self._last_retrieval = meta.retrieval_bounds(rows)
            self._last_may_cross = (
                self._last_compressed
                and len(rows) < self.crossover.largest_min_batch
                and not meta.compact_rows[rows].any()
            )
        self._last_crossover = self._last_may_cross and self._dense_is_faster(forward_batch)
        return self._last_compressed and not self._last_crossover

    def _dense_is_faster(self, forward_batch: Any) -> bool:
        """Below the device's crossover a small batch of in-place requests decodes dense (host
        only: batch size and the host's sequence lengths)."""
        context = int(_host_seq_lens(forward_batch).max())
        return self.crossover.prefers_dense(len(self._last_rows), context)

    def _count_dense_step(self) -> None:
        self.stats.count("dense_decode_steps")
        if self._last_crossover:
            self.stats.count("dense_crossover_steps")

    def select_graph_variant(self, forward_batch: Any) -> str:
        """SGLang's variant choice before a replay (remembered for the replay's metadata)."""
        self._selected_variant = SPARSE if self.batch_is_sparse(forward_batch) else DENSE
        return self._selected_variant

    def graph_misfit(self, forward_batch: Any) -> str | None:
        """Why this decode batch cannot replay a graph (``None``: it can); counted."""
        if self.folded is None or not forward_batch.forward_mode.is_decode():
            return None
        if not self.batch_is_sparse(forward_batch):
            return None
        assert self.decode_meta is not None
        rows = self._last_rows
        reason = None
        retrieval = self._last_retrieval
        if not self.folded.fits(len(rows), retrieval):
            reason = (
                f"{len(rows)} requests or (chunks, top-k) {retrieval} exceed the graph's buffers"
            )
        if reason is not None:
            self.stats.count("graph_fallbacks")
            logger.debug("hybridkv: decode batch runs eagerly: %s", reason)
        return reason

    # Metadata --------------------------------------------------------------------------------

    def _begin_forward(self) -> None:
        storage = self.session.compact_storage
        if storage is not None and self._on_cuda:
            storage.forward_stream = torch.cuda.current_stream()
        if self.decode_meta is not None:
            self.decode_meta.apply_releases()
        self.prefill_compression = None
        self.middle_chunks = []
        self._sparse_step = False

    def init_forward_metadata(self, forward_batch: Any) -> None:
        self._begin_forward()
        mode = forward_batch.forward_mode
        if mode.is_decode() and self.folded is not None and self.batch_is_sparse(forward_batch):
            self._sparse_step = True
            self.folded.begin_step(
                forward_batch.req_pool_indices, forward_batch.seq_lens, self._last_retrieval
            )
            self.stats.count("sparse_decode_steps")
            return
        if mode.is_decode():
            self._count_dense_step()
        self.dense.init_forward_metadata(forward_batch)
        if mode == ForwardMode.EXTEND:
            self._on_extend_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """The dense backend's graph state, and step buffers the largest graph batch fits."""
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        if self.folded is not None:
            self.folded.reserve(max_bs * self.dense.token_to_kv_pool.head_num)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False):
        """Before a decode graph's capture or replay: the ``dense`` variant does what the dense
        backend does; the ``hybridkv`` variant nothing but O(1) bookkeeping."""
        if not forward_batch.forward_mode.is_decode():
            return self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)
        if self.folded is not None:
            self._begin_forward()
        variant = capture_variant() if in_capture else self._selected_variant
        if self.folded is None or variant != SPARSE:
            if not in_capture:
                self._count_dense_step()
            return self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)
        self._sparse_step = True
        if not in_capture:
            self.stats.count("sparse_decode_steps")
        return None

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        """Inside the decode graph: every layer's split offsets for the ``hybridkv`` variant."""
        if not self._sparse_step:
            return self.dense.init_forward_metadata_in_graph(forward_batch)
        assert self.folded is not None
        self.folded.begin_step(forward_batch.req_pool_indices, forward_batch.seq_lens)
        return None

    # Forward ---------------------------------------------------------------------------------

    def forward_extend(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.middle_chunks:
            rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            for chunk in self.middle_chunks:
                self.session.window_tails.record(chunk, layer.layer_id, rows)
        if self.prefill_compression is not None:
            self._on_prefill_end_layer(q, layer)
        return out

    def forward_decode(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        if not self._sparse_step:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        assert self.folded is not None
        pool = self.dense.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        heads, dim = pool.head_num, layer.qk_head_dim
        group = layer.tp_q_head_num // heads
        q_rows = q.reshape(-1, heads * group, dim).reshape(-1, group, dim)
        k_buffer = pool.get_key_buffer(layer.layer_id)
        v_buffer = pool.get_value_buffer(layer.layer_id)
        self.folded.retrieve(layer.layer_id, q_rows, k_buffer, v_buffer)
        out = self.folded.attend(
            layer.layer_id,
            q_rows,
            k_buffer,
            v_buffer,
            self.dense.req_to_token_pool.req_to_token,
            layer.scaling,
        )
        return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    # Hook points ---------------------------------------------------------------------------

    def _on_extend_metadata(self, forward_batch: Any) -> None:
        scheduled = self.session.extend_batches.find(forward_batch.rids)
        ends, self.middle_chunks, extended = find_prefill_ends(forward_batch, scheduled)
        for rid in extended:
            self.stats.record_prefill_chunk(rid)
        if ends:
            self.prefill_compression = PrefillCompression(
                [self._plan_request(r) for r in ends],
                self.num_layers,
                self.session.window_tails,
                self.session.tp,
            )

    def _plan_request(
        self, request: PrefillEnd
    ) -> tuple[PrefillEnd, str | None, CompressionPolicy]:
        """The request, why it stays dense (``None``: it is compressed) and the policy at its own
        budget (``custom_params``, validated when it arrived; built once per distinct budget)."""
        try:
            config = self.config.for_request(request.custom_params)
        except HybridKVConfigError as err:
            logger.warning("hybridkv: %s served dense: %s", request.rid, err)
            return request, "invalid_request_params", self.policy
        reason = dense_reason(request, config)
        if reason == "disabled" and self.config.enabled:
            reason = "disabled_by_request"
        return request, reason, self._policy_for(config)

    def _policy_for(self, config: HybridKVConfig) -> CompressionPolicy:
        values = config.policy_values()
        key = tuple(values.items())
        if key not in self._policies:
            self._policies[key] = build_policy(config.policy, **values)
        return self._policies[key]

    def _on_prefill_end_layer(self, q: torch.Tensor, layer: Any) -> None:
        """Runs after every layer's dense attention of a forward holding last prefill chunks."""
        pool = self.dense.token_to_kv_pool
        req_to_token = self.dense.req_to_token_pool.req_to_token
        compression = self.prefill_compression
        compression.observe(
            layer,
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            pool.get_key_buffer(layer.layer_id),
            req_to_token,
            pool.get_value_buffer(layer.layer_id),
        )
        if layer.layer_id != self.num_layers - 1:
            return
        device = pool.get_key_buffer(layer.layer_id).device
        outcomes = compression.finish(device, pool, req_to_token)
        self.session.register(outcomes, compression.eligible, device)
        self.prefill_compression = None


def _host_seq_lens(forward_batch: Any):
    """The batch's dense lengths on the host (SGLang keeps this mirror for decode batches)."""
    return forward_batch.seq_lens_cpu.numpy()[: forward_batch.batch_size]
