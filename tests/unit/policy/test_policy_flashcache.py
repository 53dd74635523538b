"""FlashCache-style outlier KV: DCT low-pass exact, outliers found, no attention read."""

from __future__ import annotations

import math

import pytest
import torch

from hybridkv_sglang.policy import FlashCachePolicy, HybridKVPolicy, dct_lowpass, outlier_scores
from hybridkv_sglang.policy.selection import sink_window_mask


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II, ``[n, n]`` float64, row ``k`` = frequency ``k``: the definition."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


@pytest.mark.parametrize("n", [1, 2, 7, 37, 64])
@pytest.mark.parametrize("keep", [1, 3, 36, 100])
def test_dct_lowpass_matches_the_dct_matrix(n: int, keep: int) -> None:
    x = torch.randn(n, 3, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    c = _dct_matrix(n)
    coeffs = torch.einsum("kn,nhd->khd", c, x)
    coeffs[keep:] = 0
    expected = torch.einsum("kn,khd->nhd", c, coeffs)
    got = dct_lowpass(x, keep)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    if keep >= n:
        torch.testing.assert_close(got.double(), x, atol=1e-5, rtol=0)


def _smooth_kv(n: int, heads: int, dim: int, outliers: list[int], seed: int = 0):
    """Keys and values that vary slowly with the position, plus spikes at ``outliers``."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1) / n
    amp = torch.randn(2, 1, heads, dim, generator=gen)
    keys = amp[0] * torch.cos(math.pi * t) + 0.01 * torch.randn(n, heads, dim, generator=gen)
    values = amp[1] * torch.sin(math.pi * t) + 0.01 * torch.randn(n, heads, dim, generator=gen)
    for j, p in enumerate(outliers):  # a spike in the key of some, the value of others
        (keys if j % 2 else values)[p] += 3.0 * torch.randn(heads, dim, generator=gen)
    return keys, values


def test_outliers_score_highest_and_scale_does_not_matter() -> None:
    n, outliers = 300, [50, 120, 121, 200, 250]
    keys, values = _smooth_kv(n, 2, 16, outliers)
    scores = outlier_scores(keys, values, 0.1)
    assert scores.shape == (2, n) and torch.all(scores >= 0)
    for h in range(2):
        assert set(scores[h].topk(len(outliers)).indices.tolist()) == set(outliers)
    # Each of K and V is normalised by its head's mean distance: rescaling one changes nothing.
    torch.testing.assert_close(outlier_scores(keys, 1000.0 * values, 0.1), scores)


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_plan_keeps_sink_window_then_outliers(budget: float) -> None:
    n, layers, heads, outliers = 300, 2, 2, [50, 120, 121, 200, 250]
    policy = FlashCachePolicy(budget=budget, sink=4, window=32)
    obs = []
    for layer in range(layers):
        keys, values = _smooth_kv(n, heads, 16, outliers, seed=layer)
        q = torch.randn(32, 2 * heads, 16)
        obs.append(policy.observe_layer(layer, q, keys, 0.25, values))
    plan = policy.finalize(obs, torch.ones(n, dtype=torch.bool))
    b = int(budget * n)  # the floor scales down to b: window 15, no sink at 5 %
    window = min(32, b)
    sink = min(4, b - window)
    floor = sink_window_mask(n, sink, window, "cpu")
    assert not plan.has_dynamic and torch.all(plan.budgets == b)
    for layer in range(layers):
        for h in range(heads):
            kept = plan.kept_positions_of(layer, h).long()
            rest = torch.where(floor, -1.0, obs[layer].scores[h])
            top = set(rest.topk(b - sink - window).indices.tolist())
            assert set(kept.tolist()) == top | set(floor.nonzero().flatten().tolist())
            if b >= 36 + len(outliers):
                assert set(outliers) <= set(kept.tolist())


def test_no_attention_is_read_and_values_are_required() -> None:
    keys, values = _smooth_kv(100, 2, 8, [40])
    policy = FlashCachePolicy()
    a = policy.observe_layer(0, torch.randn(32, 4, 8), keys, 1.0, values)
    b = policy.observe_layer(0, 100.0 * torch.randn(5, 4, 8), keys, 1.0, values)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.focus_size, torch.zeros(2).long())
    with pytest.raises(ValueError, match="values"):
        policy.observe_layer(0, torch.randn(32, 4, 8), keys, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        outlier_scores(keys, values[:-1], 0.1)


def test_runtime_passes_values_only_to_policies_that_need_them() -> None:
    from hybridkv_sglang.runtime.prefill.compression import PrefillCompression
    from tests.unit.runtime.test_prefill_compression import LAYERS, Layer, _batch, _with

    k_buffers, req_to_token, requests, q = _batch()
    v_buffers = [torch.randn_like(k) for k in k_buffers]
    policy = FlashCachePolicy(budget=0.3, window=8, sink=2)
    with_values = PrefillCompression(_with(requests[:2], policy), LAYERS)
    without = PrefillCompression(_with(requests[:2], policy), LAYERS)
    for layer in range(LAYERS):
        with_values.observe(Layer(layer), q, k_buffers[layer], req_to_token, v_buffers[layer])
        without.observe(Layer(layer), q, k_buffers[layer], req_to_token)
    assert all(o.layout is not None for o in with_values.finish(torch.device("cpu")))
    assert all(o.dense_reason == "compression_error" for o in without.finish(torch.device("cpu")))

    class KeysOnly(HybridKVPolicy):  # the observe_layer of a policy that never reads values
        def observe_layer(self, layer_id, q_window, keys, sm_scale):  # type: ignore[override]
            return super().observe_layer(layer_id, q_window, keys, sm_scale)

    keys_only = PrefillCompression(
        _with(requests[:2], KeysOnly(budget=0.3, window=8, sink=2)), LAYERS
    )
    for layer in range(LAYERS):
        keys_only.observe(Layer(layer), q, k_buffers[layer], req_to_token, v_buffers[layer])
    assert all(o.layout is not None for o in keys_only.finish(torch.device("cpu")))
