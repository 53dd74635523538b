"""Serving capacity at a fixed KV pool: stock SGLang vs hybridkv ``compact`` at 10 % and 20 %.

Real SGLang servers, one after another, all with the same ``--max-total-tokens``. Each gets the
same burst of concurrent image requests (distinct images, a few thousand prompt tokens each,
greedy, ``ignore_eos``). While the burst runs, a sampler reads SGLang's own counters through
``/v1/loads`` (running and waiting requests, pool tokens in use: neither available nor
evictable) and, on hybridkv servers, the live compact slots through ``/server_info``, every
``--sample-every`` seconds. The stock server runs without the plugin (``stock_environment``).

Reported per server:
- peak and median running requests (samples while requests were waiting: the pool, not the
  burst, was the limit);
- throughput: output tokens / s and requests / s over the burst (first submit to last finish);
- device KV per request: what a decoding request holds that the tree cannot evict; stock: its
  locked dense prompt plus its decode tokens; compact: its compact slots (from hybridkv's
  per-request record) plus its decode tokens. Bytes are tokens x the model's KV bytes per token,
  and, as a projection, x Qwen2.5-VL-7B's (28 layers, 4 KV heads, head dim 128, bf16: 57,344
  B/token);
- the pool-level view of the same: (pool - available - evictable) / running, median over the
  samples (an upper bound: it also counts prompts still being prefilled, which are not running).
Ratios are against stock within this run.

On CPU the model is the tiny random Qwen2.5-VL of the test suite (outputs are meaningless; the
point is memory and scheduling), served by SGLang's torch-native backend (stock) and hybridkv's
torch reference decode path. Run: ``python bench/capacity.py`` (about 10 min on 2 CPU cores);
writes ``bench/results/capacity.json`` and ``bench/results/capacity.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
import torch
from tqdm import tqdm

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing.images import image_base64
from hybridkv_sglang.testing.server import RunningServer, cpu_rank_binding, launch_server
from hybridkv_sglang.testing.tiny_model import cached_build, resolve_spec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".cache"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MERGED_PX = 28
QWEN25_VL_7B_KV_BYTES_PER_TOKEN = 28 * 4 * 128 * 2 * 2


def prompt(i: int, images: int) -> str:
    return (
        f"<|im_start|>user\n{IMAGE * images}Request {i}: describe both pictures.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def server_configs(
    budgets: list[float], storage: str = "compact"
) -> list[tuple[str, HybridKVConfig | None]]:
    configs: list[tuple[str, HybridKVConfig | None]] = [("stock", None)]
    for budget in budgets:
        config = HybridKVConfig(budget=budget, storage=storage)
        configs.append((f"hybridkv-{storage.replace('_', '-')}@{budget:g}", config))
    return configs


class Sampler:
    """Polls the scheduler's counters in the background while a burst runs."""

    def __init__(self, server: RunningServer, every: float, hybridkv: bool) -> None:
        self.server = server
        self.every = every
        self.hybridkv = hybridkv
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.read()
            except (requests.RequestException, KeyError, IndexError):
                sample = None
            if sample:
                self.samples.append({"t": time.perf_counter(), **sample})
            self._stop.wait(self.every)

    def read(self) -> dict[str, Any]:
        """SGLang's own counters (the same on stock), plus hybridkv's live compact slots."""
        response = requests.get(f"{self.server.base_url}/v1/loads?include=core", timeout=60)
        response.raise_for_status()
        load = response.json()["loads"][0]
        sample = {
            "pool_tokens": load["max_total_num_tokens"],
            "used_tokens": load["num_used_tokens"],
            "running_requests": load["num_running_reqs"],
            "waiting_requests": load["num_waiting_reqs"],
        }
        if self.hybridkv:
            sample["compact_slots"] = self.server.hybridkv_stats()["memory"].get("compact_slots", 0)
        return sample


def send(url: str, text: str, images: list[str], new_tokens: int) -> dict[str, Any]:
    payload = {
        "text": text,
        "image_data": images,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    response = requests.post(f"{url}/generate", json=payload, timeout=3600)
    response.raise_for_status()
    return response.json()


def run_burst(
    server: RunningServer, args: argparse.Namespace, progress: tqdm, name: str, hybridkv: bool
) -> dict[str, Any]:
    side = args.image_tokens_side * MERGED_PX
    jobs = [
        (prompt(i, args.images), [image_base64(side, side, seed=1000 + 2 * i + j) for j in (0, 1)])
        for i in range(args.requests)
    ]
    with Sampler(server, args.sample_every, hybridkv) as sampler:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.requests) as pool:
            futures = [pool.submit(send, server.base_url, t, d, args.new_tokens) for t, d in jobs]
            results = []
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                progress.set_postfix_str(f"{name}: {len(results)}/{args.requests} done")
        wall = time.perf_counter() - start
    records = server.hybridkv_stats()["requests"] if hybridkv else {}
    return {"wall_s": wall, "results": results, "samples": sampler.samples, "records": records}


def summarise(
    name: str, burst: dict[str, Any], kv_bytes_per_token: int, new_tokens: int
) -> dict[str, Any]:
    results, samples = burst["results"], burst["samples"]
    records = [burst["records"].get(r["meta_info"]["id"], {}) for r in results]
    resident = [
        (
            rec["compact_slots"]
            if rec.get("storage") == "compact"
            else r["meta_info"]["prompt_tokens"]
        )
        + new_tokens
        for r, rec in zip(results, records, strict=True)
    ]
    resident_tokens = statistics.median(resident)
    busy = [s for s in samples if s.get("running_requests", 0) > 0]
    pool_bound = [s for s in busy if s.get("waiting_requests", 0) > 0] or busy
    held = [s["used_tokens"] / s["running_requests"] for s in busy]
    held_tokens = statistics.median(held) if held else float("nan")
    output_tokens = sum(r["meta_info"]["completion_tokens"] for r in results)
    prompt_tokens = [r["meta_info"]["prompt_tokens"] for r in results]
    return {
        "config": name,
        "requests": len(results),
        "prompt_tokens_median": statistics.median(prompt_tokens),
        "pool_tokens": busy[0]["pool_tokens"] if busy else None,
        "peak_running": max((s["running_requests"] for s in samples), default=0),
        "median_running_while_queued": statistics.median(
            [s["running_requests"] for s in pool_bound]
        )
        if pool_bound
        else 0,
        "wall_s": round(burst["wall_s"], 2),
        "output_tokens_per_s": round(output_tokens / burst["wall_s"], 2),
        "requests_per_s": round(len(results) / burst["wall_s"], 4),
        "kv_tokens_per_request": resident_tokens,
        "kv_bytes_per_request": round(resident_tokens * kv_bytes_per_token),
        "kv_bytes_per_request_qwen25vl7b": round(resident_tokens * QWEN25_VL_7B_KV_BYTES_PER_TOKEN),
        "compacted_requests": sum(rec.get("storage") == "compact" for rec in records),
        "held_tokens_per_running_request": round(held_tokens, 1),
        "peak_compact_slots": max((s.get("compact_slots", 0) for s in samples), default=0),
        "samples": len(samples),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    stock = next(r for r in rows if r["config"] == "stock")
    for row in rows:
        row["running_x_stock"] = round(row["peak_running"] / stock["peak_running"], 2)
        row["throughput_x_stock"] = round(
            row["output_tokens_per_s"] / stock["output_tokens_per_s"], 2
        )
        row["kv_bytes_per_request_vs_stock"] = round(
            row["kv_tokens_per_request"] / stock["kv_tokens_per_request"], 3
        )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | peak running | x stock | out tok/s | x stock | KV tokens / req | "
        "KV bytes / req (vs stock) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['peak_running']} | {r['running_x_stock']} | "
            f"{r['output_tokens_per_s']} | {r['throughput_x_stock']} | "
            f"{r['kv_tokens_per_request']} | {r['kv_bytes_per_request']} "
            f"({r['kv_bytes_per_request_vs_stock']}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    panels = [
        ("peak_running", "peak running requests"),
        ("output_tokens_per_s", "throughput (output tokens / s)"),
        ("kv_tokens_per_request", "device KV tokens per decoding request"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        values = [r[metric] for r in rows]
        bars = ax.bar(names, values, color=["black"] + ["tab:blue"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%g", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--requests", type=int, default=40, help="concurrent requests per burst")
    parser.add_argument("--images", type=int, default=2, choices=[2], help="images per request")
    parser.add_argument(
        "--image-tokens-side", type=int, default=32, help="merged tokens per image side (x 28 px)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-total-tokens", type=int, default=12288)
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--chunked-prefill-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per server rank")
    parser.add_argument(
        "--tp-size", type=int, default=1, help="SGLang --tp-size (CPU ranks share the cores)"
    )
    parser.add_argument("--sample-every", type=float, default=0.3)
    parser.add_argument(
        "--storage",
        choices=["compact", "in_place"],
        default="compact",
        help="hybridkv storage (in_place saves decode reads, not memory; compact needs TP 1)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: capacity[_tpN].json")
    args = parser.parse_args(argv)
    if args.storage == "compact" and args.tp_size > 1:
        parser.error("--storage compact is refused with --tp-size > 1; use --storage in_place")
    suffix = "" if args.tp_size == 1 else f"_tp{args.tp_size}"
    args.out = args.out or RESULTS / f"capacity{suffix}.json"
    tp_env = {} if args.tp_size == 1 else cpu_rank_binding(args.tp_size)

    side_px = args.image_tokens_side * MERGED_PX
    spec = resolve_spec("tiny", max_pixels=side_px * side_px)
    model = cached_build(CACHE / "bench-models", preset="tiny", max_pixels=side_px * side_px)
    kv_bytes_per_token = spec.layers * spec.kv_heads * spec.head_dim * 2 * 4  # float32 on CPU
    configs = server_configs(args.budgets, args.storage)
    rows = []
    with tqdm(total=len(configs), desc="capacity", unit="server") as progress:
        for name, config in configs:
            log_path = CACHE / "bench-logs" / "capacity" / f"{name}{suffix}.log"
            with launch_server(
                model,
                hybridkv=config,
                log_path=log_path,
                env={"OMP_NUM_THREADS": str(args.threads), **tp_env},
                max_total_tokens=args.max_total_tokens,
                context_length=8192,
                max_running_requests=args.max_running_requests,
                extra_args=[
                    "--chunked-prefill-size",
                    str(args.chunked_prefill_size),
                    "--tp-size",
                    str(args.tp_size),
                ],
            ) as server:
                send(
                    server.base_url,
                    prompt(-1, 2),
                    [image_base64(56, 56, seed=s) for s in (1, 2)],
                    4,
                )
                burst = run_burst(server, args, progress, name, config is not None)
            rows.append(summarise(name, burst, kv_bytes_per_token, args.new_tokens))
            progress.update(1)
    add_ratios(rows)
    table = markdown_table(rows)
    print(table)
    record = {
        "benchmark": "capacity",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"preset": "tiny", **vars(spec), "kv_bytes_per_token": kv_bytes_per_token},
        "machine": machine_info(),
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    title = (
        f"Capacity at --max-total-tokens {args.max_total_tokens}: {args.requests} concurrent "
        f"2-image requests (~{rows[0]['prompt_tokens_median']:.0f} tokens), CPU, tiny model, "
        f"TP {args.tp_size}"
    )
    plot(rows, title, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
