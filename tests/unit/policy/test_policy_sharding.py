"""Tensor-parallel shards: a rank planning from every head's statistics keeps, for its own heads,
exactly what one rank keeps at TP 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybridkv_sglang.policy import POLICIES, build_policy
from hybridkv_sglang.policy.sharding import (
    HeadShard,
    all_shards,
    assemble_heads,
    replica_ranks,
)

L, HKV, G, D, N = 3, 4, 2, 16, 300


@pytest.mark.parametrize(
    "size,expected",
    [
        (1, [(0, 4, 1)]),
        (2, [(0, 2, 1), (2, 2, 1)]),
        (4, [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1)]),
        (8, [(h, 1, 2) for h in range(4) for _ in range(2)]),
    ],
)
def test_shards_follow_sglangs_split(size: int, expected: list[tuple[int, int, int]]) -> None:
    shards = all_shards(size, HKV)
    assert [(s.first, s.count, s.replicas) for s in shards] == expected
    assert all(s.total == HKV for s in shards)


def test_replica_ranks_and_bad_splits() -> None:
    assert replica_ranks(5, 8, 4) == [4, 5]
    assert replica_ranks(1, 2, 4) == [1]
    with pytest.raises(ValueError, match="do not split"):
        HeadShard.of_rank(0, 3, 4)
    with pytest.raises(ValueError, match="replicate"):
        HeadShard.of_rank(0, 6, 4)
    with pytest.raises(ValueError, match="inside"):
        HeadShard(3, 2, 4)


def test_assemble_heads_takes_each_head_once() -> None:
    shards = all_shards(8, 4)
    parts = [torch.full((2, 1), float(s.first)) for s in shards]
    assert assemble_heads(parts, shards, dim=1).tolist() == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError, match="heads on dim"):
        assemble_heads([torch.zeros(2, 2)] * 8, shards, dim=1)


def _observations(policy_name: str, **kw: object):
    gen = torch.Generator().manual_seed(3)
    policy = build_policy(policy_name, **kw)
    obs = []
    for layer in range(L):
        k = torch.randn(N, HKV, D, generator=gen)
        v = torch.randn(N, HKV, D, generator=gen)
        q = torch.randn(32, HKV * G, D, generator=gen)
        q[:, : G * 2] *= 6.0  # kv heads 0, 1 sharp, 2, 3 diffuse: both head types
        obs.append(policy.observe_layer(layer, q, k, D**-0.5, v))
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[:40] = True
    is_text[-32:] = True
    return policy, obs, is_text


def _rank_view(obs, shard: HeadShard):
    """A rank's observations after the runtime's gather: every head's statistics, its own
    heads' chunk bounds."""
    sl = shard.heads
    return [
        dataclasses.replace(o, chunk_index=None if o.chunk_index is None else o.chunk_index[sl])
        for o in obs
    ]


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_rank_keeps_its_heads_share_of_the_tp1_plan(name: str, size: int) -> None:
    policy, obs, is_text = _observations(name, budget=0.2, window=32, sink=4)
    whole = policy.finalize(obs, is_text)
    if name == "hybridkv":  # both head types, so stage 2 splits B between them
        assert whole.is_dynamic.any() and not whole.is_dynamic.all()
    for shard in all_shards(size, HKV):
        part = policy.finalize(_rank_view(obs, shard), is_text, shard)
        assert part.num_kv_heads == shard.count
        assert part.model_stats == whole.stats()
        assert part.reported_stats() == whole.stats()
        assert torch.equal(part.is_dynamic, whole.is_dynamic[:, shard.heads])
        assert torch.equal(part.budgets, whole.budgets[:, shard.heads])
        for layer in range(L):
            for h in range(shard.count):
                assert torch.equal(
                    part.kept_positions_of(layer, h),
                    whole.kept_positions_of(layer, shard.first + h),
                )
                if bool(part.is_dynamic[layer, h]):
                    assert part.chunk_kmin is not None and whole.chunk_kmin is not None
                    assert torch.equal(
                        part.chunk_kmin[layer, h], whole.chunk_kmin[layer, shard.first + h]
                    )


def test_whole_shard_plans_as_tp1_and_the_digest_tells_plans_apart() -> None:
    policy, obs, is_text = _observations("hybridkv", budget=0.2)
    whole = policy.finalize(obs, is_text)
    same = policy.finalize(obs, is_text, HeadShard(0, HKV, HKV))
    assert same.model_stats is None and same.digest() == whole.digest()
    assert whole.stats()["plan_digest"] == whole.digest()
    other = build_policy("hybridkv", budget=0.3).finalize(obs, is_text)
    assert other.digest() != whole.digest()
    with pytest.raises(ValueError, match="all 8 kv heads"):
        policy.finalize(obs, is_text, HeadShard(0, 1, 8))
