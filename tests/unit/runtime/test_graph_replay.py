"""The backend's CUDA-graph decode protocol on CPU: a recorded decode batch, a padded replay view
without rids, fixed tables staged before the replay, and attention equal to the eager path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from hybridkv_sglang.attention.sparse_decode import sparse_decode_reference
from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.backend import DecodeGeometry, HybridKVAttnBackend
from hybridkv_sglang.runtime.compressed_requests import COMPRESSED, CompressedRequest
from hybridkv_sglang.runtime.graph_decode import limit_graph_to_fit, record_decode_batch
from hybridkv_sglang.runtime.stats import STATS
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from tests.unit.runtime.test_compact_layout import _real_pool, _request_rows
from tests.unit.runtime.test_decode_layout import DIM, GROUP, HEADS, LAYERS, SM_SCALE, _plan

PROMPTS, TAIL, GRAPH_BS = [150, 203, 97, 61], 6, 6


class _Dense(AttentionBackend):
    """Stands in for the dense backend: SGLang's real KV pool and request-to-token map."""

    def __init__(self, pool: MHATokenToKVPool, req_to_token: torch.Tensor) -> None:
        super().__init__()
        self.token_to_kv_pool = pool
        self.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token, size=8)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self.graph_state = (max_bs, max_num_tokens)


@pytest.fixture
def served():
    """A backend with two compressed requests (pool rows 2 and 3) among four, and their data."""
    pool, allocator = _real_pool(seed=4)
    req_to_token = _request_rows(allocator, PROMPTS, TAIL)
    keys = torch.stack([pool.get_key_buffer(layer) for layer in range(LAYERS)])
    plans = {
        2: _plan("hybridkv", req_to_token[2], keys, 203, 4, budget=0.2),
        3: _plan("all_dynamic", req_to_token[3], keys, 97, 4, budget=0.3),
    }
    layouts = {row: CompressedLayout.from_plan(p, "cpu") for row, p in plans.items()}
    for row, layout in layouts.items():
        COMPRESSED.add(CompressedRequest(f"r{row}", row, layout))
    config = HybridKVConfig(window=8, sink=4, chunk_size=8, top_k_chunks=3, min_prompt_tokens=16)
    geometry = DecodeGeometry(
        GROUP, DIM, req_to_token.shape[1], torch.float32, torch.float32, torch.device("cpu")
    )
    backend = HybridKVAttnBackend(_Dense(pool, req_to_token), config, LAYERS, geometry)
    backend.init_cuda_graph_state(GRAPH_BS, GRAPH_BS)
    yield backend, pool, req_to_token, layouts
    for row in layouts:
        COMPRESSED.pop(f"r{row}")


def _forward_batch(seq_lens: list[int]) -> SimpleNamespace:
    rows = [1, 2, 3, 4]
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        rids=[f"r{r}" for r in rows],
        out_cache_loc=torch.arange(4),
        req_pool_indices_cpu=torch.tensor(rows),
        req_pool_indices=torch.tensor(rows),
        seq_lens_cpu=torch.tensor(seq_lens),
    )


def _replay_view(forward_batch: SimpleNamespace) -> SimpleNamespace:
    """What SGLang's decode graph runner hands the backend: padded, without rids."""
    pad = GRAPH_BS - len(forward_batch.rids)
    return SimpleNamespace(
        batch_size=GRAPH_BS,
        forward_mode=ForwardMode.DECODE,
        seq_lens_cpu=torch.cat([forward_batch.seq_lens_cpu, torch.ones(pad, dtype=torch.int64)]),
        out_cache_loc=forward_batch.out_cache_loc,
    )


def _layer(layer_id: int) -> SimpleNamespace:
    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=HEADS * GROUP,
        qk_head_dim=DIM,
        v_head_dim=DIM,
        scaling=SM_SCALE,
    )


def test_replay_stages_the_recorded_batch_and_attends_like_the_eager_path(served):
    backend, pool, req_to_token, layouts = served
    assert backend.dense.graph_state == (GRAPH_BS, GRAPH_BS)
    seq_lens = [n + TAIL for n in PROMPTS]
    forward_batch = record_decode_batch(_forward_batch(seq_lens))
    before = STATS.snapshot()["totals"].get("static_table_steps", 0)
    backend.init_forward_metadata_out_graph(_replay_view(forward_batch))
    assert backend._static_step
    assert STATS.snapshot()["totals"]["static_table_steps"] == before + 1
    eager = DecodeBatchLayout(
        [1, 2, 3, 4, 0, 0],
        [*seq_lens, 1, 1],
        [None, layouts[2], layouts[3], None, None, None],
        HEADS,
    )
    assert all(eager.dynamic_groups(layer) for layer in range(LAYERS))
    gen = torch.Generator().manual_seed(8)
    for layer in range(LAYERS):
        q = torch.randn(GRAPH_BS, HEADS * GROUP * DIM, generator=gen)
        got = backend.forward_decode(q, None, None, _layer(layer), None, save_kv_cache=False)
        q_rows = q.view(-1, GROUP, DIM)
        table = eager.layer_table(layer, q_rows, req_to_token)
        expected = sparse_decode_reference(
            q_rows,
            pool.get_key_buffer(layer).view(-1, DIM),
            pool.get_value_buffer(layer).view(-1, DIM),
            table.kv_indptr,
            table.kv_indices,
            SM_SCALE,
        )
        torch.testing.assert_close(got, expected.reshape(GRAPH_BS, -1), rtol=0, atol=0)


def test_capture_runs_on_dense_rows_and_unmatched_replays_fail_loudly(served):
    backend, _, _, _ = served
    seq_lens = [n + TAIL for n in PROMPTS]
    capture = _replay_view(_forward_batch(seq_lens))  # never recorded
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    assert backend._static_step and not backend.decode_batch.has_compressed
    with pytest.raises(RuntimeError, match="never recorded"):
        backend.init_forward_metadata_out_graph(capture)
    recorded = record_decode_batch(_forward_batch(seq_lens))
    stale = _replay_view(recorded)
    stale.seq_lens_cpu[0] += 1
    with pytest.raises(RuntimeError, match="does not match its recorded batch"):
        backend.init_forward_metadata_out_graph(stale)


def test_batches_the_buffers_cannot_serve_run_eagerly(served):
    backend, _, _, _ = served
    runner = SimpleNamespace(attn_backend=backend)
    seq_lens = [n + TAIL for n in PROMPTS]
    assert limit_graph_to_fit(True, runner, _forward_batch(seq_lens)) is True
    assert limit_graph_to_fit(False, runner, _forward_batch(seq_lens)) is False
    backend.config = backend.config.model_copy(update={"graph_table_entries": 64})
    backend.init_cuda_graph_state(GRAPH_BS, GRAPH_BS)
    before = STATS.snapshot()["totals"].get("graph_fallbacks", 0)
    assert limit_graph_to_fit(True, runner, forward_batch=_forward_batch(seq_lens)) is False
    assert STATS.snapshot()["totals"]["graph_fallbacks"] == before + 1
    other = SimpleNamespace(attn_backend=object())
    assert limit_graph_to_fit(True, other, _forward_batch(seq_lens)) is True
