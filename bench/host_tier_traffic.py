"""Host-tier traffic of ``compact`` storage on the committed quality model's real decode steps.

For each budget (``--budgets``) a CPU server in ``in_place`` storage answers the tile task's
questions, then one ``compact`` server per staging slack (``--slacks``), dynamic heads on the
host tier. Every answer decodes ``--max-new-tokens`` tokens (EOS ignored: a tile answer is two
tokens, far from the steady state a chat answer reaches). Per request, from its hybridkv record:
chunks its dynamic heads selected and chunks copied from the host over its decode
(``staged_chunks_selected`` / ``staged_chunks_moved``, counted on the device by the staging
kernel). The first step moves every selected chunk (the slots start empty), so it is reported
apart; the rest is the steady state. Host-to-device bytes are chunks x ``chunk_size`` x the pool's
K+V bytes per entry, as a fraction of the request's dense prompt KV bytes.

Accuracy: the reply starts with the answer (normalized as the quality task does; what follows
is the forced continuation); ``same_as_in_place`` counts questions whose whole reply equals the
``in_place`` server's at the same budget (the same plan).

The PCIe projection scales the steady-state fraction to Qwen2.5-VL-7B's dense prompt KV at 32K
context (28 layers, 4 kv heads, D 128, bf16: 1.88 GB a request) at batch 8 and 32, over PCIe 5.0
x16 at 50 GB/s one way, against the dense attention step an H200 measured
(``bench/results/gpu_check_nvidia-h200.json``).

    python bench/host_tier_traffic.py --out bench/results/host_tier_traffic
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import chat, message_list, tile_cases  # noqa: E402
from hybridkv_sglang.config import HybridKVConfig  # noqa: E402
from hybridkv_sglang.report import merged_snapshot  # noqa: E402
from hybridkv_sglang.testing.quality_task import TILE_MODEL_SETTINGS, normalize  # noqa: E402
from hybridkv_sglang.testing.server import launch_server  # noqa: E402

MODEL = ROOT / "bench" / "quality_model"
GPU_CHECK = ROOT / "bench" / "results" / "gpu_check_nvidia-h200.json"
PCIE_BYTES_PER_S = 50e9
"""PCIe 5.0 x16, one direction."""
DENSE_PROMPT_BYTES_7B_32K = 28 * 4 * 128 * 2 * 2 * 32768
"""K and V of a 32K prompt at Qwen2.5-VL-7B shapes in bf16."""
DEFAULT_SLACK = HybridKVConfig().staging_slack


def ask(base_url: str, messages: list[dict[str, Any]], max_new_tokens: int, rid: str) -> str:
    """The reply, ``max_new_tokens`` long whatever the model's end of turn."""
    body = chat(base_url, messages, max_new_tokens, rid, ignore_eos=True)
    return body["choices"][0]["message"]["content"] or ""


def run_server(config: HybridKVConfig, cases: list, args: argparse.Namespace, tag: str) -> dict:
    """Every first turn of ``cases`` through one server: replies and hybridkv records by id."""
    log = args.log_dir / f"{tag}.log"
    with launch_server(
        MODEL,
        hybridkv=config,
        log_path=log,
        max_total_tokens=65536,
        context_length=4096,
        max_running_requests=args.concurrency * 2,
    ) as server:
        rids = {case.case_id: f"{tag}-{case.case_id}" for case in cases}
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            futures = {
                case.case_id: pool.submit(
                    ask,
                    server.base_url,
                    message_list(case, [], 1),
                    args.max_new_tokens,
                    rids[case.case_id],
                )
                for case in cases
            }
            replies = {
                cid: f.result() for cid, f in tqdm(futures.items(), desc=tag, unit="q", leave=False)
            }
        snapshot = merged_snapshot(server.base_url)
    records = snapshot.get("requests", {})
    return {
        "replies": replies,
        "records": {cid: records.get(rid) for cid, rid in rids.items()},
        "totals": snapshot.get("totals", {}),
        "entry_bytes": snapshot.get("kv_entry_bytes", 0),
    }


def traffic(record: dict[str, Any], chunk_size: int, entry_bytes: int) -> dict[str, float] | None:
    """Per decode step of one request: chunks selected and moved, first step and the rest."""
    steps = record.get("decode_steps", 0)
    selected = record.get("staged_chunks_selected", 0)
    if record.get("dynamic_tier") != "host" or steps < 2 or selected == 0:
        return None
    moved = record["staged_chunks_moved"]
    per_step = selected / steps  # every step selects the same chunks count
    rest_moved = (moved - per_step) / (steps - 1)  # the first step moves all it selects
    chunk_bytes = chunk_size * entry_bytes
    dense = record["prompt_bytes"]
    return {
        "selected_per_step": per_step,
        "first_moved": per_step,
        "moved_per_step": rest_moved,
        "first_moved_bytes_fraction": per_step * chunk_bytes / dense,
        "moved_bytes_fraction": rest_moved * chunk_bytes / dense,
    }


def answered(reply: str, answers: list[str]) -> bool:
    """The reply opens with one of the answers (the rest is the forced continuation)."""
    return any(normalize(reply).startswith(normalize(answer)) for answer in answers)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    budget: float, slack: float | None, run: dict, reference: dict, cases: list, chunk: int
) -> dict[str, Any]:
    correct = [answered(run["replies"][c.case_id], c.turns[0].answers) for c in cases]
    same = [run["replies"][c.case_id] == reference["replies"][c.case_id] for c in cases]
    flows = [
        t
        for c in cases
        if (r := run["records"][c.case_id]) and (t := traffic(r, chunk, run["entry_bytes"]))
    ]
    storage = "in_place" if slack is None else "compact"
    return {
        "budget": budget,
        "setting": storage if slack is None else f"compact, staging_slack {slack:g}",
        "storage": storage,
        "staging_slack": slack,
        "default": slack == DEFAULT_SLACK,
        "questions": len(cases),
        "accuracy": sum(correct) / len(cases),
        "same_as_in_place": sum(same) / len(cases),
        "host_tier_requests": len(flows),
        "mean_selected_chunks_per_step": mean([f["selected_per_step"] for f in flows]),
        "mean_moved_chunks_first_step": mean([f["first_moved"] for f in flows]),
        "mean_moved_chunks_per_step": mean([f["moved_per_step"] for f in flows]),
        "mean_first_step_moved_bytes_fraction": mean(
            [f["first_moved_bytes_fraction"] for f in flows]
        ),
        "mean_moved_bytes_fraction": mean([f["moved_bytes_fraction"] for f in flows]),
        "graph_fallbacks": run["totals"].get("graph_fallbacks", 0),
        "d2h_per_step": None,
        "device_fraction": mean(
            [r["device_fraction"] for r in run["records"].values() if r and r["compressed"]]
        ),
    }


def pcie_projection(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steady-state host-to-device time per step at 7B / 32K beside the H200's dense step."""
    dense_ms = {}
    if GPU_CHECK.exists():
        for row in json.loads(GPU_CHECK.read_text())["speed"]:
            if row["context"] == 32768:
                dense_ms[row["batch"]] = row["dense_ms"]
    projected = []
    for row in rows:
        fraction = row["mean_moved_bytes_fraction"]
        if fraction is None:
            continue
        for batch in (8, 32):
            bytes_per_step = batch * fraction * DENSE_PROMPT_BYTES_7B_32K
            ms = 1e3 * bytes_per_step / PCIE_BYTES_PER_S
            projected.append(
                {
                    "budget": row["budget"],
                    "setting": row["setting"],
                    "batch": batch,
                    "h2d_bytes_per_step": bytes_per_step,
                    "pcie_ms_per_step": ms,
                    "h200_dense_attention_ms": dense_ms.get(batch),
                    "pcie_over_dense": ms / dense_ms[batch] if batch in dense_ms else None,
                }
            )
    return projected


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    compact = [r for r in rows if r["storage"] == "compact"]
    slacks = sorted({r["staging_slack"] for r in compact})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for slack in slacks:
        line = sorted(
            (r for r in compact if r["staging_slack"] == slack), key=lambda r: r["budget"]
        )
        budgets = [100 * r["budget"] for r in line]
        moved = [100 * (r["mean_moved_bytes_fraction"] or 0) for r in line]
        left.plot(budgets, moved, marker="o", label=f"staging_slack {slack:g}")
        right.plot(
            budgets, [100 * r["accuracy"] for r in line], marker="o", label=f"slack {slack:g}"
        )
    in_place = sorted((r for r in rows if r["storage"] == "in_place"), key=lambda r: r["budget"])
    right.plot(
        [100 * r["budget"] for r in in_place],
        [100 * r["accuracy"] for r in in_place],
        marker="s",
        linestyle="--",
        color="black",
        label="in_place",
    )
    left.axhline(1.0, color="gray", linestyle=":", label="goal: 1 % at 10 %")
    left.set(xlabel="budget (% of prompt KV bytes read per step)", ylabel="host->device bytes per "
             "step after the first (% of dense prompt KV)", title="host-tier traffic")  # fmt: skip
    right.set(xlabel="budget (%)", ylabel="accuracy (%)", title="answers (prefix match)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")],
                        default=[0.02, 0.05, 0.1])  # fmt: skip
    parser.add_argument("--slacks", type=lambda t: [float(x) for x in t.split(",")],
                        default=[0.0, DEFAULT_SLACK, 3.0])  # fmt: skip
    parser.add_argument("--ks", type=lambda t: [int(x) for x in t.split(",")], default=[16, 32])
    parser.add_argument("--per-kind", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/host_tier_traffic")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "host-tier-logs")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    cases = tile_cases(args.seed, args.ks, args.per_kind)
    common = {**TILE_MODEL_SETTINGS, "min_prompt_tokens": 128}
    chunk = common["chunk_size"]
    started = time.perf_counter()
    rows = []
    runs = [(b, s) for b in args.budgets for s in [None, *args.slacks]]
    reference: dict[float, dict] = {}
    replies: dict[str, dict[str, str]] = {}
    for budget, slack in tqdm(runs, desc="servers", unit="server"):
        fields = {"storage": "compact", "staging_slack": slack} if slack is not None else {}
        config = HybridKVConfig(**common, budget=budget, **fields)
        tag = f"b{budget:g}-" + ("in_place" if slack is None else f"slack{slack:g}")
        run = run_server(config, cases, args, tag)
        replies[tag] = run["replies"]
        if slack is None:
            reference[budget] = run
        rows.append(summarize(budget, slack, run, reference[budget], cases, chunk))
        tqdm.write(json.dumps(rows[-1]))
    result = {
        "benchmark": "host_tier_traffic",
        "machine": "CPU (2 cores), no GPU: CPU SGLang servers, the staging kernel's torch twin",
        "model": "bench/quality_model (Qwen2.5-VL architecture trained on the tile task)",
        "settings": common,
        "max_new_tokens": args.max_new_tokens,
        "questions": len(cases),
        "seconds": time.perf_counter() - started,
        "d2h_note": "d2h_per_step is not measurable on a CPU server; the step's absence of host "
        "reads is checked op by op in tests/unit/runtime/test_graph_replay.py",
        "rows": rows,
        "pcie_projection": pcie_projection(rows),
        "replies": replies,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
