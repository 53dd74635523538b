"""Kernel-level decode step on CPU: hybridkv's per-head sparse decode vs dense SDPA.

One decode step of one layer at Qwen2.5-VL-7B's attention shapes (28 query heads, 4 kv heads,
head dim 128), for contexts and batch sizes, in-process (no server):

- dense: what SGLang's torch_native backend does per request (gather the row, SDPA with GQA);
- hybridkv: build the layer's folded page table (static kept positions, dynamic chunk retrieval
  for this step's query) and run the sparse reference attention, for plans made by the real
  policy at each budget on random KV.

Random KV: the plans' head types follow from random attention, so this times the machinery at
the budget, not the method's quality. Times are medians of repeats, ratios within one run.
CPU only: on a GPU the decode runs through FlashInfer, which this does not measure.

    python bench/sparse_decode_kernel.py [--contexts 8192 16384 32768] [--batches 1 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from tqdm import tqdm

from hybridkv_sglang.attention.sparse_decode import sparse_decode_reference
from hybridkv_sglang.policy import build_policy
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout

RESULTS = Path(__file__).resolve().parent / "results"
Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
GROUP = Q_HEADS // KV_HEADS
SCALE = HEAD_DIM**-0.5
TAIL = 16
NOTE = (
    "CPU, one layer, random KV at Qwen2.5-VL-7B attention shapes (28 q / 4 kv heads, D 128); "
    "dense = SGLang torch_native's per-request SDPA; hybridkv = folded page-table build + "
    "sparse reference attention over the real policy's plan. Not FlashInfer, not a model."
)


def make_pool(batch: int, context: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    per_request = context + TAIL
    slots = batch * per_request + 1
    keys = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen)
    values = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen)
    req_to_token = torch.zeros(batch + 1, per_request, dtype=torch.int32)
    order = torch.randperm(slots - 1, generator=gen) + 1
    for b in range(batch):
        req_to_token[b + 1] = order[b * per_request : (b + 1) * per_request].to(torch.int32)
    return keys, values, req_to_token


def plan_layout(budget: float, keys: torch.Tensor, row: torch.Tensor, context: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    policy = build_policy("hybridkv", budget=budget)
    q_window = torch.randn(policy.window, Q_HEADS, HEAD_DIM, generator=gen)
    observation = policy.observe_layer(0, q_window, keys[row[:context].long()], SCALE)
    is_text = torch.zeros(context, dtype=torch.bool)
    is_text[:64] = True
    is_text[-64:] = True
    plan = policy.finalize([observation], is_text)
    return CompressedLayout.from_plan(plan, "cpu"), plan.stats()


def dense_step(q, keys, values, req_to_token, seq_len: int) -> None:
    for b in range(q.shape[0]):
        row = req_to_token[b + 1, :seq_len].long()
        k = keys[row].movedim(0, 1).unsqueeze(0)
        v = values[row].movedim(0, 1).unsqueeze(0)
        scaled_dot_product_attention(
            q[b].unsqueeze(1).unsqueeze(0), k, v, enable_gqa=True, scale=SCALE
        )


def sparse_step(q, keys, values, req_to_token, batch_layout: DecodeBatchLayout) -> None:
    q_rows = q.reshape(-1, GROUP, HEAD_DIM)
    table = batch_layout.layer_table(0, q_rows, req_to_token)
    sparse_decode_reference(
        q_rows,
        keys.view(-1, HEAD_DIM),
        values.view(-1, HEAD_DIM),
        table.kv_indptr,
        table.kv_indices,
        SCALE,
    )


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 1.0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse_decode_kernel.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    cases = [(c, b) for c in args.contexts for b in args.batches]
    for context, batch in tqdm(cases, desc="sparse_decode_kernel", unit="case"):
        keys, values, req_to_token = make_pool(batch, context, seed=context + batch)
        seq_len = context + TAIL
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
        dense_ms = median_ms(
            functools.partial(dense_step, q, keys, values, req_to_token, seq_len), args.repeats
        )
        rows.append(
            {"context": context, "batch": batch, "config": "dense", "ms": dense_ms, "read": 1.0}
        )
        for budget in args.budgets:
            layouts, stats = [], None
            for b in range(batch):
                layout, stats = plan_layout(budget, keys, req_to_token[b + 1], context, seed=b)
                layouts.append(layout)
            batch_layout = DecodeBatchLayout(
                list(range(1, batch + 1)), [seq_len] * batch, layouts, KV_HEADS
            )
            ms = median_ms(
                functools.partial(sparse_step, q, keys, values, req_to_token, batch_layout),
                args.repeats,
            )
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "config": f"hybridkv@{budget:g}",
                    "ms": ms,
                    "read": layouts[0].read_fraction,
                    "dynamic_heads": stats["dynamic_heads"],
                    "speedup": dense_ms / ms,
                }
            )

    header = (
        "| context | batch | config | read | ms/step/layer | speed-up |\n"
        "|---:|---:|---|---:|---:|---:|"
    )
    lines = [
        f"| {r['context']} | {r['batch']} | {r['config']} | {r['read']:.3f} | {r['ms']:.2f} | "
        f"{r.get('speedup', 1.0):.2f}x |"
        for r in rows
    ]
    print(f"\n{NOTE}\n\n{header}\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "sparse_decode_kernel",
        "note": NOTE,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    plot(rows, args, args.out.with_suffix(".png"))
    return 0


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 4))
    axes = [axes] if len(args.batches) == 1 else list(axes)
    for ax, batch in zip(axes, args.batches, strict=True):
        for config in ["dense"] + [f"hybridkv@{b:g}" for b in args.budgets]:
            points = [
                (r["context"], r["ms"])
                for r in rows
                if r["batch"] == batch and r["config"] == config
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=config)
        ax.set(title=f"batch {batch}", xlabel="context (tokens)", ylabel="ms / decode step / layer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CPU decode step, one layer, Qwen2.5-VL-7B attention shapes (random KV)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
