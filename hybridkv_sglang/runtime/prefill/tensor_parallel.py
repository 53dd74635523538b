"""Tensor parallelism: every attention-TP rank makes the same plan and takes the same decisions.

Each rank holds a slice of the kv heads (``policy.sharding``), but the plan ranks and budgets
every (layer, kv head) together, and whatever steers control flow or collectives (is the request
compressed, which decode-graph variant, graph or eager) must agree across ranks. So, once per
forward that ends some requests' prefill (never per decode step), on SGLang's attention-TP
group:

1. with replicated kv heads only (more ranks than kv heads, each replica holding part of a GQA
   group): an all-gather of a header (observed, window rows) and of the window queries, so each
   replica observes its head with the head's whole query group;
2. an all-gather of the head statistics stages 1-2 read (focus sizes, pooled scores, focus
   sets) with each rank's "observed" flag: every rank then plans over every head, and a request
   any rank failed to observe is served dense by all;
3. after the decode records are written, an all-reduce (max) of each request's failure code and
   table bounds: a request any rank could not register is served dense by all, and every rank
   sizes decode batches with the same bounds (graph or eager is then the same choice).

The membership of each collective is derived from rank-invariant inputs only (which requests end
their prefill, their lengths, the config), so no rank waits in a collective the others skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hybridkv_sglang.policy.sharding import HeadShard, all_shards, replica_ranks
from hybridkv_sglang.runtime.startup.checks import check_cpu_head_split

logger = logging.getLogger(__name__)

FAIL_RANK_ENV = "HYBRIDKV_TEST_FAIL_RANK"
"""Test hook: this attention-TP rank fails its own compression of requests whose rid starts
with :data:`FAIL_RID_PREFIX` (the other ranks succeed), to check that all ranks serve them
dense."""
FAIL_RID_PREFIX = "hybridkv-test-fail"


@dataclass(frozen=True)
class AttentionTP:
    """This scheduler's place in the attention-TP group, and the group's collectives."""

    rank: int
    size: int
    shard: HeadShard
    group: Any
    """``torch.distributed`` process group (SGLang's attention-TP device group)."""

    @classmethod
    def of_model_runner(cls, model_runner: Any) -> AttentionTP | None:
        """This scheduler's rank from SGLang's parallel state (``None`` on a single
        attention-TP rank); refuses head layouts the plan cannot follow."""
        from sglang.srt.distributed.parallel_state import get_attn_tp_group
        from sglang.srt.runtime_context import get_parallel

        model_config = model_runner.model_config
        total = model_config.get_total_num_kv_heads()
        padded_from = getattr(model_config.hf_text_config, "original_total_num_kv_heads", None)
        if padded_from is not None and padded_from != total:
            check_cpu_head_split(model_runner.server_args.tp_size, padded_from)
        parallel = get_parallel()
        size, rank = parallel.attn_tp_size, parallel.attn_tp_rank
        if size == 1:
            return None
        shard = HeadShard.of_rank(rank, size, total)
        held = model_runner.token_to_kv_pool.head_num
        if shard.count != held:
            raise NotImplementedError(
                f"--attention-backend hybridkv: attention-TP rank {rank} holds {held} kv heads, "
                f"not the {shard.count} of SGLang's usual split (decode context parallelism is "
                "not supported)"
            )
        logger.info(
            "hybridkv: attention-TP rank %d of %d holds kv heads [%d, %d) of %d, replicated on "
            "%d ranks; plans are made over every head",
            rank,
            size,
            shard.first,
            shard.first + shard.count,
            total,
            shard.replicas,
        )
        return cls(rank, size, shard, get_attn_tp_group().device_group)

    @property
    def shards(self) -> list[HeadShard]:
        return all_shards(self.size, self.shard.total)

    @property
    def replicated(self) -> bool:
        """Each kv head lives on several ranks, each with part of its query heads."""
        return self.shard.replicas > 1

    @property
    def replicas(self) -> list[int]:
        """The ranks holding this rank's kv head, in rank order."""
        return replica_ranks(self.rank, self.size, self.shard.total)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Element-wise max over the ranks (a new tensor)."""
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def injects_fault(self, rid: str) -> bool:
        """The test hook (:data:`FAIL_RANK_ENV`) fails this rank's compression of ``rid``."""
        return rid.startswith(FAIL_RID_PREFIX) and os.environ.get(FAIL_RANK_ENV) == str(self.rank)
