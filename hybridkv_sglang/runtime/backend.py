"""The ``hybridkv`` attention backend: SGLang's dense backend plus two compression hook points.

Prefill runs dense. The hook points are (1) every layer of an extend forward that holds a
request's last prefill chunk (still inside the forward, so the overlap scheduler cannot race
it) and (2) decode metadata. Everything else is delegated to the device's dense backend:
FlashInfer on CUDA, SGLang's torch-native backend on CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.requests import PrefillEnd, dense_reason, find_prefill_ends
from hybridkv_sglang.runtime.stats import STATS, RequestStats

logger = logging.getLogger(__name__)


def dense_backend_name(device: str | torch.device) -> str:
    """The dense backend hybridkv wraps on this device."""
    return "flashinfer" if torch.device(device).type == "cuda" else "torch_native"


def check_supported(server_args: Any) -> None:
    """Refuse, at start-up, combinations whose dense bookkeeping would bypass the plugin."""
    refusals = {
        "speculative decoding (--speculative-algorithm)": server_args.speculative_algorithm
        is not None,
        "--page-size > 1 (hybridkv selects single tokens; use --page-size 1)": (
            server_args.page_size or 1
        )
        > 1,
        "--enable-mixed-chunk (decode rows would take the dense extend path)": bool(
            server_args.enable_mixed_chunk
        ),
        "CUDA graphs (add --disable-cuda-graph)": str(server_args.device).startswith("cuda")
        and not server_args.disable_cuda_graph,
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise NotImplementedError(
            "--attention-backend hybridkv does not support " + "; ".join(refused) + " yet"
        )


class HybridKVAttnBackend(AttentionBackend):
    """Wraps a dense backend; owns prefill-end and decode-metadata hooks."""

    forward = AttentionBackend.forward

    def __init__(self, dense: AttentionBackend, config: HybridKVConfig, num_layers: int) -> None:
        super().__init__()
        self.dense = dense
        self.config = config
        self.num_layers = num_layers
        self.prefill_ends: list[PrefillEnd] = []
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
        self.prefill_ends = []
        mode = forward_batch.forward_mode
        if mode == ForwardMode.EXTEND:
            self._on_extend_metadata(forward_batch)
        elif mode.is_decode():
            self._on_decode_metadata(forward_batch)

    def forward_extend(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.prefill_ends:
            self._on_prefill_end_layer(q, layer, forward_batch)
        return out

    def forward_decode(
        self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    # Hook points ---------------------------------------------------------------------------

    def _on_extend_metadata(self, forward_batch: Any) -> None:
        ends, extended = find_prefill_ends(forward_batch)
        for rid in extended:
            STATS.record_prefill_chunk(rid)
        self.prefill_ends = ends
        self._layers_seen = 0

    def _on_prefill_end_layer(self, q: torch.Tensor, layer: Any, forward_batch: Any) -> None:
        """Runs after every layer's dense attention of a forward holding last prefill chunks."""
        self._layers_seen += 1
        if layer.layer_id != self.num_layers - 1:
            return
        for request in self.prefill_ends:
            reason = dense_reason(request, self.config) or "compression_not_wired"
            STATS.record_prefill_end(
                RequestStats(
                    rid=request.rid,
                    prompt_tokens=request.prompt_len,
                    visual_tokens=request.visual_tokens,
                    visual_spans=list(request.visual_spans),
                    prefill_chunks=0,
                    compressed=False,
                    dense_reason=reason,
                    extra={"layers_seen": self._layers_seen},
                )
            )
            logger.info(
                "hybridkv: %s prefill end, %d prompt tokens (%d visual), dense: %s",
                request.rid,
                request.prompt_len,
                request.visual_tokens,
                reason,
            )
        self.prefill_ends = []

    def _on_decode_metadata(self, forward_batch: Any) -> None:
        STATS.record_decode_step(list(forward_batch.rids or []))


def create_hybridkv_backend(model_runner: Any) -> HybridKVAttnBackend:
    """Factory registered as ``--attention-backend hybridkv``; runs in the scheduler process."""
    config = HybridKVConfig.from_env()
    check_supported(model_runner.server_args)
    dense = ATTENTION_BACKENDS[dense_backend_name(model_runner.device)](model_runner)
    num_layers = model_runner.token_to_kv_pool.layer_num
    logger.info(
        "hybridkv: wrapping %s over %d layers with %s",
        type(dense).__name__,
        num_layers,
        config.model_dump_json(),
    )
    return HybridKVAttnBackend(dense, config, num_layers)
