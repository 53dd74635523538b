"""Decode time per token and prefill time: hybridkv (budgets 10/20/100 %) vs stock SGLang.

Real SGLang servers, one after another (never in parallel): a stock server (``torch_native`` on
CPU, ``flashinfer`` with ``--device cuda``) and one ``hybridkv-serve`` per budget, all with the
same flags. Each serves the same multi-image prompts (same image seeds) of 2K/4K/8K visual tokens.
The model is a random-weight Qwen2.5-VL from the tiny-model builder's ``bench7b`` preset: the KV
layout of Qwen2.5-VL-7B (28 query / 4 KV heads, GQA 7:1, head dim 128, hidden 3584) with 2 layers.
Its vision tower is shrunk (depth 1, hidden 32, 2 heads): it does not touch decode, and SGLang's
CPU vision attention is quadratic in the patches of one ViT call.

Per server: one warm-up request (one small image, compressed by hybridkv), then per prompt size
``--repeats`` streamed greedy ``/generate`` requests (``ignore_eos``). Repeat 0 sees fresh images:
its time to first token is the prefill time (image processing, vision tower, chunked prefill and,
for hybridkv, the compression at prefill end). Later repeats send the identical prompt and hit
SGLang's prefix cache (hybridkv still plans and compresses the request); they add decode samples.
Decode ms/token of a request is (time of the last streamed chunk - time of the first) / (tokens
decoded after the first); the row reports the median over repeats. (On a busy CPU chunks arrive
in bursts, so the median chunk gap, kept as ``gap_ms_median``, is biased upwards.) Speed-ups are
stock / hybridkv within this run.

On CPU this measures hybridkv's pure-torch reference decode path (``sparse_decode_reference`` plus
per-step page-table building) against SGLang's torch_native SDPA per request -- NOT the FlashInfer
path used on GPUs.

Run: ``python bench/decode_speed.py`` (13-17 min on 2 busy shared CPU cores); writes
``bench/results/decode_speed.json`` and ``bench/results/decode_speed.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import torch
from tqdm import tqdm

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.testing.images import image_base64
from hybridkv_sglang.testing.server import (
    NO_CUDA_GRAPHS,
    RunningServer,
    cpu_rank_binding,
    free_port,
    launch_server,
    serve_command,
    sglang_serve,
    stock_environment,
)
from hybridkv_sglang.testing.tiny_model import (
    PIXELS_PER_VISUAL_TOKEN,
    build_tiny_qwen2_5_vl,
    cached_build,
    resolve_spec,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".cache"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QUESTION = "Describe every picture in detail, one after another."
MERGED_SIDE = math.isqrt(PIXELS_PER_VISUAL_TOKEN)  # 28 px: one merged visual token
NOTE = (
    "CPU numbers measure hybridkv's pure-torch reference decode path (sparse_decode_reference "
    "plus per-step page-table building) against stock SGLang's torch_native backend (SDPA per "
    "request), NOT the FlashInfer path used on GPUs. Random-weight model with the KV layout of "
    "Qwen2.5-VL-7B (2 layers): speed only, outputs are meaningless."
)
# Model: the bench7b KV layout; a small vision tower (does not affect decode; SGLang's CPU vision
# attention builds a dense [patches, patches] mask per ViT call).
MODEL_OVERRIDES: dict[str, Any] = {
    "vision_depth": 1,
    "vision_hidden": 32,
    "vision_heads": 2,
    "vision_intermediate": 64,
}


# Prompts -------------------------------------------------------------------------------------


def image_sizes(
    visual_tokens: int, tokens_per_image: int, width_tokens: int
) -> list[tuple[int, int]]:
    """(width, height) in pixels of the images whose visual tokens sum to ``visual_tokens``.

    Images are ``width_tokens`` merged tokens wide (28 px each); rows are spread over
    ``ceil(visual_tokens / tokens_per_image)`` images. Sizes are multiples of 28 px, so Qwen's
    resize leaves them as they are (within the model's pixel limits).
    """
    rows = math.ceil(visual_tokens / width_tokens)
    count = max(1, math.ceil(visual_tokens / tokens_per_image))
    per_image = [rows // count + (1 if i < rows % count else 0) for i in range(count)]
    return [(width_tokens * MERGED_SIDE, r * MERGED_SIDE) for r in per_image if r > 0]


def chat_prompt(images: int) -> str:
    """Qwen chat-template text with ``images`` image placeholders before the question."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE * images}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def prompt_images(sizes: list[tuple[int, int]], seed: int) -> list[str]:
    return [image_base64(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)]


# Servers -------------------------------------------------------------------------------------


def server_configs(
    budgets: list[float], min_prompt_tokens: int
) -> list[tuple[str, HybridKVConfig | None]]:
    configs: list[tuple[str, HybridKVConfig | None]] = [("stock", None)]
    for budget in budgets:
        config = HybridKVConfig(budget=budget, min_prompt_tokens=min_prompt_tokens)
        configs.append((f"hybridkv@{budget:g}", config))
    return configs


@contextlib.contextmanager
def launch(
    args: argparse.Namespace, model: Path, hybridkv: HybridKVConfig | None, log_path: Path
) -> Iterator[RunningServer]:
    """A server on ``args.device`` with the flags every configuration shares."""
    extra = [
        "--chunked-prefill-size",
        str(args.chunked_prefill_size),
        "--tp-size",
        str(args.tp_size),
    ]
    sizes = {
        "max_total_tokens": args.max_total_tokens,
        "context_length": args.context_length,
        "max_running_requests": 4,
    }
    if args.device == "cpu":
        threads = {"OMP_NUM_THREADS": str(args.threads)}
        if args.tp_size > 1:
            threads |= cpu_rank_binding(args.tp_size)
        with launch_server(
            model, hybridkv=hybridkv, log_path=log_path, extra_args=extra, env=threads, **sizes
        ) as server:
            yield server
        return
    with _launch_cuda(args, model, hybridkv, log_path, extra, sizes) as server:
        yield server


@contextlib.contextmanager
def _launch_cuda(
    args: argparse.Namespace,
    model: Path,
    hybridkv: HybridKVConfig | None,
    log_path: Path,
    extra: list[str],
    sizes: dict[str, int],
) -> Iterator[RunningServer]:
    """Like ``launch_server`` on a GPU: stock FlashInfer vs hybridkv (which wraps FlashInfer).

    ``launch_server`` is CPU-only (it pins ``--device cpu``, float32 and, for stock,
    ``torch_native``). Both decode under CUDA graphs unless ``--no-cuda-graph`` (prefill graphs
    are off for both: hybridkv refuses them). UNTESTED here (written on a machine without a GPU).
    """
    port = free_port()
    graphs = ["--cuda-graph-backend-prefill", "disabled"] if args.cuda_graph else NO_CUDA_GRAPHS
    flags = [
        "--model-path", str(model),
        "--device", "cuda",
        "--dtype", args.cuda_dtype,
        *graphs,
        "--max-total-tokens", str(sizes["max_total_tokens"]),
        "--context-length", str(sizes["context_length"]),
        "--max-running-requests", str(sizes["max_running_requests"]),
        "--skip-server-warmup",
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", ENV_VAR)}
    if hybridkv is None:
        command = [*sglang_serve(), *flags]
        command += ["--attention-backend", "flashinfer"]
        env = stock_environment(env)
    else:
        command = [sys.executable, "-m", "hybridkv_sglang.cli", *flags]
        env[ENV_VAR] = hybridkv.to_env()
    with serve_command(command, port, log_path, env, timeout_s=args.startup_timeout) as server:
        yield server


# Measurement ---------------------------------------------------------------------------------


def stream_generate(
    base_url: str, text: str, images: list[str], new_tokens: int, rid: str, timeout: float
) -> dict[str, Any]:
    """One streamed greedy ``/generate``; chunk arrival times and their completion-token counts."""
    payload = {
        "rid": rid,
        "text": text,
        "image_data": images,
        "stream": True,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    chunks: list[tuple[float, int]] = []
    meta: dict[str, Any] = {}
    start = time.perf_counter()
    with requests.post(f"{base_url}/generate", json=payload, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data:"):
                continue
            body = line[len(b"data:") :].strip()
            if body == b"[DONE]":
                break
            data = json.loads(body)
            meta = data["meta_info"]
            chunks.append((time.perf_counter() - start, int(meta["completion_tokens"])))
    if not chunks:
        raise RuntimeError(f"request {rid} streamed no tokens")
    per_token = [
        (t1 - t0) / (n1 - n0) for (t0, n0), (t1, n1) in itertools.pairwise(chunks) if n1 > n0
    ]
    (t_first, n_first), (t_last, n_last) = chunks[0], chunks[-1]
    decoded = n_last - n_first
    return {
        "rid": meta.get("id", rid),
        "prompt_tokens": meta.get("prompt_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
        "completion_tokens": n_last,
        "ttft_s": t_first,
        "decode_ms_per_token": 1000 * (t_last - t_first) / decoded if decoded else math.nan,
        "gap_ms_median": 1000 * statistics.median(per_token) if per_token else math.nan,
        "gaps_ms": [round(1000 * g, 1) for g in per_token],
        "chunks": len(chunks),
    }


def hybridkv_record(server: RunningServer, rid: str) -> dict[str, Any]:
    record = server.hybridkv_stats()["requests"].get(rid)
    if record is None:
        return {"compressed": None}
    keys = ("compressed", "dense_reason", "read_fraction", "static_heads", "dynamic_heads",
            "kept_entries", "prompt_entries", "visual_tokens", "decode_steps")  # fmt: skip
    return {k: record.get(k) for k in keys}


def run_server(
    args: argparse.Namespace,
    name: str,
    hybridkv: HybridKVConfig | None,
    model: Path,
    prompts: list[dict[str, Any]],
    progress: tqdm,
) -> list[dict[str, Any]]:
    log_path = CACHE / "bench-logs" / "decode_speed" / f"{name}.log"
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with launch(args, model, hybridkv, log_path) as server:
        startup_s = time.perf_counter() - started
        warm = prompt_images([(448, 448)], seed=7)
        stream_generate(
            server.base_url, chat_prompt(1), warm, 8, f"{name}-warmup", args.request_timeout
        )
        for prompt in prompts:
            progress.set_postfix_str(f"{name} {prompt['visual_tokens']} visual tokens")
            load_before = os.getloadavg()[0]
            results = []
            for rep in range(args.repeats):
                rid = f"{name}-{prompt['visual_tokens']}-r{rep}"
                result = stream_generate(
                    server.base_url,
                    prompt["text"],
                    prompt["images"],
                    args.new_tokens,
                    rid,
                    args.request_timeout,
                )
                if hybridkv is not None:
                    result["hybridkv"] = hybridkv_record(server, result["rid"])
                results.append(result)
            rows.append(summarise(name, hybridkv, prompt, results, startup_s, load_before))
            progress.update(1)
    return rows


def summarise(
    name: str,
    hybridkv: HybridKVConfig | None,
    prompt: dict[str, Any],
    results: list[dict[str, Any]],
    startup_s: float,
    load_before: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "config": name,
        "budget": None if hybridkv is None else hybridkv.budget,
        "visual_tokens": prompt["visual_tokens"],
        "images": len(prompt["images"]),
        "prompt_tokens": results[0]["prompt_tokens"],
        "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in results),
        "gap_ms_median": statistics.median(r["gap_ms_median"] for r in results),
        "prefill_s": results[0]["ttft_s"],
        "cached_ttft_s": (
            statistics.median(r["ttft_s"] for r in results[1:]) if len(results) > 1 else None
        ),
        "server_startup_s": round(startup_s, 1),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "requests": results,
    }
    if hybridkv is not None:
        records = [r["hybridkv"] for r in results]
        row["compressed"] = all(bool(r.get("compressed")) for r in records)
        for key in ("read_fraction", "static_heads", "dynamic_heads", "kept_entries"):
            values = [r[key] for r in records if r.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
    return row


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_decode`` / ``speedup_prefill``: stock time / this config's time, same prompt."""
    stock = {r["visual_tokens"]: r for r in rows if r["config"] == "stock"}
    for row in rows:
        base = stock.get(row["visual_tokens"])
        if base is None:
            row["speedup_decode"] = row["speedup_prefill"] = None
            continue
        row["speedup_decode"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["speedup_prefill"] = base["prefill_s"] / row["prefill_s"]


# Output --------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| visual tokens | prompt tokens | config | read frac | static/dynamic heads | "
        "prefill s | decode ms/token | decode speed-up vs stock |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["visual_tokens"], r["budget"] or 2.0)):
        read = f"{r['read_fraction']:.3f}" if r.get("read_fraction") is not None else "1 (dense)"
        heads = (
            f"{r['static_heads']:g}/{r['dynamic_heads']:g}"
            if r.get("static_heads") is not None
            else "-"
        )
        speed = f"{r['speedup_decode']:.2f}x" if r.get("speedup_decode") else "-"
        lines.append(
            f"| {r['visual_tokens']} | {r['prompt_tokens']} | {r['config']} | {read} | {heads} | "
            f"{r['prefill_s']:.1f} | {r['decode_ms_per_token']:.1f} | {speed} |"
        )
    return "\n".join(lines)


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    with contextlib.suppress(Exception):
        import sglang

        info["sglang"] = sglang.__version__
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plot(rows: list[dict[str, Any]], configs: list[str], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("decode_ms_per_token", "decode ms / token (median of repeats)", False),
        ("speedup_decode", "decode speed-up (stock / hybridkv)", True),
        ("prefill_s", "prefill: time to first token (s)", False),
    ]
    for ax, (metric, title, skip_stock) in zip(axes, panels, strict=True):
        for name in configs:
            if skip_stock and name == "stock":
                continue
            pts = sorted(
                (r["visual_tokens"], r[metric])
                for r in rows
                if r["config"] == name and r.get(metric) is not None
            )
            if pts:
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    marker="o",
                    label=name,
                    color="black" if name == "stock" else None,
                    linestyle="--" if name == "stock" else "-",
                )
        if skip_stock:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens in the prompt")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    backend = "torch reference path vs torch_native" if device == "cpu" else "FlashInfer"
    fig.suptitle(
        f"Decode speed, Qwen2.5-VL-7B KV layout (2 layers, random weights), {device}: {backend}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Main ----------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    options = {**MODEL_OVERRIDES, "layers": args.layers}  # float32 on disk; CUDA servers cast
    spec = resolve_spec("bench7b", **options)
    if args.model_dir is not None:
        path = build_tiny_qwen2_5_vl(args.model_dir, preset="bench7b", **options)
    else:
        path = cached_build(CACHE / "bench-models", preset="bench7b", **options)
    return path, {"preset": "bench7b", "path": str(path), **vars(spec), "head_dim": spec.head_dim}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-visual-tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 1.0])
    parser.add_argument("--new-tokens", type=int, default=16, help="decode tokens per request")
    parser.add_argument(
        "--repeats", type=int, default=2,
        help="requests per prompt and server; the first is a full prefill, later ones hit the "
        "prefix cache",
    )  # fmt: skip
    parser.add_argument("--tokens-per-image", type=int, default=1024)
    parser.add_argument("--image-width-tokens", type=int, default=32, help="x 28 px")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: .cache/bench-models")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cuda-dtype", default="bfloat16")
    parser.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--device cuda: decode under CUDA graphs (stock and hybridkv alike)",
    )
    parser.add_argument(
        "--chunked-prefill-size", type=int, default=2048,
        help="same for every server; bounds the images per ViT call (SGLang's CPU vision "
        "attention is quadratic in them)",
    )  # fmt: skip
    parser.add_argument("--min-prompt-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: OMP_NUM_THREADS of every server. 1 by default: on a small shared machine, "
        "OpenMP barriers across many small per-layer ops stall whenever another process holds a "
        "core, which swamps the measurement (seen: the same decode step at 14 ms or 470 ms)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--tp-size", type=int, default=1, help="SGLang --tp-size (on CPU, ranks split the cores)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: decode_speed[_tpN].json in results"
    )
    parser.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = parser.parse_args(argv)
    suffix = "" if args.tp_size == 1 else f"_tp{args.tp_size}"
    args.out = args.out or RESULTS / f"decode_speed{suffix}.json"
    args.plot = args.plot or args.out.with_suffix(".png")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")

    started = time.time()
    model, model_info = build_model(args)
    spec = resolve_spec("bench7b", **{**MODEL_OVERRIDES, "layers": args.layers})
    prompts = []
    for visual in args.prompt_visual_tokens:
        sizes = image_sizes(visual, args.tokens_per_image, args.image_width_tokens)
        prompts.append(
            {
                "visual_tokens": sum(spec.image_tokens(w, h) for w, h in sizes),
                "image_sizes": sizes,
                "text": chat_prompt(len(sizes)),
                "images": prompt_images(sizes, seed=visual),
            }
        )
    longest = max(p["visual_tokens"] + 16 * len(p["image_sizes"]) for p in prompts)
    args.context_length = longest + 256 + args.new_tokens
    args.max_total_tokens = 2 * args.context_length
    configs = server_configs(args.budgets, args.min_prompt_tokens)

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with tqdm(total=len(configs) * len(prompts), desc="decode_speed", unit="case") as progress:
        for name, config in configs:
            try:
                rows += run_server(args, name, config, model, prompts, progress)
            except Exception as error:  # report the failure, keep measuring the others
                log = CACHE / "bench-logs" / "decode_speed" / f"{name}.log"
                tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
                failures.append(
                    {
                        "config": name,
                        "error": repr(error)[:2000],
                        "log_tail": tail,
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
                tqdm.write(f"{name} FAILED: {error!r}\n{tail[-2000:]}")
    add_speedups(rows)
    elapsed = time.time() - started

    table = markdown_table(rows)
    print(f"\n{NOTE}\n\n{table}\n\n{len(rows)} cases in {elapsed / 60:.1f} min")
    payload = {
        "benchmark": "decode_speed",
        "note": NOTE,
        "machine": machine_info(args.device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": model_info,
        "server_flags": {
            "chunked_prefill_size": args.chunked_prefill_size,
            "context_length": args.context_length,
            "max_total_tokens": args.max_total_tokens,
            "dense_backend": "torch_native" if args.device == "cpu" else "flashinfer",
            "dtype": "float32" if args.device == "cpu" else args.cuda_dtype,
        },
        "prompts": [
            {k: p[k] for k in ("visual_tokens", "image_sizes")} | {"seed": v}
            for p, v in zip(prompts, args.prompt_visual_tokens, strict=True)
        ],
        "method": (
            "decode ms/token: per request, (last chunk time - first chunk time) / tokens decoded "
            "after the first; row = median over repeats. gap_ms_median: median per-token gap "
            "between streamed chunks (biased up when chunks arrive in bursts). prefill_s: time to "
            "first token of repeat 0 (fresh images, no prefix-cache hit). cached_ttft_s: later "
            "repeats, which hit the prefix cache. speedup = stock / config, same prompt, same run."
        ),
        "elapsed_s": round(elapsed, 1),
        "failures": failures,
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if rows:
        plot(rows, [name for name, _ in configs], args.plot, args.device)
    print(f"wrote {args.out} and {args.plot}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
