"""Combinations hybridkv cannot serve yet are refused at start-up, each named."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hybridkv_sglang.runtime.startup.checks import check_cpu_head_split, check_supported
from hybridkv_sglang.runtime.startup.factory import dense_backend_name


def _args(**overrides):
    base = {
        "speculative_algorithm": None,
        "page_size": 1,
        "enable_mixed_chunk": False,
        "device": "cpu",
        "disable_cuda_graph": True,
        "disable_radix_cache": False,
        "enable_hierarchical_cache": False,
        "disaggregation_mode": "null",
        "tp_size": 1,
        "pp_size": 1,
        "dp_size": 1,
    }
    return SimpleNamespace(**{**base, **overrides})


def _graphs(prefill: str) -> SimpleNamespace:
    """SGLang's resolved CUDA-graph config: decode captured, prefill as given."""
    return SimpleNamespace(
        decode=SimpleNamespace(backend="full"), prefill=SimpleNamespace(backend=prefill)
    )


def test_plain_cpu_server_is_accepted():
    check_supported(_args(), sliding_window_size=None)
    check_supported(_args(device="cuda"), sliding_window_size=-1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"cuda_graph_config": _graphs("disabled")},
        {"cuda_graph_config": _graphs("breakable"), "disable_prefill_cuda_graph": True},
    ],
)
def test_decode_cuda_graphs_are_accepted(overrides):
    """Decode graphs replay the fixed decode tables; only prefill graphs are refused."""
    check_supported(_args(device="cuda", disable_cuda_graph=False, **overrides), None)


@pytest.mark.parametrize(
    ("overrides", "window", "named"),
    [
        ({"speculative_algorithm": "EAGLE"}, None, "speculative decoding"),
        ({"page_size": 16}, None, "--page-size > 1"),
        ({"enable_mixed_chunk": True}, None, "--enable-mixed-chunk"),
        (
            {"device": "cuda", "disable_cuda_graph": False, "cuda_graph_config": _graphs("full")},
            None,
            "--cuda-graph-backend-prefill disabled",
        ),
        ({}, 4096, "sliding-window"),
        ({"kv_cache_dtype": "fp8_e4m3"}, None, "--kv-cache-dtype fp8"),
        ({"disaggregation_mode": "prefill"}, None, "--disaggregation-mode"),
        ({"pp_size": 2}, None, "--pp-size > 1"),
        ({"enable_dp_attention": True}, None, "--enable-dp-attention"),
    ],
)
def test_unsupported_combination_is_named(overrides, window, named):
    with pytest.raises(NotImplementedError, match="hybridkv does not support") as err:
        check_supported(_args(**overrides), sliding_window_size=window)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"disable_radix_cache": True}, "without the radix cache"),
        ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
        ({"tp_size": 2}, "--tp-size > 1"),
    ],
)
def test_compact_storage_refuses_what_its_slot_protocol_cannot_serve(overrides, named):
    check_supported(_args(**overrides), sliding_window_size=None, storage="in_place")
    check_supported(_args(), sliding_window_size=None, storage="compact")
    with pytest.raises(NotImplementedError, match=named):
        check_supported(_args(**overrides), sliding_window_size=None, storage="compact")


def test_tensor_and_data_parallelism_are_accepted():
    """In place under TP (ranks agree on plans and decisions); compact under plain DP (each
    replica its own scheduler, allocator and tree)."""
    check_supported(_args(tp_size=2, dp_size=2), sliding_window_size=None, storage="in_place")
    check_supported(_args(dp_size=2), sliding_window_size=None, storage="compact")


def test_dense_backend_per_device():
    assert dense_backend_name("cpu") == "torch_native"
    assert dense_backend_name("cuda:0") == "flashinfer"


def test_cpu_tensor_parallelism_must_divide_the_kv_heads():
    check_cpu_head_split(tp_size=2, kv_heads=4)
    check_cpu_head_split(tp_size=1, kv_heads=3)
    with pytest.raises(NotImplementedError, match="pads the model's 3 kv heads to 4"):
        check_cpu_head_split(tp_size=2, kv_heads=3)
