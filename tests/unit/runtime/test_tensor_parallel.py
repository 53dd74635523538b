"""Prefill-end compression over a real gloo group: every attention-TP rank plans what one rank
plans at TP 1 (heads split, and heads replicated), a fault on one rank is dense on all, and the
ranks agree on which requests they registered and on their decode-table bounds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.kernels.folded_tables import NF, NUM_CHUNKS, PRE_LEN, TAIL_START
from hybridkv_sglang.policy import HybridKVPolicy
from hybridkv_sglang.policy.sharding import HeadShard
from hybridkv_sglang.runtime.prefill.compression import PrefillCompression
from hybridkv_sglang.runtime.prefill.requests import PrefillEnd
from hybridkv_sglang.runtime.prefill.tensor_parallel import (
    FAIL_RANK_ENV,
    FAIL_RID_PREFIX,
    AttentionTP,
)
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, RequestRows

LAYERS, HEADS, GROUP, DIM = 2, 2, 2, 8
FAULTY = f"{FAIL_RID_PREFIX}-b"


@dataclass
class Layer:  # the two RadixAttention attributes compression reads
    layer_id: int
    scaling: float = DIM**-0.5


@dataclass
class Pool:  # the two KV pool reads of replicated-head observation
    keys: list[torch.Tensor]

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        return self.keys[layer]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        return self.keys[layer]


def _batch(rid_b: str):
    """Keys of every head, queries of every query head, and two requests ending prefill."""
    gen = torch.Generator().manual_seed(0)
    k_buffers = [torch.randn(400, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    qs = [torch.randn(70, HEADS * GROUP, DIM, generator=gen) for _ in range(LAYERS)]
    for q in qs:
        q[:, :GROUP] *= 5.0  # kv head 0 sharp, kv head 1 diffuse
    req_to_token = torch.zeros(4, 256, dtype=torch.int32)
    req_to_token[1, :120] = torch.arange(1, 121)
    req_to_token[2, :90] = torch.arange(150, 240)
    requests = [
        (PrefillEnd(0, "a", 1, 120, 80, 0, ((10, 100),)), None),
        (PrefillEnd(1, rid_b, 2, 90, 60, 40, ((5, 60),)), None),
    ]
    return k_buffers, qs, req_to_token, requests


def _compress(tp: AttentionTP | None, rid_b: str) -> list[tuple[str | None, str | None]]:
    """Each request's dense reason and plan digest, compressed on this rank's heads."""
    k_buffers, qs, req_to_token, requests = _batch(rid_b)
    shard = HeadShard(0, HEADS, HEADS) if tp is None else tp.shard
    q_heads = slice(0, HEADS * GROUP)
    if tp is not None:
        per_rank = HEADS * GROUP // tp.size
        q_heads = slice(tp.rank * per_rank, (tp.rank + 1) * per_rank)
    keys = [k[:, shard.heads].contiguous() for k in k_buffers]
    policy = HybridKVPolicy(budget=0.3, window=8, sink=2, chunk_size=8, top_k_chunks=2)
    compression = PrefillCompression(
        [(r, reason, policy) for r, reason in requests], LAYERS, None, tp
    )
    for layer in range(LAYERS):
        compression.observe(Layer(layer), qs[layer][:, q_heads], keys[layer], req_to_token)
    outcomes = compression.finish(torch.device("cpu"), Pool(keys), req_to_token)
    return [(o.dense_reason, o.plan_stats.get("plan_digest")) for o in outcomes]


def _worker(rank: int, size: int, port: int, fail_rank: str, rid_b: str, out: dict) -> None:
    os.environ[FAIL_RANK_ENV] = fail_rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)  # fmt: skip
    try:
        tp = AttentionTP(rank, size, HeadShard.of_rank(rank, size, HEADS), dist.group.WORLD)
        out[rank] = _compress(tp, rid_b)
    finally:
        dist.destroy_process_group()


def _run(size: int, fail_rank: str = "", rid_b: str = "b") -> list[list[tuple]]:
    from hybridkv_sglang.testing.server import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(size, free_port(), fail_rank, rid_b, out), nprocs=size)
        return [out[rank] for rank in range(size)]


@pytest.mark.parametrize("size", [2, 4], ids=["heads_split", "heads_replicated"])
def test_every_rank_makes_the_tp1_plan(size: int) -> None:
    expected = _compress(None, "b")
    assert [reason for reason, _ in expected] == [None, None]
    assert all(digest for _, digest in expected)
    assert _run(size) == [expected] * size


def test_a_fault_on_one_rank_is_dense_on_every_rank() -> None:
    expected = _compress(None, FAULTY)
    ranks = _run(2, fail_rank="1", rid_b=FAULTY)
    for outcomes in ranks:
        assert outcomes[0] == expected[0]  # the other request is untouched
        assert outcomes[1] == ("compression_error", None)


def _records(rank: int) -> tuple[list[SimpleNamespace], DecodeMetadata]:
    """Rank ``rank``'s decode pools after its own registration: request ``a`` on both ranks
    (rank 1's record bounds more chunks), request ``b`` on rank 0 only (rank 1's pools were
    full)."""
    meta = DecodeMetadata(
        1, 1, DIM, max_requests=4, pool_rows=4, fixed_capacity=256, bound_capacity=16,
        param_capacity=4, candidate_capacity=16, top_capacity=8, bound_dtype=torch.float32,
        device="cpu",
    )  # fmt: skip
    outcomes = []
    for rid, row, registered in (("a", 1, True), ("b", 2, rank == 0)):
        kept = 10 + 5 * rank
        rows = torch.zeros(1, 1, NF, dtype=torch.int32)
        rows[0, 0, PRE_LEN], rows[0, 0, TAIL_START] = kept, 50
        rows[0, 0, NUM_CHUNKS] = 3 + rank
        empty = torch.empty(0, DIM)
        params, affine = torch.empty(0, DIM, dtype=torch.int32), torch.empty(0, 2, DIM)
        if registered:
            rows_of = RequestRows(rows, torch.arange(kept), empty, empty, params, affine, 50, 8)
            assert meta.add(row, rows_of)
        outcomes.append(
            SimpleNamespace(
                request=SimpleNamespace(rid=rid, req_pool_idx=row),
                layout=object() if registered else None,
                dense_reason=None if registered else "decode_metadata_full",
            )
        )
    return outcomes, meta


def _agreement_worker(rank: int, size: int, port: int, out: dict) -> None:
    from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
    from hybridkv_sglang.runtime.session.stats import HybridKVStats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)  # fmt: skip
    try:
        outcomes, meta = _records(rank)
        session = SchedulerSession(
            HybridKVConfig(),
            HybridKVStats(),
            decode_meta=meta,
            tp=AttentionTP(rank, size, HeadShard.of_rank(rank, size, 2), dist.group.WORLD),
        )
        session._agree_on_records(outcomes, torch.device("cpu"))
        out[rank] = (
            [(o.layout is not None, o.dense_reason) for o in outcomes],
            meta.table_bounds(1),
            meta.usage()["requests"],
        )
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_registration_and_table_bounds() -> None:
    from hybridkv_sglang.testing.server import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_agreement_worker, args=(2, free_port(), out), nprocs=2)
        ranks = [out[0], out[1]]
    for decisions, bounds, live in ranks:
        # b: rank 0 had registered it and released it; a: the larger table bound everywhere
        assert decisions == [(True, None), (False, "decode_metadata_full")]
        assert bounds == (4, 0)
        assert live == 1
