"""LOOK-M: uniform text-prior pruning, and averaged merging of the evicted KV into the kept KV."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.policy import LookMPolicy, average_merge, build_policy


def _naive_merge(kept_k, kept_v, evicted_k, evicted_v):
    """One evicted token at a time: join the most cosine-similar kept key, then average."""
    sums_k, sums_v = [k.clone().double() for k in kept_k], [v.clone().double() for v in kept_v]
    counts = [1] * len(kept_k)
    for ek, ev in zip(evicted_k, evicted_v, strict=True):
        sims = [float(torch.dot(ek.double(), k.double()) / (ek.norm() * k.norm())) for k in kept_k]
        j = max(range(len(sims)), key=lambda i: (sims[i], -i))
        sums_k[j] += ek.double()
        sums_v[j] += ev.double()
        counts[j] += 1
    k = torch.stack([s / c for s, c in zip(sums_k, counts, strict=True)])
    v = torch.stack([s / c for s, c in zip(sums_v, counts, strict=True)])
    return k, v


@pytest.mark.parametrize(("kept", "evicted", "dim"), [(1, 5, 4), (7, 30, 16), (12, 1, 8)])
def test_average_merge_matches_the_one_at_a_time_definition(kept, evicted, dim):
    gen = torch.Generator().manual_seed(kept * 100 + evicted)
    kept_k, kept_v = (
        torch.randn(kept, dim, generator=gen),
        torch.randn(kept, dim + 3, generator=gen),
    )
    ev_k, ev_v = (
        torch.randn(evicted, dim, generator=gen),
        torch.randn(evicted, dim + 3, generator=gen),
    )
    k, v = average_merge(kept_k, kept_v, ev_k, ev_v)
    expected_k, expected_v = _naive_merge(kept_k, kept_v, ev_k, ev_v)
    torch.testing.assert_close(k.double(), expected_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), expected_v, rtol=1e-5, atol=1e-6)
    assert k.dtype == kept_k.dtype and v.shape == kept_v.shape


def test_average_merge_keeps_mass_and_leaves_unmatched_entries_alone():
    gen = torch.Generator().manual_seed(1)
    kept_k = torch.eye(4)  # orthogonal keys: each evicted key has one clear match
    kept_v = torch.randn(4, 3, generator=gen)
    ev_k = torch.tensor([[2.0, 0.1, 0, 0], [0.1, 0, 3.0, 0]])
    ev_v = torch.randn(2, 3, generator=gen)
    k, v = average_merge(kept_k, kept_v, ev_k, ev_v)
    torch.testing.assert_close(v[0], (kept_v[0] + ev_v[0]) / 2)
    torch.testing.assert_close(v[2], (kept_v[2] + ev_v[1]) / 2)
    torch.testing.assert_close(v[[1, 3]], kept_v[[1, 3]])
    torch.testing.assert_close(k[[1, 3]], kept_k[[1, 3]])
    # nothing evicted (or nothing kept): unchanged
    same_k, same_v = average_merge(kept_k, kept_v, ev_k[:0], ev_v[:0])
    assert same_k is kept_k and same_v is kept_v


def test_lookm_plans_prune_text_first_to_the_uniform_budget_and_ask_for_the_merge():
    n, window, heads = 200, 8, 2
    gen = torch.Generator().manual_seed(3)
    policy = build_policy("lookm", budget=0.1, window=window, sink=4)
    assert isinstance(policy, LookMPolicy) and not policy.needs_chunk_bounds
    obs = [
        policy.observe_layer(
            layer,
            torch.randn(window, heads * 2, 16, generator=gen),
            torch.randn(n, heads, 16, generator=gen),
            0.25,
        )
        for layer in range(3)
    ]
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[:10] = True  # a text prefix before the image
    plan = policy.finalize(obs, is_text)
    assert plan.merge_evicted and plan.policy == "lookm"
    assert not bool(plan.is_dynamic.any())
    assert bool((plan.budgets == max(20, 12)).all())
    for layer in range(3):
        for head in range(heads):
            kept = plan.kept_positions_of(layer, head).tolist()
            assert len(kept) == 20
            assert set(range(4)) | set(range(n - window, n)) <= set(kept)
            assert set(range(10)) <= set(kept)  # text before any visual token
    assert not build_policy("snapkv").finalize(obs, is_text).merge_evicted


def test_lookm_without_compact_storage_is_refused_at_start_up():
    from hybridkv_sglang.config import HybridKVConfig, HybridKVConfigError

    with pytest.raises(HybridKVConfigError, match="set storage='compact'"):
        HybridKVConfig.parse('{"policy": "lookm"}')
    assert HybridKVConfig.parse('{"policy": "lookm", "storage": "compact"}').policy == "lookm"
