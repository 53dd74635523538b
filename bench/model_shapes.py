"""The rest of a 7B model around its attention, for projecting per-token time on a device check.

Qwen2.5-VL-7B's language model: hidden 3584, 28 q / 4 kv heads of 128, intermediate 18944,
28 layers, vocabulary 152064, bf16. :class:`LinearModel` holds every layer's projections (qkv, o,
gate/up, down) and the lm_head with random weights: a decode step's linear part is one CUDA
graph of all of them at a batch size; a prefill's dense work is one layer's projections and
causal attention over the prompt, timed, times the layer count. Norms, RoPE and the MLP's
activation are left out of the decode graph (element-wise over ``[B, 3584]``: microseconds).
Imports neither SGLang nor anything CUDA-only, so the dry run exercises it on CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention, silu


@dataclass(frozen=True)
class ModelShape:
    """A decoder's linear sizes (defaults: Qwen2.5-VL-7B)."""

    hidden: int = 3584
    q_heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 18944
    layers: int = 28
    vocab: int = 152064

    @property
    def qkv_out(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def parameters(self) -> int:
        """Weights of the linear layers and the lm_head."""
        per_layer = self.hidden * (self.qkv_out + self.q_heads * self.head_dim)
        per_layer += 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.hidden * self.vocab


DRY_MODEL = ModelShape(
    hidden=64, q_heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2, vocab=256
)


class LinearModel:
    """Every layer's projection weights (``[in, out]``, distinct per layer, so a step streams
    them all from HBM as a real model does) and the lm_head."""

    def __init__(self, shape: ModelShape, device: str, dtype: torch.dtype) -> None:
        self.shape = shape
        gen = torch.Generator(device=device).manual_seed(0)

        def weight(rows: int, cols: int) -> Tensor:
            return (torch.randn(rows, cols, generator=gen, device=device) / rows**0.5).to(dtype)

        h, q_out = shape.hidden, shape.q_heads * shape.head_dim
        self.layers = [
            (
                weight(h, shape.qkv_out),
                weight(q_out, h),
                weight(h, 2 * shape.intermediate),
                weight(shape.intermediate, h),
            )
            for _ in range(shape.layers)
        ]
        self.lm_head = weight(h, shape.vocab)
        self.bytes = shape.parameters * torch.empty((), dtype=dtype).element_size()

    def layer(self, layer: int, x: Tensor, attention: Callable[[Tensor], Tensor]) -> Tensor:
        """One layer on ``x [T, hidden]``; ``attention`` maps the qkv projection to ``[T, H_q
        D]``."""
        qkv, o, gate_up, down = self.layers[layer]
        x = x + attention(x @ qkv) @ o
        gate, up = (x @ gate_up).chunk(2, dim=-1)
        return x + (silu(gate) * up) @ down

    def decode_linear(self, x: Tensor) -> list[Tensor]:
        """A decode step's linear part on ``x [B, hidden]``: every layer, then the lm_head
        (attention stands in as the q slice of the projection: timed on its own)."""
        q_out = self.shape.q_heads * self.shape.head_dim
        for layer in range(self.shape.layers):
            x = self.layer(layer, x, lambda qkv: qkv[:, :q_out])
        return [x @ self.lm_head]

    def prefill_layer(self, x: Tensor) -> Tensor:
        """One layer of a prefill over ``x [N, hidden]``: projections and causal attention."""
        s = self.shape

        def attention(qkv: Tensor) -> Tensor:
            n = qkv.shape[0]
            q, k, v = qkv.split(
                [s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1
            )
            q = q.view(n, s.q_heads, s.head_dim).transpose(0, 1).unsqueeze(0)
            k = k.view(n, s.kv_heads, s.head_dim).transpose(0, 1).unsqueeze(0)
            v = v.view(n, s.kv_heads, s.head_dim).transpose(0, 1).unsqueeze(0)
            out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out.squeeze(0).transpose(0, 1).reshape(n, -1)

        return self.layer(0, x, attention)


def time_prefill(model: LinearModel, prompt_len: int, device: str, repeats: int) -> dict:
    """A ``prompt_len`` prefill's dense work: one layer (projections + causal flash attention)
    timed, median of ``repeats`` after a warm-up, times the layer count."""
    dtype = model.lm_head.dtype
    x = torch.randn(prompt_len, model.shape.hidden, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.prefill_layer(x)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model.prefill_layer(x)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i:
            times.append(elapsed)
    layer_ms = statistics.median(times)
    return {
        "prompt_len": prompt_len,
        "layer_ms": layer_ms,
        "layers": model.shape.layers,
        "prefill_ms": layer_ms * model.shape.layers,
        "counts": "one layer's qkv/o/gate-up/down projections and causal flash SDPA (GQA), "
        "timed, times the layer count (norms, RoPE, the KV write and the lm_head left out)",
    }
