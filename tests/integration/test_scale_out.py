"""hybridkv on SGLang's own parallelism, through real CPU servers (gloo): ``--tp-size 2`` makes
the plan ``--tp-size 1`` makes, keeps stock's tokens when every token is kept, leaks nothing
after aborts, and serves a request dense on every rank when one rank's compression fails;
``--dp-size 2`` serves both storage modes with its stats added up over its schedulers; what
stays unsupported is refused before any weight loads."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.report import merged_totals, request_record
from hybridkv_sglang.runtime.prefill.tensor_parallel import FAIL_RANK_ENV, FAIL_RID_PREFIX
from hybridkv_sglang.testing.server import (
    RunningServer,
    cpu_rank_binding,
    cpu_server_args,
    free_port,
)
from hybridkv_sglang.testing.tiny_model import build_tiny_qwen2_5_vl
from tests.integration.client import (
    assert_nothing_left_behind,
    chat_prompt,
    generate,
    images,
    run_mixed_requests_with_aborts,
)
from tests.integration.conftest import (
    COMPRESSING,
    IMAGE_SIDE,
    SERVER_KWARGS,
    STRICT_MEMORY_CHECK,
    serve,
)

pytestmark = pytest.mark.integration

TWO_RANKS = cpu_rank_binding(2)
"""Cores per rank: SGLang's CPU ranks need an explicit binding on a one-NUMA-node machine."""
LAYERS, KV_HEADS = 2, 2
"""The tiny model's layers and kv heads (one kv head per rank at ``--tp-size 2``)."""


def _overrides(*flags: str) -> dict:
    return {"extra_args": [*SERVER_KWARGS["extra_args"], *flags]}


@pytest.fixture(scope="module")
def tp2_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    """The compressing server's config at ``--tp-size 2``; rank 1 fails its own compression of
    requests whose rid starts with the fault prefix (the test hook)."""
    with serve(
        tiny_model,
        server_logs,
        "tp2",
        COMPRESSING,
        _overrides("--tp-size", "2"),
        **TWO_RANKS,
        **STRICT_MEMORY_CHECK,
        **{FAIL_RANK_ENV: "1"},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def stock_tp2_server(tiny_model: Path, server_logs: Path) -> Iterator[RunningServer]:
    with serve(
        tiny_model, server_logs, "stock_tp2", None, _overrides("--tp-size", "2"), **TWO_RANKS
    ) as server:
        yield server


def _image_request(i: int, count: int = 2) -> tuple[str, list[str]]:
    text = chat_prompt(f"Scale-out question {i}: what differs between the pictures?", images=count)
    return text, images(count, IMAGE_SIDE, seed=700 + 3 * i)


def _record(server: RunningServer, reply: dict) -> dict:
    return server.hybridkv_stats()["requests"][reply["meta_info"]["id"]]


def _same_plans(tp1: RunningServer, tp2: RunningServer, kv_heads: int) -> None:
    """Send the same image requests to both; their plans match."""
    records = []
    for i, count in enumerate((1, 2, 2, 3)):
        text, data = _image_request(i, count)
        one = _record(tp1, generate(tp1.base_url, text, data))
        two = _record(tp2, generate(tp2.base_url, text, data))
        assert one["compressed"] and two["compressed"]
        assert two["extra"]["plan_digest"] == one["extra"]["plan_digest"]
        for field in ("static_heads", "dynamic_heads", "kept_entries", "prompt_entries"):
            assert two[field] == one[field], field
        # rank 0's record covers the heads of both ranks
        assert two["static_heads"] + two["dynamic_heads"] == LAYERS * kv_heads
        assert two["prompt_entries"] == LAYERS * kv_heads * two["prompt_tokens"]
        assert two["read_fraction"] == pytest.approx(one["read_fraction"])
        records.append(one)
    # both head types occur, so stage 1 capped and stage 2 shared B over both ranks' heads
    assert any(r["dynamic_heads"] for r in records) and any(r["static_heads"] for r in records)


def test_tp2_makes_the_tp1_plan(compressing_server, tp2_server):
    """One kv head per rank."""
    _same_plans(compressing_server, tp2_server, KV_HEADS)


def test_kv_heads_padded_for_cpu_tp_are_refused(
    tmp_path_factory: pytest.TempPathFactory, server_logs: Path
):
    """On a CPU, SGLang pads kv heads that --tp-size does not divide with zero-weight heads
    (on a GPU it replicates them, which the plan handles): the plan would count the padding."""
    model = build_tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("models") / "tiny-one-kv-head",
        max_pixels=IMAGE_SIDE * IMAGE_SIDE,
        kv_heads=1,
    )
    tp2 = serve(model, server_logs, "one_kv_head_tp2", COMPRESSING, _overrides("--tp-size", "2"),
                **TWO_RANKS)  # fmt: skip
    with pytest.raises(RuntimeError, match="during start-up") as err, tp2:
        pass
    assert "pads the model's 1 kv heads to 2" in str(err.value)
    assert "use a --tp-size that divides 1" in str(err.value)
    assert "Load weight begin" not in str(err.value)  # refused at launch, no model loaded


def test_tp2_keep_all_equals_stock_tp2(tp2_server, stock_tp2_server):
    before = tp2_server.hybridkv_stats()["totals"].get("sparse_decode_steps", 0)
    for i in range(3):
        text, data = _image_request(10 + i)
        want = generate(stock_tp2_server.base_url, text, data, max_new_tokens=16)
        got = generate(
            tp2_server.base_url,
            text,
            data,
            max_new_tokens=16,
            sampling_params={
                "max_new_tokens": 16,
                "temperature": 0.0,
                "ignore_eos": True,
                "custom_params": {"hybridkv": {"budget": 1.0}},
            },
        )
        assert got["output_ids"] == want["output_ids"]
        record = _record(tp2_server, got)
        assert record["compressed"] and record["read_fraction"] == pytest.approx(1.0)
    assert tp2_server.hybridkv_stats()["totals"]["sparse_decode_steps"] > before


def test_tp2_leaks_nothing_after_aborts(tp2_server):
    run_mixed_requests_with_aborts(tp2_server, count=16, aborts=4)
    snapshot = assert_nothing_left_behind(tp2_server)
    assert snapshot["totals"]["compressed_requests"] > 0


def test_a_fault_on_one_rank_is_served_dense_by_every_rank(tp2_server, stock_tp2_server):
    text, data = _image_request(20)
    rid = f"{FAIL_RID_PREFIX}-0"
    got = generate(tp2_server.base_url, text, data, max_new_tokens=12, rid=rid)
    want = generate(stock_tp2_server.base_url, text, data, max_new_tokens=12)
    assert got["output_ids"] == want["output_ids"]
    record = _record(tp2_server, got)  # rank 0's record: rank 0 itself observed it fine
    assert not record["compressed"] and record["dense_reason"] == "compression_error"
    log = tp2_server.log()
    assert "fault injected on attention-TP rank 1" in log
    assert f"compression of {rid} failed, serving it dense" in log
    assert "could not observe it" in log  # rank 0 learnt it from the gather
    after = generate(tp2_server.base_url, *_image_request(21))
    assert _record(tp2_server, after)["compressed"]  # the server goes on compressing


@pytest.fixture(scope="module", params=["in_place", "compact"])
def dp2_server(
    request: pytest.FixtureRequest, tiny_model: Path, server_logs: Path
) -> Iterator[RunningServer]:
    config = COMPRESSING.model_copy(update={"storage": request.param})
    with serve(
        tiny_model,
        server_logs,
        f"dp2_{request.param}",
        config,
        _overrides("--dp-size", "2"),
        **TWO_RANKS,
        **STRICT_MEMORY_CHECK,
    ) as server:
        yield server


def test_dp2_serves_and_adds_its_schedulers_stats_up(dp2_server):
    storage = "compact" if "compact" in dp2_server.log_path.name else "in_place"
    requests_sent = 8

    def one(i: int) -> dict:
        return generate(dp2_server.base_url, *_image_request(30 + i), max_new_tokens=6)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(one, range(requests_sent)))
    states = [s["hybridkv"] for s in dp2_server.server_info()["internal_states"]]
    assert len(states) == 2
    assert all(s["requests"] for s in states), "both schedulers served some requests"
    for reply in replies:
        record, entry_bytes = request_record(dp2_server.base_url, reply["meta_info"]["id"])
        assert record["compressed"] and record["storage"] == storage and entry_bytes > 0
    assert_nothing_left_behind(dp2_server)  # on the merged snapshot of both schedulers
    totals = merged_totals(dp2_server.base_url)
    internal_states = dp2_server.server_info()["internal_states"]
    per_scheduler = [s["hybridkv"]["totals"] for s in internal_states]
    assert totals["compressed_requests"] == sum(t["compressed_requests"] for t in per_scheduler)
    assert all(s["hybridkv_server_totals"] == totals for s in internal_states)
    assert totals["compressed_requests"] >= requests_sent
    if storage == "compact":
        assert totals["compacted_requests"] >= requests_sent


@pytest.mark.parametrize(
    ("flags", "config", "named"),
    [
        (["--tp-size", "2"], HybridKVConfig(storage="compact"), "--tp-size > 1"),
        (["--pp-size", "2"], HybridKVConfig(), "--pp-size > 1"),
        (["--disaggregation-mode", "prefill"], HybridKVConfig(), "PD disaggregation"),
    ],
)
def test_unsupported_scale_out_is_refused_before_loading_the_model(
    tiny_model, flags, config, named
):
    env = {**os.environ, **TWO_RANKS, ENV_VAR: config.to_env()}
    command = [sys.executable, "-m", "hybridkv_sglang.cli", *flags]
    done = subprocess.run(
        command + cpu_server_args(tiny_model, free_port()),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert named in output, output[-3000:]
    assert "Load weight begin" not in output and "Init torch distributed" not in output
