"""Which kv heads a tensor-parallel rank holds, and how per-rank head statistics recombine.

Under tensor parallelism each rank computes attention for a slice of the kv heads, but stages 1
and 2 rank and share one budget over every (layer, kv head) of the request. A rank planning from
its own heads alone would make a different plan at every TP size; so the runtime gathers the
head statistics of all ranks (collectives stay in the runtime) and every rank makes the one plan
a single rank would make, then keeps its own heads' share. This module only says whose rows are
whose, following SGLang's ``QKVParallelLinear`` split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadShard:
    """The kv heads ``[first, first + count)`` of the model's ``total`` one rank holds.

    Attributes:
        first: global index of the rank's first kv head.
        count: kv heads the rank holds (its KV pool's ``H_kv``).
        total: kv heads of the model.
        replicas: ranks holding each of these heads (``> 1`` when there are more ranks than kv
            heads: each replica then holds ``G / replicas`` of the head's query heads).
    """

    first: int
    count: int
    total: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if not (self.first >= 0 and self.count >= 1 and self.first + self.count <= self.total):
            raise ValueError(
                f"expected heads [first, first + count) inside [0, {self.total}), "
                f"got first={self.first}, count={self.count}"
            )
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")

    @classmethod
    def of_rank(cls, rank: int, size: int, total: int) -> HeadShard:
        """SGLang's split over ``size`` attention-TP ranks: ``total / size`` consecutive heads
        per rank, or, with more ranks than heads, head ``rank // (size / total)`` on
        ``size / total`` consecutive ranks."""
        if not 0 <= rank < size:
            raise ValueError(f"expected 0 <= rank < size, got rank={rank}, size={size}")
        if size <= total:
            if total % size:
                raise ValueError(f"{total} kv heads do not split over {size} ranks")
            count = total // size
            return cls(rank * count, count, total)
        if size % total:
            raise ValueError(f"{size} ranks do not replicate {total} kv heads evenly")
        replicas = size // total
        return cls(rank // replicas, 1, total, replicas)

    @property
    def heads(self) -> slice:
        """The rank's heads as a slice of the model's head dimension."""
        return slice(self.first, self.first + self.count)

    @property
    def is_whole(self) -> bool:
        """The rank holds every head (no tensor parallelism over kv heads)."""
        return self.count == self.total


def all_shards(size: int, total: int) -> list[HeadShard]:
    """Every rank's shard, in rank order."""
    return [HeadShard.of_rank(rank, size, total) for rank in range(size)]


def replica_ranks(rank: int, size: int, total: int) -> list[int]:
    """The ranks holding the same kv heads as ``rank`` (itself included), in rank order: their
    query heads, concatenated in this order, are the heads' whole GQA groups."""
    mine = HeadShard.of_rank(rank, size, total)
    return [r for r, shard in enumerate(all_shards(size, total)) if shard.first == mine.first]


def assemble_heads(parts: Sequence[Tensor], shards: Sequence[HeadShard], dim: int) -> Tensor:
    """One tensor over every kv head from per-rank tensors whose ``dim`` indexes the rank's heads.

    Args:
        parts: one per rank, in rank order; ``parts[r].shape[dim] == shards[r].count``.
        shards: the ranks' shards (:func:`all_shards`).
        dim: the head dimension.

    Returns:
        The parts concatenated along ``dim`` in head order, ``shards[0].total`` heads; a head
        held by several ranks is taken from the first of them (replicas hold the same values).
    """
    if len(parts) != len(shards):
        raise ValueError(f"expected one part per shard, got {len(parts)} and {len(shards)}")
    total = shards[0].total
    taken: list[Tensor] = []
    next_head = 0
    for part, shard in zip(parts, shards, strict=True):
        if part.shape[dim] != shard.count:
            raise ValueError(
                f"expected {shard.count} heads on dim {dim}, got shape {tuple(part.shape)}"
            )
        if shard.first == next_head:
            taken.append(part)
            next_head += shard.count
    if next_head != total:
        raise ValueError(f"the shards cover {next_head} of {total} kv heads")
    return torch.cat(taken, dim=dim)
