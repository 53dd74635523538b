"""Decode-attention fidelity of the compression policies on synthetic planted-structure KV.

THIS IS SYNTHETIC DATA WITH PLANTED STRUCTURE, NOT A MODEL. Keys, values and queries are random
vectors into which three kinds of head behaviour are planted, so the numbers show whether each
policy does what it is designed to do on heads that behave as the method assumes; they say nothing
about accuracy on a real model.

Layout of one synthetic request (defaults): ``text_prefix`` system-text tokens, ``visual`` image
tokens, ``question`` text tokens; the observation window is the last ``window`` question tokens.
Each layer has four kv heads of three planted kinds:

* ``concentrated`` (static by design): window and decode queries point at the same few anchor keys
  (some text, some visual); the window predicts decode attention.
* ``text_reader`` (static by design): decode queries read the text tokens; the window splits its
  votes between text and a set of salient visual tokens, so vote-only pruning keeps visual
  tokens the decode never reads.
* ``shifting`` (dynamic by design, two per layer): the window attends diffusely; each decode query
  points at one random visual "object" (a contiguous run of tokens), mostly ones the window did
  not look at.

For each budget and policy the plan is made from the window only (as at the end of prefill), then
``decode_steps`` decode queries are scored against full attention over the prompt plus the decode
tail: (a) relative error of the attention output, ``||o_S - o|| / ||o||``, and (b) attention mass
recalled, ``sum_{j in S} p_j``. A static head attends its kept positions; a dynamic head attends
what the runtime attends at decode: sink and window (rounded out to chunk borders, the rule of
``storage.page_tables.DynamicRowLayout``) + the top-k chunks picked by
``hybridkv_sglang.kernels.chunk_topk.chunk_topk_ref`` + the tail. ``random`` keeps ``b_mean``
uniformly random prompt positions per head. ``hybridkv`` runs the config defaults
(``static_priority="focus"``: a static head's own focus set ranks before text;
``dynamic_top_k="budget"``); ``hybridkv_design`` runs DESIGN §2's text prior and fixed top-k.

Run: ``python bench/fidelity.py`` (about 45 s of CPU time on 2 cores); writes
``bench/results/fidelity.json`` and ``bench/results/fidelity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from hybridkv_sglang.policy import (
    POLICIES,
    ChunkRetriever,
    CompressionPlan,
    LayerObservation,
    build_policy,
    uniform_head_budget,
)

DISCLAIMER = (
    "SYNTHETIC planted-structure KV (random vectors with planted concentrated / text-reading / "
    "shifting heads), NOT a model: shows whether each policy does what it is designed to do on "
    "heads that behave as the method assumes, not model accuracy."
)
KINDS = ("concentrated", "text_reader", "shifting", "shifting")
POLICY_NAMES = (
    "hybridkv",
    "hybridkv_design",
    *(
        name
        for name, cls in POLICIES.items()
        if cls.benchmarked and not cls.needs_values and name != "hybridkv"
    ),
    "random",
)
"""Every benchmarked policy that scores from attention (the synthetic requests carry no values),
the design variant and a random selection."""
# Bench-only variants: (registered policy, extra hyper-parameters).
VARIANTS = {"hybridkv_design": ("hybridkv", {"static_priority": "text", "dynamic_top_k": "fixed"})}
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Request:
    """One synthetic request.

    Attributes:
        q_window: per layer ``[w, H_q, D]`` float32.
        keys: per layer ``[N + T, H_kv, D]`` float32 (prompt then decode tail).
        values: per layer ``[N + T, H_kv, D]`` float32.
        q_decode: per layer ``[T, H_kv, G, D]`` float32.
        is_text: ``[N]`` bool.
        prompt_len: ``N``.
    """

    q_window: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    q_decode: list[Tensor]
    is_text: Tensor
    prompt_len: int
    observations: dict[str, list[LayerObservation]] = field(default_factory=dict)
    """Per policy (name): its layer observations; they do not depend on the budget."""
    full: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    """Per layer: decode logits, full-attention probabilities and outputs (float64)."""


def _unit(gen: torch.Generator, dim: int, count: int = 1) -> Tensor:
    """``[count, dim]`` random unit directions (orthonormal when ``count <= dim``)."""
    if count <= dim:
        basis, _ = torch.linalg.qr(torch.randn(dim, count, generator=gen))
        return basis.T
    dirs = torch.randn(count, dim, generator=gen)
    return dirs / dirs.norm(dim=-1, keepdim=True)


def make_request(args: argparse.Namespace, seed: int) -> Request:
    gen = torch.Generator().manual_seed(seed)
    n_text0, n_vis, n_q = args.text_prefix, args.visual, args.question
    n = n_text0 + n_vis + n_q
    steps, dim, group, w = args.decode_steps, args.head_dim, args.group, args.window
    num_kv = len(KINDS)
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[n_text0 : n_text0 + n_vis] = False
    text_pos = is_text.nonzero().flatten()
    vis_pos = (~is_text).nonzero().flatten()
    obj_len = args.object_len
    n_obj = n_vis // obj_len

    q_window, keys, values, q_decode = [], [], [], []
    for _layer in range(args.layers):
        k = torch.randn(n + steps, num_kv, dim, generator=gen)
        v = torch.randn(n + steps, num_kv, dim, generator=gen)
        qw = torch.zeros(w, num_kv * group, dim)
        qd = torch.zeros(steps, num_kv, group, dim)

        def noise(*shape: int) -> Tensor:
            return args.query_noise * torch.randn(*shape, generator=gen)

        for h, kind in enumerate(KINDS):
            heads = slice(h * group, (h + 1) * group)
            if kind == "concentrated":
                u = _unit(gen, dim)[0]
                anchors = torch.cat(
                    [
                        text_pos[torch.randperm(text_pos.numel(), generator=gen)[:8]],
                        vis_pos[torch.randperm(vis_pos.numel(), generator=gen)[:16]],
                    ]
                )
                k[anchors, h] += args.key_boost * u
                qw[:, heads] = args.query_boost * u + noise(w, group, dim)
                qd[:, h] = args.query_boost * u + noise(steps, group, dim)
            elif kind == "text_reader":
                u_text, u_vis = _unit(gen, dim, 2)
                salient = vis_pos[torch.randperm(vis_pos.numel(), generator=gen)[:200]]
                k[text_pos, h] += 0.5 * args.key_boost * u_text
                k[salient, h] += args.key_boost * u_vis
                # Window: votes split between text and salient vision; decode reads text.
                qw[:, heads] = 0.7 * args.query_boost * (u_text + u_vis) + noise(w, group, dim)
                qd[:, h] = args.query_boost * u_text + noise(steps, group, dim)
            else:  # shifting
                dirs = _unit(gen, dim, n_obj)
                for o in range(n_obj):
                    start = n_text0 + o * obj_len
                    k[start : start + obj_len, h] += args.key_boost * dirs[o]
                seen = torch.randint(0, n_obj, (w,), generator=gen)
                qw[:, heads] = 0.3 * args.query_boost * dirs[seen].unsqueeze(1) + noise(
                    w, group, dim
                )
                focus = torch.randint(0, n_obj, (steps,), generator=gen)
                qd[:, h] = args.query_boost * dirs[focus].unsqueeze(1) + noise(steps, group, dim)
        q_window.append(qw)
        keys.append(k)
        values.append(v)
        q_decode.append(qd)
    return Request(q_window, keys, values, q_decode, is_text, n)


def attended_masks(
    name: str, plan: CompressionPlan | None, req: Request, layer: int, b_mean: int, seed: int
) -> Tensor:
    """``[H_kv, T, N]`` bool prompt positions each head attends at each decode step."""
    n, steps = req.prompt_len, req.q_decode[layer].shape[0]
    num_kv = req.keys[layer].shape[1]
    if name == "random":
        gen = torch.Generator().manual_seed(seed * 1000 + layer)
        mask = torch.zeros(num_kv, n, dtype=torch.bool)
        for h in range(num_kv):
            mask[h, torch.randperm(n, generator=gen)[:b_mean]] = True
        return mask.unsqueeze(1).expand(num_kv, steps, n)
    assert plan is not None
    indptr, pos = plan.layer_csr(layer)
    rows = torch.repeat_interleave(torch.arange(num_kv), indptr.diff())
    kept = torch.zeros(num_kv, n, dtype=torch.bool)
    kept[rows, pos.long()] = True
    mask = kept.unsqueeze(1).expand(num_kv, steps, n).clone()
    dyn = plan.is_dynamic[layer].nonzero().flatten()
    if dyn.numel():
        index = plan.chunk_index
        assert index is not None
        q = req.q_decode[layer][:, dyn].transpose(0, 1)  # [R, T, G, D]
        r, t, g, d = q.shape
        rows_index = index[layer, dyn.repeat_interleave(t)]
        retriever = ChunkRetriever(plan.chunk_size, plan.top_k_chunks)
        attended = retriever.attended_mask(
            q.reshape(r * t, g, d), rows_index, n, plan.sink, plan.window
        )
        mask[dyn] = attended.view(r, t, n)
    return mask


def score_layer(
    req: Request, layer: int, prompt_mask: Tensor, sm_scale: float
) -> dict[str, Tensor]:
    """Per (head, step, query head): relative output error and recalled mass. ``[H_kv, T, G]``."""
    n = req.prompt_len
    steps = req.q_decode[layer].shape[0]
    v = req.values[layer].double().transpose(0, 1)  # [H, N+T, D]
    tail = torch.arange(steps)[:, None] >= torch.arange(steps)[None, :]  # step t sees tail <= t
    ninf = float("-inf")
    if layer not in req.full:
        q = req.q_decode[layer].double()  # [T, H, G, D]
        k = req.keys[layer].double().transpose(0, 1)  # [H, N+T, D]
        logits = torch.einsum("thgd,hjd->htgj", q, k) * sm_scale  # [H, T, G, N+T]
        visible_full = torch.cat([torch.ones(steps, n, dtype=torch.bool), tail], dim=1)
        p_full = torch.softmax(logits.masked_fill(~visible_full[None, :, None], ninf), dim=-1)
        req.full[layer] = (logits, p_full, torch.einsum("htgj,hjd->htgd", p_full, v))
    logits, p_full, o_full = req.full[layer]
    visible_sel = torch.cat([prompt_mask, tail.expand(prompt_mask.shape[0], steps, steps)], dim=2)
    p_sel = torch.softmax(logits.masked_fill(~visible_sel[:, :, None], ninf), dim=-1)
    o_sel = torch.einsum("htgj,hjd->htgd", p_sel, v)
    rel_err = (o_sel - o_full).norm(dim=-1) / o_full.norm(dim=-1)
    recall = (p_full * visible_sel[:, :, None]).sum(dim=-1)
    return {"rel_err": rel_err, "recall": recall}


def run_case(
    name: str, budget: float, req: Request, args: argparse.Namespace, seed: int
) -> dict[str, object]:
    n = req.prompt_len
    dim = req.keys[0].shape[-1]
    sm_scale = 1.0 / math.sqrt(dim)
    b_mean = uniform_head_budget(n, budget, None)
    plan = None
    if name != "random":
        base, extra = VARIANTS.get(name, (name, {}))
        policy = build_policy(
            base,
            **extra,
            budget=budget,
            window=args.window,
            sink=args.sink,
            chunk_size=args.chunk_size,
            top_k_chunks=args.top_k_chunks,
        )
        if name not in req.observations:
            req.observations[name] = [
                policy.observe_layer(layer, req.q_window[layer], req.keys[layer][:n], sm_scale)
                for layer in range(args.layers)
            ]
        plan = policy.finalize(req.observations[name], req.is_text)
    per_kind: dict[str, dict[str, list[Tensor]]] = {}
    for layer in range(args.layers):
        mask = attended_masks(name, plan, req, layer, b_mean, seed)
        metrics = score_layer(req, layer, mask, sm_scale)
        for h, kind in enumerate(KINDS):
            for key, value in metrics.items():
                per_kind.setdefault(kind, {}).setdefault(key, []).append(value[h].flatten())
    out: dict[str, object] = {
        "read_fraction": plan.stats()["read_fraction"] if plan is not None else b_mean / n,
        "dynamic_heads": int(plan.is_dynamic.sum()) if plan is not None else 0,
        "dynamic_by_kind": (
            {
                kind: int(plan.is_dynamic[:, [i for i, k in enumerate(KINDS) if k == kind]].sum())
                for kind in dict.fromkeys(KINDS)
            }
            if plan is not None
            else {}
        ),
    }
    for kind, metrics in per_kind.items():
        for key, values in metrics.items():
            out[f"{key}/{kind}"] = torch.cat(values)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--policies", nargs="+", default=list(POLICY_NAMES))
    parser.add_argument("--seeds", type=int, default=2, help="synthetic requests per case")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--group", type=int, default=4, help="query heads per kv head (G)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-prefix", type=int, default=32)
    parser.add_argument("--visual", type=int, default=2880)
    parser.add_argument("--question", type=int, default=160)
    parser.add_argument("--object-len", type=int, default=24, help="tokens per visual object")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--top-k-chunks", type=int, default=8)
    parser.add_argument("--key-boost", type=float, default=4.0)
    parser.add_argument("--query-boost", type=float, default=16.0)
    parser.add_argument("--query-noise", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "fidelity.png")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.policies) - set(POLICY_NAMES))
    if unknown:
        parser.error(f"unknown policies {unknown}; expected some of {list(POLICY_NAMES)}")

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.time()
    requests = [make_request(args, seed) for seed in range(args.seeds)]
    cases = [(b, p) for b in args.budgets for p in args.policies]
    rows: list[dict[str, object]] = []
    for budget, name in tqdm(cases, desc="fidelity", unit="case"):
        results = [run_case(name, budget, req, args, seed) for seed, req in enumerate(requests)]
        row: dict[str, object] = {
            "budget": budget,
            "policy": name,
            "read_fraction": sum(float(r["read_fraction"]) for r in results) / len(results),
            "dynamic_heads": sum(int(r["dynamic_heads"]) for r in results) / len(results),
            "dynamic_by_kind": results[0]["dynamic_by_kind"],
        }
        for metric in ("rel_err", "recall"):
            per_kind = {
                kind: torch.cat([r[f"{metric}/{kind}"] for r in results])  # type: ignore[misc]
                for kind in dict.fromkeys(KINDS)
            }
            row[metric] = float(torch.cat(list(per_kind.values())).mean())
            for kind, values in per_kind.items():
                row[f"{metric}_{kind}"] = float(values.mean())
        rows.append(row)
    elapsed = time.time() - start

    print(f"\n{DISCLAIMER}\n")
    header = (
        f"{'budget':>6} {'policy':<14} {'read':>6} {'rel_err':>8} {'recall':>7} "
        f"{'err_conc':>8} {'err_text':>8} {'err_shift':>9} {'rec_shift':>9} {'n_dyn':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['budget']:>6.0%} {r['policy']:<14} {r['read_fraction']:>6.3f} "
            f"{r['rel_err']:>8.4f} {r['recall']:>7.4f} {r['rel_err_concentrated']:>8.4f} "
            f"{r['rel_err_text_reader']:>8.4f} {r['rel_err_shifting']:>9.4f} "
            f"{r['recall_shifting']:>9.4f} {r['dynamic_heads']:>5.1f}"
        )
    print(f"\n{len(cases)} cases x {args.seeds} requests in {elapsed:.1f}s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "fidelity",
        "data": "synthetic planted-structure KV, not a model",
        "disclaimer": DISCLAIMER,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "device": "cpu",
        },
        "args": {k: (_show(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "head_kinds_per_layer": list(KINDS),
        "prompt_len": requests[0].prompt_len,
        "elapsed_s": round(elapsed, 2),
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(rows, args)
    print(f"wrote {_show(args.out)} and {_show(args.plot)}")
    return 0


def _show(path: Path) -> str:
    """The path relative to the repository when inside it (results stay machine-independent)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def plot(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("rel_err", "attention output rel. error (all heads)", True),
        ("recall", "attention mass recalled (all heads)", False),
        ("recall_concentrated", "mass recalled (concentrated heads)", False),
        ("recall_shifting", "mass recalled (shifting heads)", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.4))
    for ax, (metric, title, log) in zip(axes, panels, strict=True):
        for name in args.policies:
            pts = [(r["budget"], r[metric]) for r in rows if r["policy"] == name]
            ax.plot(
                [100 * float(b) for b, _ in pts],
                [float(v) for _, v in pts],
                marker="o",
                label=name,
                linewidth=2.5 if name == "hybridkv" else 1.2,
            )
        ax.set_xlabel("budget (% of prompt KV)")
        ax.set_xticks([100 * b for b in args.budgets])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fidelity on SYNTHETIC planted-structure KV (not a model)", fontsize=11)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
