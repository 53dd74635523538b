"""Prefill-end compression over a batch: per-request plans, and failures contained per request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hybridkv_sglang.policy import HybridKVPolicy
from hybridkv_sglang.runtime.prefill.compression import PrefillCompression
from hybridkv_sglang.runtime.prefill.requests import PrefillEnd

LAYERS, HEADS, GROUP, DIM = 2, 2, 2, 8


@dataclass
class Layer:  # the two RadixAttention attributes compression reads
    layer_id: int
    scaling: float = DIM**-0.5


class FailsOnLength(HybridKVPolicy):
    """The real policy, except that it raises for one prompt length (to test containment)."""

    def observe_layer(self, layer_id, q_window, keys, sm_scale):
        if keys.shape[0] == 90:
            raise RuntimeError("boom")
        return super().observe_layer(layer_id, q_window, keys, sm_scale)


def _batch():
    gen = torch.Generator().manual_seed(0)
    slots = 400
    k_buffers = [torch.randn(slots, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    req_to_token = torch.zeros(4, 256, dtype=torch.int32)
    req_to_token[1, :120] = torch.arange(1, 121)
    req_to_token[2, :90] = torch.arange(150, 240)
    req_to_token[3, :100] = torch.arange(250, 350)
    requests = [  # last chunks: 40 new tokens, 30 new tokens, 20 new tokens
        (PrefillEnd(0, "a", 1, 120, 80, 0, ((10, 100),)), None),
        (PrefillEnd(1, "b", 2, 90, 60, 40, ((5, 60),)), None),
        (PrefillEnd(2, "c", 3, 100, 80, 70, ()), "no_visual_tokens"),
    ]
    q = torch.randn(90, HEADS * GROUP, DIM, generator=gen)
    return k_buffers, req_to_token, requests, q


def _with(requests, policy):
    """The batch's requests, each compressed (or not) by ``policy``."""
    return [(request, reason, policy) for request, reason in requests]


def test_one_failing_request_stays_dense_and_the_others_compress(caplog):
    k_buffers, req_to_token, requests, q = _batch()
    policy = FailsOnLength(budget=0.3, window=8, sink=2, chunk_size=8, top_k_chunks=2)
    compression = PrefillCompression(_with(requests, policy), LAYERS)
    for layer in range(LAYERS):
        compression.observe(Layer(layer), q, k_buffers[layer], req_to_token)
    with caplog.at_level(logging.WARNING):
        outcomes = compression.finish(torch.device("cpu"))

    a, b, c = outcomes
    assert a.layout is not None and a.dense_reason is None
    assert a.stats().compressed and 0 < a.stats().read_fraction < 1
    assert b.layout is None and b.dense_reason == "compression_error"
    assert "compression of b failed" in caplog.text
    assert c.layout is None and c.dense_reason == "no_visual_tokens"
    assert [o.observations for o in outcomes] == [[], [], []]


def test_window_queries_are_the_requests_last_rows():
    k_buffers, req_to_token, requests, q = _batch()
    seen = []

    class Recording(HybridKVPolicy):
        def observe_layer(self, layer_id, q_window, keys, sm_scale):
            seen.append((q_window, keys))
            return super().observe_layer(layer_id, q_window, keys, sm_scale)

    compression = PrefillCompression(_with(requests[:2], Recording(window=8, sink=2)), LAYERS)
    compression.observe(Layer(0), q, k_buffers[0], req_to_token)
    (qa, ka), (qb, kb) = seen
    torch.testing.assert_close(qa, q[32:40])  # request a: rows [0, 40), window = last 8
    torch.testing.assert_close(qb, q[62:70])  # request b: rows [40, 70)
    torch.testing.assert_close(ka, k_buffers[0][1:121])
    torch.testing.assert_close(kb, k_buffers[0][150:240])
