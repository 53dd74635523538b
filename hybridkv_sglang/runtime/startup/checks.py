"""Server flag combinations hybridkv cannot serve, refused at start-up with the flag named.

Checked twice with the same function: in the launching process, right after SGLang resolves its
server arguments and before any scheduler loads a model weight (``hooks.launch.check_at_launch``),
and by the backend factory, which also knows the model (sliding-window layers).
"""

from __future__ import annotations

from typing import Any


def check_supported(
    server_args: Any, sliding_window_size: int | None, storage: str = "in_place"
) -> None:
    """Refuse, at start-up, combinations whose dense bookkeeping would bypass the plugin."""
    compact = storage == "compact"
    refusals = {
        "models with sliding-window attention layers": sliding_window_size is not None
        and sliding_window_size > 0,
        "speculative decoding (--speculative-algorithm)": server_args.speculative_algorithm
        is not None,
        "quantized KV (--kv-cache-dtype fp8/fp4: the chunk key bounds and Quest scores read the "
        "pool unscaled; use --kv-cache-dtype auto)": str(
            getattr(server_args, "kv_cache_dtype", "auto")
        ).startswith(("fp8", "fp4")),
        "--page-size > 1 (hybridkv selects single tokens; use --page-size 1)": (
            server_args.page_size or 1
        )
        > 1,
        "--enable-mixed-chunk (decode rows would take the dense extend path)": bool(
            server_args.enable_mixed_chunk
        ),
        "prefill CUDA graphs (add --cuda-graph-backend-prefill disabled; decode CUDA graphs are "
        "supported)": str(server_args.device).startswith("cuda")
        and prefill_graph_backend(server_args) != "disabled",
        "storage='compact' without the radix cache (remove --disable-radix-cache)": compact
        and bool(server_args.disable_radix_cache),
        "storage='compact' with --enable-hierarchical-cache": compact
        and bool(server_args.enable_hierarchical_cache),
        "PD disaggregation (--disaggregation-mode prefill/decode: the decode server receives "
        "dense KV and would never compress it)": str(
            getattr(server_args, "disaggregation_mode", "null")
        )
        != "null",
        "--pp-size > 1 (pipeline parallelism: the plan ranks the heads of every layer, and "
        "each stage holds only its own layers)": getattr(server_args, "pp_size", 1) > 1,
        "--enable-dp-attention (use --dp-size N without it, or --tp-size)": bool(
            getattr(server_args, "enable_dp_attention", False)
        ),
        "storage='compact' with --tp-size > 1 (each rank's compact slots hold a different "
        "number of its heads' entries; use storage='in_place' with TP, or compact with "
        "--dp-size)": compact and server_args.tp_size > 1,
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise NotImplementedError(
            "--attention-backend hybridkv does not support " + "; ".join(refused) + " yet"
        )


def prefill_graph_backend(server_args: Any) -> str:
    """The prefill CUDA-graph backend SGLang resolved (``"disabled"`` when off)."""
    if server_args.disable_cuda_graph or getattr(server_args, "disable_prefill_cuda_graph", False):
        return "disabled"
    config = getattr(server_args, "cuda_graph_config", None)
    prefill = getattr(config, "prefill", None)
    return str(getattr(prefill, "backend", "disabled"))


def check_cpu_head_split(tp_size: int, kv_heads: int) -> None:
    """On a CPU, SGLang pads kv heads that ``--tp-size`` does not divide with zero-weight heads
    (on a GPU it replicates them, which the plan follows); the plan would count the padding."""
    if tp_size > 1 and kv_heads % tp_size:
        padded = -(-kv_heads // tp_size) * tp_size
        raise NotImplementedError(
            f"--attention-backend hybridkv on CPU with --tp-size {tp_size}: SGLang pads the "
            f"model's {kv_heads} kv heads to {padded} (zero-weight heads), which the plan would "
            f"count as heads; use a --tp-size that divides {kv_heads}"
        )
