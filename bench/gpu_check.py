"""One prepared device check: what hybridkv runs on a GPU, checked and timed in one call.

1. compiled Triton kernels against their torch twins (fresh random inputs, serving shapes);
2. the fixed decode tables under a captured CUDA graph: stage a step, capture the in-graph chunk
   fill for every layer, re-stage the next step, replay, and compare entry for entry with the
   eager tables (proves the fill is graph-safe: no host sync, fixed shapes);
3. FlashInfer folded decode (eager and its CUDA-graph form) against the torch reference, when
   flashinfer is installed (the lent devices have none: recorded as skipped);
4. one decode step of one layer at Qwen2.5-VL-7B attention shapes (28 q / 4 kv heads, D 128),
   32K context, 10 % budget, batch 1 and 8: dense SDPA over the whole KV against hybridkv's
   table build + sparse attention (FlashInfer when present, else a torch gather + SDPA) and
   against the captured graph step. Medians of repeats, ratios within the run.

Writes ``gpu_check_<device>.json`` (+ ``.png``) into ``--out-dir`` (default ``$OUT`` when set,
else ``bench/results``). ``--dry-run`` runs the same code on CPU at small shapes (kernels under
``TRITON_INTERPRET=1``, the graph step eagerly) into a temporary folder: the CPU tests run it.
Exit status 1 when a check fails.

    bash bench/gpu_check.sh            # on the device
    python bench/gpu_check.py --dry-run
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # Triton fixes interpreter mode when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from tqdm import tqdm

from hybridkv_sglang.attention.sparse_decode import sparse_decode_reference
from hybridkv_sglang.kernels.chunk_topk import chunk_topk, chunk_topk_ref
from hybridkv_sglang.kernels.gather_entries import gather_entries, gather_entries_ref
from hybridkv_sglang.kernels.page_table_indices import (
    build_page_table_indices,
    build_page_table_indices_ref,
)
from hybridkv_sglang.kernels.ragged_chunk_scores import (
    ragged_chunk_scores,
    ragged_chunk_scores_ref,
)
from hybridkv_sglang.policy import build_policy
from hybridkv_sglang.storage.compressed_layout import CompressedLayout
from hybridkv_sglang.storage.decode_layout import DecodeBatchLayout
from hybridkv_sglang.storage.page_tables import FoldedPageTable
from hybridkv_sglang.storage.static_decode import StaticDecodeTables, StaticTableLimits

RESULTS = Path(__file__).resolve().parent / "results"
Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
GROUP = Q_HEADS // KV_HEADS
SCALE = HEAD_DIM**-0.5
TAIL = 16
CHUNK, TOP_K = 16, 8


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    norm = expected.norm()
    assert float(norm) > 0, "refusing to compare against an all-zero reference"
    return float((actual.double() - expected).norm() / norm)


# ------------------------------------------------------------------------------ 1. kernels
def check_kernels(device: str, dtype: torch.dtype, small: bool) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(int(time.time()) % 10_000)
    rows, c_max, chunks = (8, 40, 300) if small else (32, 2048, 32768)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    out = []
    q = randn(rows, GROUP, HEAD_DIM).to(dtype)
    lo = randn(rows, c_max, HEAD_DIM)
    hi = (lo + torch.rand(rows, c_max, HEAD_DIM, generator=gen, device=device)).to(dtype)
    lo = lo.to(dtype)
    num = torch.randint(1, c_max + 1, (rows,), generator=gen, device=device, dtype=torch.int32)
    s_ref, _ = chunk_topk_ref(q, lo, hi, num, TOP_K)
    s_tri, t_tri = chunk_topk(q, lo, hi, num, TOP_K)
    finite = torch.isfinite(s_ref)
    # the chosen chunks carry the reference's top scores (ids may differ only between ties)
    valid = t_tri >= 0
    picked = torch.gather(s_ref, 1, t_tri.clamp(min=0).long())[valid]
    best = torch.topk(s_ref, TOP_K, dim=1).values[valid]
    out.append(
        {
            "check": "chunk_topk compiled vs ref",
            "rel_err": _rel_err(s_tri[finite], s_ref[finite]),
            "top_score_gap": float((best - picked).abs().max()),
            "same_padding": bool(torch.equal(valid.sum(1), num.clamp(max=TOP_K).long())),
        }
    )
    flat_lo = randn(chunks, HEAD_DIM)
    flat_hi = (flat_lo + torch.rand(chunks, HEAD_DIM, generator=gen, device=device)).to(dtype)
    chunk_row = torch.randint(0, rows + 1, (chunks,), generator=gen, device=device)
    r_ref = ragged_chunk_scores_ref(q, flat_lo.to(dtype), flat_hi, chunk_row)
    r_tri = ragged_chunk_scores(q, flat_lo.to(dtype), flat_hi, chunk_row)
    used = torch.isfinite(r_ref)
    out.append(
        {
            "check": "ragged_chunk_scores compiled vs ref",
            "rel_err": _rel_err(r_tri[used], r_ref[used]),
            "same_unused": bool(torch.equal(torch.isinf(r_tri), torch.isinf(r_ref))),
        }
    )
    out.append(_check_page_table_indices(gen, device, small))
    slots = 4096 if small else 1 << 18
    src_k, src_v = randn(slots * KV_HEADS, HEAD_DIM).to(dtype), randn(slots * KV_HEADS, 64)
    src_v = src_v.to(dtype)
    n = slots // 2
    src_idx = torch.randperm(slots * KV_HEADS, generator=gen, device=device)[:n]
    dst_idx = torch.randperm(slots * KV_HEADS, generator=gen, device=device)[:n]
    dst = [torch.full_like(t, float("nan")) for t in (src_k, src_v, src_k, src_v)]
    gather_entries_ref(src_k, src_v, dst[0], dst[1], src_idx, dst_idx)
    gather_entries(src_k, src_v, dst[2], dst[3], src_idx, dst_idx)
    out.append(
        {
            "check": "gather_entries compiled vs ref",
            "exact": bool(
                torch.equal(dst[0][dst_idx], dst[2][dst_idx])
                and torch.equal(dst[1][dst_idx], dst[3][dst_idx])
            ),
        }
    )
    return out


def _check_page_table_indices(gen: torch.Generator, device: str, small: bool) -> dict[str, Any]:
    reqs, ctx = (4, 600) if small else (16, 8192)
    req_to_token = torch.randperm(reqs * ctx, generator=gen, device=device).view(reqs, ctx)
    req_to_token = req_to_token.to(torch.int32)
    rows = reqs * KV_HEADS
    row_req = torch.arange(reqs, device=device).repeat_interleave(KV_HEADS)
    row_head = torch.arange(KV_HEADS, device=device).repeat(reqs)
    sel_len = torch.randint(0, ctx // 4, (rows,), generator=gen, device=device)
    sel_indptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    sel_indptr[1:] = sel_len.cumsum(0)
    sel_positions = torch.randint(0, ctx, (int(sel_indptr[-1]),), generator=gen, device=device)
    tail_start = torch.randint(0, ctx // 2, (rows,), generator=gen, device=device)
    tail_end = tail_start + torch.randint(0, ctx // 2, (rows,), generator=gen, device=device)
    kv_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
    kv_indptr[1:] = (sel_len + tail_end - tail_start).cumsum(0)
    args = (
        req_to_token,
        row_req,
        row_head,
        sel_indptr.to(torch.int32),
        sel_positions.to(torch.int32),
        tail_start,
        tail_end,
        kv_indptr,
        KV_HEADS,
    )
    expected = build_page_table_indices_ref(*args)
    got = build_page_table_indices(*args)
    return {
        "check": "page_table_indices compiled vs ref",
        "exact": bool(torch.equal(got, expected)),
    }


# ------------------------------------------------------------------------------ shared setup
def make_batch(
    batch: int, context: int, budget: float, layers: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[CompressedLayout], list[dict]]:
    """Random KV pool ``[layers, slots, H_kv, D]`` and real policy plans on it, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(context + batch)
    per_request = context + TAIL
    slots = batch * per_request + 1
    keys = torch.randn(layers, slots, KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    values = torch.randn(layers, slots, KV_HEADS, HEAD_DIM, generator=gen, device=device)
    values = values.to(dtype)
    req_to_token = torch.zeros(batch + 1, per_request, dtype=torch.int32, device=device)
    order = torch.randperm(slots - 1, generator=gen, device=device) + 1
    for b in range(batch):
        req_to_token[b + 1] = order[b * per_request : (b + 1) * per_request].to(torch.int32)
    policy = build_policy("hybridkv", budget=budget, chunk_size=CHUNK, top_k_chunks=TOP_K)
    is_text = torch.zeros(context, dtype=torch.bool, device=device)
    is_text[:64] = True
    is_text[-64:] = True
    layouts, stats = [], []
    for b in range(batch):
        rows = req_to_token[b + 1, :context].long()
        observations = []
        for layer in range(layers):
            q_window = torch.randn(policy.window, Q_HEADS, HEAD_DIM, generator=gen, device=device)
            observations.append(
                policy.observe_layer(layer, q_window, keys[layer, rows].float(), SCALE)
            )
        plan = policy.finalize(observations, is_text)
        layouts.append(CompressedLayout.from_plan(plan, device))
        stats.append(plan.stats())
    return keys, values, req_to_token, layouts, stats


def static_tables(batch: int, context: int, layers: int, device: str, dtype: torch.dtype):
    limits = StaticTableLimits(
        max_rows=batch * KV_HEADS,
        max_entries=batch * KV_HEADS * (context + TAIL) + batch * KV_HEADS,
        max_bound_chunks=batch * KV_HEADS * (context // CHUNK),
        max_row_chunks=context // CHUNK,
        top_k=TOP_K,
        chunk_size=CHUNK,
    )
    return StaticDecodeTables(layers, KV_HEADS, HEAD_DIM, limits, dtype, device)


def _batch_at(layouts: list[CompressedLayout], seq_len: int) -> DecodeBatchLayout:
    n = len(layouts)
    return DecodeBatchLayout(list(range(1, n + 1)), [seq_len] * n, layouts, KV_HEADS)


# ------------------------------------------------------------------------------ 2. graph tables
def check_graph_tables(device: str, dtype: torch.dtype, small: bool) -> dict[str, Any]:
    batch, context, layers = (2, 512, 2) if small else (8, 8192, 2)
    _, _, req_to_token, layouts, _ = make_batch(batch, context, 0.1, layers, device, dtype)
    tables = static_tables(batch, context, layers, device, dtype)
    q = torch.zeros(layers, batch * KV_HEADS, GROUP, HEAD_DIM, dtype=dtype, device=device)

    def fill() -> None:
        for layer in range(layers):
            tables.fill_chunks(layer, q[layer], req_to_token)

    gen = torch.Generator(device=device).manual_seed(5)
    tables.stage(_batch_at(layouts, context + 1), req_to_token)
    graph = None
    if device == "cuda":
        q.normal_(generator=gen)
        fill()  # warm-up outside the capture (compiles the kernels)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fill()
    mismatches = 0
    steps = 3
    for step in range(steps):
        batch_layout = _batch_at(layouts, context + 2 + step)
        tables.stage(batch_layout, req_to_token)
        q.copy_(torch.randn(q.shape, generator=gen, device=device).to(dtype))
        if graph is None:
            fill()
        else:
            graph.replay()
            torch.cuda.synchronize()
        for layer in range(layers):
            expected = batch_layout.layer_table(layer, q[layer], req_to_token)
            got = tables.layer_table(layer)
            same = torch.equal(got.kv_indptr_host, expected.kv_indptr_host) and torch.equal(
                got.kv_indices, expected.kv_indices
            )
            mismatches += not same
    return {
        "check": "fixed tables: captured chunk fill == eager tables"
        if graph is not None
        else "fixed tables: chunk fill (eager, dry run) == eager tables",
        "captured": graph is not None,
        "steps": steps,
        "layers": layers,
        "exact": mismatches == 0,
    }


# ------------------------------------------------------------------------------ 3. flashinfer
def flashinfer_version() -> str | None:
    try:
        import flashinfer
    except ImportError:
        return None
    return str(getattr(flashinfer, "__version__", "unknown"))


def check_flashinfer(device: str, dtype: torch.dtype) -> dict[str, Any]:
    if device != "cuda" or flashinfer_version() is None:
        return {"check": "flashinfer folded decode vs reference", "skipped": "no flashinfer"}
    from hybridkv_sglang.attention.sparse_decode import FlashInferFoldedDecode

    batch, context = 4, 4096
    keys, values, req_to_token, layouts, _ = make_batch(batch, context, 0.1, 1, device, dtype)
    batch_layout = _batch_at(layouts, context + 1)
    q = torch.randn(batch * KV_HEADS, GROUP, HEAD_DIM, device=device).to(dtype)
    table = batch_layout.layer_table(0, q, req_to_token)
    k, v = keys[0], values[0]
    reference = sparse_decode_reference(
        q, k.view(-1, HEAD_DIM), v.view(-1, HEAD_DIM), table.kv_indptr, table.kv_indices, SCALE
    )
    eager = FlashInferFoldedDecode(GROUP, HEAD_DIM, device)
    eager.plan(table, q_dtype=dtype, kv_dtype=dtype, sm_scale=SCALE)
    tables = static_tables(batch, context, 1, device, dtype)
    graph_decode = FlashInferFoldedDecode(
        GROUP,
        HEAD_DIM,
        device,
        graph_buffers=(tables.kv_indptr[0], tables.kv_indices[0], tables.kv_last_page_len),
    )
    tables.stage(batch_layout, req_to_token)
    graph_decode.plan_rows(
        tables.kv_indptr_host[0], tables.kv_indices[0], q_dtype=dtype, kv_dtype=dtype
    )
    static_q = q.clone()

    def step() -> torch.Tensor:
        tables.fill_chunks(0, static_q, req_to_token)
        return graph_decode.run(static_q, k, v, sm_scale=SCALE)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return {
        "check": "flashinfer folded decode vs reference",
        "flashinfer": flashinfer_version(),
        "rel_err_eager": _rel_err(eager.run(q, k, v), reference),
        "rel_err_graph": _rel_err(captured, reference),
    }


# ------------------------------------------------------------------------------ 4. speed
def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: FoldedPageTable):
    """Torch sparse decode for a device without FlashInfer: pad each row's entries, mask, SDPA."""
    lengths = table.row_lengths_host()
    width = int(lengths.max())
    pos = torch.arange(width, device=q.device)
    starts = table.kv_indptr[:-1].to(torch.int64)
    valid = pos[None, :] < (table.kv_indptr[1:] - table.kv_indptr[:-1])[:, None]
    flat = (starts[:, None] + pos[None, :]).clamp(max=max(table.nnz - 1, 0))
    entries = table.kv_indices[flat].to(torch.int64)
    keys = k.view(-1, HEAD_DIM)[entries].unsqueeze(1)  # [R, 1, W, D]
    vals = v.view(-1, HEAD_DIM)[entries].unsqueeze(1)
    mask = valid[:, None, None, :]
    return scaled_dot_product_attention(
        q.unsqueeze(2), keys, vals, attn_mask=mask, enable_gqa=True, scale=SCALE
    )


def timer(device: str, repeats: int) -> Callable[[Callable[[], Any]], float]:
    def median_ms(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - started))
        return statistics.median(times)

    return median_ms


def speed(device: str, dtype: torch.dtype, small: bool, repeats: int) -> list[dict[str, Any]]:
    context = 1024 if small else 32768
    batches = (1, 2) if small else (1, 8)
    median_ms = timer(device, repeats)
    label, attend = _sparse_attention(
        device == "cuda" and flashinfer_version() is not None, device, dtype
    )
    rows = []
    for batch in tqdm(batches, desc="gpu_check speed", unit="batch"):
        rows.append(_speed_row(batch, context, device, dtype, median_ms, attend))
        rows[-1]["attention"] = label
    return rows


def _speed_row(
    batch: int,
    context: int,
    device: str,
    dtype: torch.dtype,
    median_ms: Callable[[Callable[[], Any]], float],
    attend: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    keys, values, req_to_token, layouts, stats = make_batch(batch, context, 0.1, 1, device, dtype)
    k, v = keys[0], values[0]
    seq_len = context + TAIL
    q = torch.randn(batch * KV_HEADS, GROUP, HEAD_DIM, device=device).to(dtype)
    rows = [req_to_token[b + 1, :seq_len].long() for b in range(batch)]
    dense_k = torch.stack([k[r] for r in rows]).transpose(1, 2)  # [B, H_kv, N, D]
    dense_v = torch.stack([v[r] for r in rows]).transpose(1, 2)
    q_dense = q.view(batch, Q_HEADS, 1, HEAD_DIM)

    def dense() -> torch.Tensor:
        return scaled_dot_product_attention(q_dense, dense_k, dense_v, enable_gqa=True, scale=SCALE)

    batch_layout = _batch_at(layouts, seq_len)

    def eager() -> torch.Tensor:
        return attend(q, k, v, batch_layout.layer_table(0, q, req_to_token))

    tables = static_tables(batch, context, 1, device, dtype)
    stage_ms = median_ms(lambda: tables.stage(batch_layout, req_to_token))
    fixed = tables.layer_table(0)

    def fixed_step() -> torch.Tensor:
        tables.fill_chunks(0, q, req_to_token)
        return attend(q, k, v, fixed)

    graph_step: Callable[[], Any] = fixed_step
    if device == "cuda":
        fixed_step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fixed_step()
        graph_step = graph.replay
    dense_ms = median_ms(dense)
    eager_ms = median_ms(eager)
    fixed_ms = median_ms(graph_step)
    return {
        "context": context,
        "batch": batch,
        "budget": 0.1,
        "read_fraction": layouts[0].read_fraction,
        "dynamic_heads": stats[0]["dynamic_heads"],
        "dense_sdpa_ms": dense_ms,
        "hybridkv_eager_ms": eager_ms,
        "hybridkv_fixed_step_ms": fixed_ms,
        "fixed_tables_stage_ms": stage_ms,
        "graph_captured": device == "cuda",
        "speedup_eager": dense_ms / eager_ms,
        "speedup_fixed_step": dense_ms / fixed_ms,
    }


def _sparse_attention(
    with_flashinfer: bool, device: str, dtype: torch.dtype
) -> tuple[str, Callable[..., torch.Tensor]]:
    """The sparse attention the speed rows time, and its name."""
    if not with_flashinfer:
        return "torch gather + sdpa (no flashinfer on this machine)", gathered_attention
    from hybridkv_sglang.attention.sparse_decode import FlashInferFoldedDecode

    decode = FlashInferFoldedDecode(GROUP, HEAD_DIM, device)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: FoldedPageTable):
        decode.plan(table, q_dtype=dtype, kv_dtype=dtype, sm_scale=SCALE)
        return decode.run(q, k, v)

    return f"flashinfer {flashinfer_version()}", attend


# ------------------------------------------------------------------------------ driver
def passed(check: dict[str, Any], dtype: torch.dtype) -> bool:
    """Tolerances: float32 far under 1e-3, bf16/fp16 operands under 1e-2."""
    if "skipped" in check:
        return True
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    ok = all(check.get(key, True) for key in ("exact", "same_unused", "same_padding"))
    errors = [v for key, v in check.items() if key.startswith("rel_err")]
    ok &= all(err <= tolerance for err in errors)
    if "top_score_gap" in check:
        ok &= check["top_score_gap"] <= 1e-2
    return bool(ok)


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu-dry-run"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, temp folder")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--plot", type=Path, default=None, help="only draw the PNG of an existing results JSON"
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        payload = json.loads(args.plot.read_text())
        plot(payload["speed"], payload["device"], args.plot.with_suffix(".png"))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script on CPU")
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    out_dir = args.out_dir
    if out_dir is None:
        env_out = os.environ.get("OUT")
        out_dir = Path(tempfile.mkdtemp()) if args.dry_run else Path(env_out or RESULTS)
    started = time.monotonic()
    checks = check_kernels(device, dtype, args.dry_run)
    checks.append(check_graph_tables(device, dtype, args.dry_run))
    checks.append(check_flashinfer(device, dtype))
    for check in checks:
        check["passed"] = passed(check, dtype)
    rows = speed(device, dtype, args.dry_run, 3 if args.dry_run else args.repeats)
    name = device_name(device)
    payload = {
        "benchmark": "gpu_check",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "dry_run": args.dry_run,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "flashinfer": flashinfer_version(),
            "cuda": torch.version.cuda,
        },
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": time.monotonic() - started,
        "checks": checks,
        "speed": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check_{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    plot(rows, payload["device"], path.with_suffix(".png"))
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}")
    print("| batch | read | dense ms | eager ms | fixed-step ms | stage ms | x eager | x fixed |")
    for r in rows:
        print(
            f"| {r['batch']} | {r['read_fraction']:.3f} | {r['dense_sdpa_ms']:.3f} | "
            f"{r['hybridkv_eager_ms']:.3f} | {r['hybridkv_fixed_step_ms']:.3f} | "
            f"{r['fixed_tables_stage_ms']:.3f} | {r['speedup_eager']:.2f} | "
            f"{r['speedup_fixed_step']:.2f} |"
        )
    print(f"wrote {path}")
    return 0 if all(check["passed"] for check in checks) else 1


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def plot(rows: list[dict[str, Any]], device: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the device machine may lack it: draw later with --plot
        print(f"matplotlib missing: draw the plot with --plot {path.with_suffix('.json')}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [
        ("dense_sdpa_ms", "dense SDPA"),
        ("hybridkv_eager_ms", "hybridkv eager (table build + attention)"),
        ("hybridkv_fixed_step_ms", "hybridkv fixed tables (graph replay)"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(configs)
    for i, (key, label) in enumerate(configs):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks([j + width for j in range(len(rows))])
    ax.set_xticklabels([f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("ms / decode step / layer (median)")
    context = rows[0]["context"] if rows else 0
    ax.set_title(f"{device}: one layer, {context} context, 10 % budget")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
