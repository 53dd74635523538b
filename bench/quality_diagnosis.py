"""Offline diagnosis of the quality benchmark: what each policy reads, and what it then answers.

In-process with transformers on the committed tile-task model (``bench/quality_model``), no server.
For every question of the tile set (same generator and seed as ``bench/quality.py``, so the same
questions), per turn:

1. **Prefill, full cache.** A recording attention function (registered with transformers'
   ``AttentionInterface``) keeps each text layer's queries (after M-RoPE, positions as SGLang
   computes them from ``mm_token_type_ids``), keys and values. The observation window is the last
   ``window`` rows, as the server observes them (a prefix-cache hit prefills the window again);
   ``--partial-window`` observes only the rows servers computed before that (later turns of a
   multi-turn conversation: everything up to the previous turn's reply was cached, so fewer rows
   were observed).
2. **Full-cache greedy decode.** At every decode step the attention of the step's query heads over
   the whole cache is kept: the reference the policies are scored against.
3. **Per policy and budget**, the policy's own ``observe_layer`` / ``finalize``
   (:func:`hybridkv_sglang.policy.build_policy`) make its plan. Scored against step 2:

   * *read set* at each decode step, per (layer, kv head): static head, its kept positions; dynamic
     head, its resident prefix and tail plus the top-k chunks the Quest bound picks for that
     step's query (:class:`hybridkv_sglang.storage.page_tables.DynamicRowLayout` and
     :func:`hybridkv_sglang.policy.select_chunks`: the rule the runtime serves);
   * *read fraction* = prompt entries read per step / ``L x H_kv x N`` (measured from the masks;
     the plan's own ``read_fraction``, bytes read per step with the chunk index, is kept beside
     it as ``plan_read_fraction``);
   * *recall* = share of the full-cache attention mass over the prompt (mean over the GQA group)
     that falls on the read set; *target recall* the same over the asked tile's 4 visual tokens;
     *target coverage* the share of those 4 tokens read. The *value step* is the decode step that
     emits a tile's value: the first decode step (``describe``'s value after the echoed key,
     ``pair_name``'s second value; the first answer token comes from the dense prefill).
4. **Emulated compressed decode**: greedy decode again from the same prefill cache with every text
   layer's decode attention restricted to the plan's read set (what the server computes), scored
   by exact match like ``bench/quality.py``. Multi-turn history carries the gold answers (the full
   model's own replies on this set), not the policy's replies.

Run: ``python bench/quality_diagnosis.py`` (about 8 minutes on one CPU thread at the defaults);
writes ``bench/results/quality_diagnosis.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from train_quality_model import Encoder, patchify  # noqa: E402

from hybridkv_sglang.policy import (  # noqa: E402
    POLICIES,
    CompressionPlan,
    CompressionPolicy,
    build_policy,
    focus_size,
    select_chunks,
    window_attention,
)
from hybridkv_sglang.storage.page_tables import DynamicRowLayout  # noqa: E402
from hybridkv_sglang.testing import quality_task as qt  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL_DIR = ROOT / "bench" / "quality_model"
IMAGE_TOKEN = "<|image_pad|>"
END_TOKEN = "<|im_end|>"
THETAS = (0.5, 0.7, 0.8, 0.9, 0.95)
"""Focus masses whose ``|U|`` is recorded per head (stage-1 sensitivity)."""

TUNED: dict[str, Any] = {
    "sink": 0,
    "static_priority": "focus",
    "dynamic_top_k": "budget",
    "chunk_size": 4,
    "top_k_chunks": 64,
}
"""The configuration docs/quality-diagnosis.md recommends for this model (see there why)."""
DESIGN: dict[str, Any] = {"static_priority": "text", "dynamic_top_k": "fixed"}
"""DESIGN §2's stage-3 rules, which the variants below start from (the defaults now differ)."""
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name, cls in POLICIES.items() if cls.benchmarked},
    "hybridkv": ("hybridkv", DESIGN),
    "hybridkv_focus": ("hybridkv", {**DESIGN, "static_priority": "focus"}),
    "hybridkv_bk": ("hybridkv", {**DESIGN, "dynamic_top_k": "budget"}),
    "hybridkv_focus_bk": ("hybridkv", {"static_priority": "focus", "dynamic_top_k": "budget"}),
    "hybridkv_focus_bk_c4": (
        "hybridkv",
        {k: v for k, v in TUNED.items() if k != "sink"},
    ),
    "hybridkv_sink0": ("hybridkv", {**DESIGN, "sink": 0}),
    "hybridkv_tuned": ("hybridkv", TUNED),
    "hybridkv_tuned_text": ("hybridkv", {**TUNED, "static_priority": "text"}),
    "all_dynamic_sink0_c4": ("all_dynamic", {"sink": 0, "chunk_size": 4}),
}
"""Label -> (registered policy, hyper-parameters beyond budget/window/sink): every benchmarked
policy at its defaults, then hybridkv variants (``hybridkv`` itself with the design's rules).
``--variant`` adds."""
DEFAULT_VARIANTS = tuple(VARIANTS)


# ---------------------------------------------------------------------------------------------
# Recording / restricting attention


@dataclass
class LayerPrefill:
    """One text layer at the end of prefill: ``q [N, H_q, D]``, ``k``/``v`` ``[N, H_kv, D]``."""

    q: Tensor
    k: Tensor
    v: Tensor


@dataclass
class AttentionProbe:
    """Attention function for the text layers: records prefill q/k/v and decode attention, and
    optionally restricts each kv head's decode attention to a read mask.

    ``read_mask(layer, q [H_kv, G, D], total_len) -> [H_kv, total_len]`` bool, or ``None`` for
    full attention. Vision-tower attention is passed through to SDPA untouched.
    """

    record: bool = False
    read_mask: Callable[[int, Tensor, int], Tensor] | None = None
    prefill: dict[int, LayerPrefill] = field(default_factory=dict)
    decode: list[dict[int, tuple[Tensor, Tensor]]] = field(default_factory=list)
    """Per decode step, per layer: ``q [H_kv, G, D]`` and full-cache probabilities
    ``[H_kv, G, T]`` (recorded only with ``record``)."""

    def __call__(
        self,
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention

        if not isinstance(module, Qwen2_5_VLAttention):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        layer = module.layer_idx
        if query.shape[2] > 1:  # prefill: dense, recorded
            if self.record:
                self.prefill[layer] = LayerPrefill(
                    query[0].transpose(0, 1).clone(),
                    key[0].transpose(0, 1).clone(),
                    value[0].transpose(0, 1).clone(),
                )
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        num_kv, total, dim = key.shape[1], key.shape[2], key.shape[3]
        q = query[0, :, 0].view(num_kv, -1, dim)  # [H_kv, G, D]
        logits = torch.matmul(q, key[0].transpose(1, 2)) * scaling  # [H_kv, G, T]
        if self.record:
            if layer == 0:
                self.decode.append({})
            self.decode[-1][layer] = (q.clone(), torch.softmax(logits, dim=-1))
        if self.read_mask is not None:
            mask = self.read_mask(layer, q, total)
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(logits, dim=-1), value[0])  # [H_kv, G, D]
        return out.reshape(1, 1, -1, dim), None


# ---------------------------------------------------------------------------------------------
# Questions


@dataclass
class Question:
    """One turn of one case, as a server request: prompt ids and what the answer needs."""

    case: qt.TileCase
    turn: int
    ids: list[int]
    observed_rows: int
    """Window rows observed (all of ``window`` unless ``--partial-window`` emulates a hit)."""
    target_by_step: dict[int, list[int]]
    """Decode step -> prompt positions of the tile whose value that step emits."""
    tile_positions: list[int]
    """Prompt positions of every tile this turn asks about."""

    @property
    def answer(self) -> str:
        return self.case.turns[self.turn].answer


def tile_positions(ids: Sequence[int], image_token: int, image: int, tile: qt.Tile) -> list[int]:
    """Prompt positions of the tile's 2 x 2 merged tokens in image ``image`` (row-major grid)."""
    starts = [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != t)]
    side = qt.IMAGE_SIDE // qt.CELL
    base = starts[image] + tile.row * side + tile.col
    return [base, base + 1, base + side, base + side + 1]


def make_questions(
    cases: Sequence[qt.TileCase], tokenizer: Any, encoder: Encoder, window: int, partial: bool
) -> list[Question]:
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for case in cases:
        cached: list[int] = []
        for turn_index, turn in enumerate(case.turns):
            ids = encoder.expand(tokenizer(qt.chat_text(case, upto=turn_index + 1))["input_ids"])
            common = 0
            if partial:
                while common < min(len(ids), len(cached)) and ids[common] == cached[common]:
                    common += 1
            rows = max(1, min(window, len(ids) - common))
            images = {t.key: i for i, t in enumerate(case.tiles)}
            pos = {
                key: tile_positions(ids, image_token, images[key], case.tiles[images[key]])
                for key in turn.keys
            }
            # Decode step 0 (the first forward over the compressed cache) emits the value after
            # the echoed key (describe) or the second value (pair_name); the first answer token
            # comes from the dense prefill.
            value_key = turn.keys[0] if turn.kind == "describe" else turn.keys[-1]
            out.append(
                Question(
                    case=case,
                    turn=turn_index,
                    ids=ids,
                    observed_rows=rows,
                    target_by_step={0: pos[value_key]},
                    tile_positions=sorted(p for ps in pos.values() for p in ps),
                )
            )
            # What the radix tree holds after this turn: prompt + reply (the last token, the
            # end of turn, is sampled but never run forward).
            cached = ids + tokenizer(turn.answer)["input_ids"]
    return out


# ---------------------------------------------------------------------------------------------
# Read sets


def plan_read_mask(plan: CompressionPlan) -> Callable[[int, Tensor, int], Tensor]:
    """The runtime's read set of each kv head at one decode step, from the step's query."""
    n = plan.prompt_len
    layout = DynamicRowLayout.for_prompt(n, plan.sink, plan.window, plan.chunk_size)
    kept = torch.zeros(plan.num_rows, n, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(plan.num_rows), plan.kept_indptr.diff())
    kept[rows, plan.kept_positions.long()] = True
    kept = kept.view(plan.num_layers, plan.num_kv_heads, n)
    pos = torch.arange(n)

    def read_mask(layer: int, q: Tensor, total: int) -> Tensor:
        mask = torch.ones(plan.num_kv_heads, total, dtype=torch.bool)
        mask[:, :n] = kept[layer]
        dyn = plan.is_dynamic[layer].nonzero().flatten()
        if dyn.numel():
            index = plan.chunk_index
            assert index is not None
            num = torch.full((dyn.numel(),), layout.num_chunks, dtype=torch.int32)
            _, top = select_chunks(
                q[dyn].float(),
                index[layer, dyn],
                layout.first_chunk,
                num,
                plan.top_k_chunks,
            )
            chunk_of = pos // plan.chunk_size
            picked = (chunk_of[None, :, None] == top[:, None, :].long()).any(-1)  # [R, N]
            resident = (pos < layout.prefix_end) | (pos >= layout.tail_start)
            mask[dyn, :n] = picked | resident[None]
        return mask

    return read_mask


def scores_for(
    probs: Tensor, mask: Tensor, n: int, targets: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per kv head: recall over the prompt, target recall, target coverage, entries read.

    ``probs [H_kv, G, T]`` full-cache attention, ``mask [H_kv, T]`` read set.
    """
    p = probs[:, :, :n].double()
    m = mask[:, None, :n]
    recall = ((p * m).sum(-1) / p.sum(-1).clamp_min(1e-30)).mean(-1)
    idx = torch.tensor(list(targets), dtype=torch.long)
    pt = p[:, :, idx]
    t_recall = ((pt * m[:, :, idx]).sum(-1) / pt.sum(-1).clamp_min(1e-30)).mean(-1)
    coverage = mask[:, idx].double().mean(-1)
    return recall, t_recall, coverage, mask[:, :n].sum(-1)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Runner:
    model: Any
    tokenizer: Any
    encoder: Encoder
    probe: AttentionProbe
    args: argparse.Namespace
    image_token: int = 0
    end_token: int = 0

    def decode(self, cache: Any, first: int, n: int, steps: int) -> list[int]:
        """Greedy tokens after ``first`` (the prefill's token); crops the cache back to ``n``."""
        tokens = [first]
        with torch.no_grad():
            while len(tokens) < steps and tokens[-1] != self.end_token:
                out = self.model(
                    input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True
                )
                tokens.append(int(out.logits[0, -1].argmax()))
        extra = cache.get_seq_length() - n
        if extra:
            cache.crop(-extra)
        return tokens

    def reply(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(
            [t for t in tokens if t != self.end_token], skip_special_tokens=True
        )

    def run_question(
        self, question: Question, variants: dict[str, tuple[str, dict[str, Any]]]
    ) -> dict[str, Any]:
        args, probe = self.args, self.probe
        ids = torch.tensor([question.ids])
        n = len(question.ids)
        is_text = ids[0] != self.image_token
        case = question.case
        probe.prefill, probe.decode, probe.read_mask, probe.record = {}, [], None, True
        self.model.model.rope_deltas = None
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                pixel_values=patchify(case.image_arrays()),
                image_grid_thw=torch.tensor([self.encoder.grid] * case.k),
                mm_token_type_ids=(ids == self.image_token).int(),
                use_cache=True,
            )
        cache = out.past_key_values
        first = int(out.logits[0, -1].argmax())
        full_tokens = self.decode(cache, first, n, args.max_new_tokens)
        probe.record = False
        layers = sorted(probe.prefill)
        sm_scale = 1.0 / math.sqrt(probe.prefill[0].k.shape[-1])
        rows = question.observed_rows
        full_reply = self.reply(full_tokens)
        record: dict[str, Any] = {
            "case": case.case_id,
            "kind": case.kind,
            "k": case.k,
            "turn": question.turn,
            "prompt_len": n,
            "visual_tokens": int((~is_text).sum()),
            "observed_rows": rows,
            "full_reply": full_reply,
            "full_correct": _correct(full_reply, question.answer),
            "decode_steps": len(probe.decode),
        }
        # Stage-1 inputs of the full model: |U| per head at several theta.
        attn = [
            window_attention(probe.prefill[layer].q[-rows:], probe.prefill[layer].k, sm_scale)
            for layer in layers
        ]
        record["focus"] = {
            str(theta): torch.stack([focus_size(a, theta) for a in attn]).tolist()
            for theta in THETAS
        }
        # Where the full model looks at the value step (per layer, kv head).
        steps = probe.decode
        value_step = 0
        if value_step < len(steps):
            targets = question.target_by_step[value_step]
            probs = torch.stack([steps[value_step][layer][1] for layer in layers])  # [L,H,G,T]
            prompt_mass = probs[..., :n].sum(-1)
            record["full_target_mass"] = (
                (probs[..., targets].sum(-1) / prompt_mass).mean(-1).tolist()
            )
            record["full_visual_mass"] = (
                (probs[..., :n][..., ~is_text].sum(-1) / prompt_mass).mean(-1).tolist()
            )
        # How much of the decode attention the always-kept floor holds (full cache).
        floor_mass = defaultdict(list)
        for step in steps:
            probs = torch.stack([step[layer][1] for layer in layers])[..., :n]  # [L,H,G,N]
            total = probs.sum(-1)
            floor_mass["sink"].append((probs[..., : args.sink].sum(-1) / total).mean(-1))
            floor_mass["window"].append((probs[..., n - args.window :].sum(-1) / total).mean(-1))
        for part, values in floor_mass.items():
            record[f"full_{part}_mass"] = torch.stack(values).mean(0).tolist()
        record["configs"] = {}
        for budget in args.budgets:
            for label, (name, extra) in variants.items():
                values = {"budget": budget, "window": args.window, "sink": args.sink, **extra}
                policy = build_policy(name, **values)
                plan = make_plan(policy, probe.prefill, rows, is_text, sm_scale)
                read_mask = plan_read_mask(plan)
                per_step = []
                for s, step in enumerate(steps):
                    targets = question.target_by_step.get(s, question.tile_positions)
                    rec, t_rec, cov, read = [], [], [], []
                    for layer in layers:
                        q, probs = step[layer]
                        mask = read_mask(layer, q, probs.shape[-1])
                        r, tr, c, e = scores_for(probs, mask, n, targets)
                        rec.append(r)
                        t_rec.append(tr)
                        cov.append(c)
                        read.append(e)
                    per_step.append(
                        {
                            "recall": torch.stack(rec).tolist(),
                            "target_recall": torch.stack(t_rec).tolist(),
                            "target_coverage": torch.stack(cov).tolist(),
                            "read_fraction": float(torch.stack(read).sum()) / (len(layers) * 2 * n),
                        }
                    )
                probe.read_mask = read_mask
                tokens = self.decode(cache, first, n, args.max_new_tokens)
                probe.read_mask = None
                reply = self.reply(tokens)
                stats = plan.stats()
                record["configs"][f"{label}@{budget:g}"] = {
                    "reply": reply,
                    "correct": _correct(reply, question.answer),
                    "plan_read_fraction": stats["read_fraction"],
                    "dynamic": plan.is_dynamic.int().tolist(),
                    "budgets": plan.budgets.tolist(),
                    "top_k_chunks": plan.top_k_chunks,
                    "steps": per_step,
                }
        return record


def make_plan(
    policy: CompressionPolicy,
    prefill: dict[int, LayerPrefill],
    rows: int,
    is_text: Tensor,
    sm_scale: float,
) -> CompressionPlan:
    """The policy's own prefill-end path: observe every layer, then finalize."""
    observations = [
        policy.observe_layer(
            layer,
            prefill[layer].q[-rows:],
            prefill[layer].k,
            sm_scale,
            values=prefill[layer].v if policy.needs_values else None,
        )
        for layer in sorted(prefill)
    ]
    return policy.finalize(observations, is_text)


def _correct(reply: str, answer: str) -> bool:
    def norm(text: str) -> str:
        text = " ".join(text.strip().lower().split()).strip("\"'`")
        return text[:-1].rstrip() if text.endswith(".") else text

    return norm(reply) == norm(answer)


# ---------------------------------------------------------------------------------------------
# Aggregation


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per config: accuracy, read fractions, recall (all steps / value step, per head)."""
    rows = []
    for label in labels:
        got = [r for r in records if label in r["configs"]]
        if not got:
            continue
        cfgs = [r["configs"][label] for r in got]
        acc_kind: dict[str, list[int]] = defaultdict(list)
        acc_k: dict[str, list[int]] = defaultdict(list)
        for r, c in zip(got, cfgs, strict=True):
            acc_kind[r["kind"]].append(int(c["correct"]))
            acc_k[str(r["k"])].append(int(c["correct"]))
        steps = [s for c in cfgs for s in c["steps"]]  # every decode step reads compressed KV
        value = [c["steps"][0] for c in cfgs if c["steps"]]
        value_k = [r["k"] for r, c in zip(got, cfgs, strict=True) if c["steps"]]
        per_head = torch.tensor([s["recall"] for s in steps]).mean(0)
        value_target = torch.tensor([s["target_recall"] for s in value])
        value_cov = torch.tensor([s["target_coverage"] for s in value])
        dyn = torch.tensor([c["dynamic"] for c in cfgs]).double()
        rows.append(
            {
                "config": label,
                "variant": label.rsplit("@", 1)[0],
                "budget": float(label.rsplit("@", 1)[1]),
                "questions": len(cfgs),
                "accuracy": _mean([int(c["correct"]) for c in cfgs]),
                "accuracy_by_kind": {k: _mean(v) for k, v in sorted(acc_kind.items())},
                "accuracy_by_k": {k: _mean(v) for k, v in sorted(acc_k.items(), key=_k_key)},
                "plan_read_fraction": _mean([c["plan_read_fraction"] for c in cfgs]),
                "read_fraction": _mean([s["read_fraction"] for s in steps]),
                "recall": float(per_head.mean()),
                "recall_by_head": per_head.tolist(),
                "value_step_recall": float(torch.tensor([s["recall"] for s in value]).mean()),
                "value_step_target_recall": float(value_target.mean()),
                "value_step_target_recall_by_head": value_target.mean(0).tolist(),
                "value_step_target_coverage_by_head": value_cov.mean(0).tolist(),
                "value_step_target_recall_by_k": {
                    str(k): float(value_target[torch.tensor(value_k) == k].mean())
                    for k in sorted(set(value_k))
                },
                "dynamic_fraction_by_head": dyn.mean(0).tolist(),
                "dynamic_heads_mean": float(dyn.sum((1, 2)).mean()),
                "top_k_chunks_mean": _mean([c["top_k_chunks"] for c in cfgs]),
            }
        )
    return rows


def _k_key(item: tuple[str, Any]) -> int:
    return int(item[0])


def classification_summary(records: list[dict[str, Any]], budgets: Sequence[float]) -> dict:
    """Stage 1 on this model: ``|U|/N`` per head and how often ``|U| > b_mean`` (per K, theta)."""
    out: dict[str, Any] = {}
    for theta in THETAS:
        key = str(theta)
        focus = torch.tensor([r["focus"][key] for r in records]).double()  # [Q, L, H]
        n = torch.tensor([r["prompt_len"] for r in records]).double()[:, None, None]
        frac = focus / n
        entry: dict[str, Any] = {
            "focus_over_n_mean": frac.mean(0).tolist(),
            "focus_over_n_std": frac.std(0).tolist(),
            "focus_mean": focus.mean(0).tolist(),
        }
        for budget in budgets:
            b_mean = torch.floor(budget * n + 1e-9)
            over = (focus > b_mean).double()
            entry[f"over_b_mean@{budget:g}"] = over.mean(0).tolist()
            entry[f"over_b_mean@{budget:g}_by_k"] = {
                str(k): over[[r["k"] == k for r in records]].mean(0).tolist()
                for k in sorted({r["k"] for r in records})
            }
        out[key] = entry
    return out


def where_the_model_looks(records: list[dict[str, Any]]) -> dict[str, Any]:
    got = [r for r in records if "full_target_mass" in r]
    target = torch.tensor([r["full_target_mass"] for r in got])
    visual = torch.tensor([r["full_visual_mass"] for r in got])
    floor = {
        f"{part}_mass_by_head": torch.tensor(
            [r[f"full_{part}_mass"] for r in records if f"full_{part}_mass" in r]
        )
        .mean(0)
        .tolist()
        for part in ("sink", "window")
    }
    return {
        "questions": len(got),
        **floor,
        "target_mass_by_head": target.mean(0).tolist(),
        "visual_mass_by_head": visual.mean(0).tolist(),
        "target_mass_by_k": {
            str(k): target[[r["k"] == k for r in got]].mean(0).tolist()
            for k in sorted({r["k"] for r in got})
        },
    }


def failure_analysis(records: list[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per config: where its wrong answers are, and what their value step read.

    For the failing questions (and, beside them, the passing ones): count by kind and K; at the
    value step, the share of the asked tile's 4 tokens read (*coverage*) and of the full cache's
    attention mass on them kept (*target recall*), on static and on dynamic heads apart; the
    recall of the whole prompt's mass; and what the top-down split gave dynamic heads (how many,
    entries read per step, chunks retrieved per step).
    """
    out: dict[str, Any] = {}
    for label in labels:
        got = [(r, r["configs"][label]) for r in records if label in r["configs"]]
        got = [(r, c) for r, c in got if c["steps"]]
        if not got:
            continue
        entry: dict[str, Any] = {}
        for outcome, want in (("failing", False), ("passing", True)):
            part = [(r, c) for r, c in got if bool(c["correct"]) is want]
            if not part:
                entry[outcome] = {"questions": 0}
                continue
            dyn = torch.tensor([c["dynamic"] for _, c in part], dtype=torch.bool)  # [Q, L, H]
            value = [c["steps"][0] for _, c in part]
            cov = torch.tensor([s["target_coverage"] for s in value])
            t_rec = torch.tensor([s["target_recall"] for s in value])
            budgets = torch.tensor([c["budgets"] for _, c in part]).double()

            def on(x: Tensor, mask: Tensor) -> float | None:
                return float(x[mask].mean()) if bool(mask.any()) else None

            entry[outcome] = {
                "questions": len(part),
                "by_kind": dict(Counter(r["kind"] for r, _ in part)),
                "by_k": {str(k): n for k, n in sorted(Counter(r["k"] for r, _ in part).items())},
                "value_step_recall": float(torch.tensor([s["recall"] for s in value]).mean()),
                "target_coverage_static": on(cov, ~dyn),
                "target_coverage_dynamic": on(cov, dyn),
                "target_recall_static": on(t_rec, ~dyn),
                "target_recall_dynamic": on(t_rec, dyn),
                "target_coverage_by_head": cov.mean(0).tolist(),
                "dynamic_heads_mean": float(dyn.sum((1, 2)).double().mean()),
                "dynamic_read_per_step_mean": on(budgets, dyn),
                "static_read_per_step_mean": on(budgets, ~dyn),
                "top_k_chunks_mean": _mean(
                    [c["top_k_chunks"] for _, c in part if any(any(row) for row in c["dynamic"])]
                ),
            }
        out[label] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Plot


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    metrics = (
        ("accuracy", "emulated exact-match accuracy"),
        ("recall", "attention-mass recall (decode steps)"),
        ("value_step_target_recall", "target-tile recall at the value step"),
    )
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cmap = plt.get_cmap("tab20")
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for i, variant in enumerate(variants):
            pts = sorted((r["read_fraction"], r[metric]) for r in rows if r["variant"] == variant)
            style = "-" if variant.startswith("hybridkv") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=cmap(i), label=variant)
        ax.set_xlabel("measured read fraction (prompt KV entries read per decode step)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("quality diagnosis: tile task, committed model, offline (transformers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--ks", default="16,32,64", help="images per prompt, comma-separated")
    parser.add_argument("--per-kind", type=int, default=8)
    parser.add_argument("--kinds", default=",".join(qt.EVAL_KINDS))
    parser.add_argument("--seed", type=int, default=1_000_000, help="bench/quality.py's set")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=POLICY:JSON",
        help='extra variant, e.g. hk_t8=hybridkv:{"theta": 0.8}',
    )
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--partial-window",
        action="store_true",
        help="later turns observe only the rows after their prefix-cache hit (servers before "
        "the window re-prefill)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_diagnosis.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "quality_diagnosis.png")
    parser.add_argument("--keep-questions", action="store_true", help="per-question records")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    variants = {label: VARIANTS[label] for label in args.variants}
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        name, _, extra = rest.partition(":")
        variants[label] = (name, json.loads(extra) if extra else {})
    probe = AttentionProbe()
    AttentionInterface.register("hybridkv_probe", probe)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="hybridkv_probe"
    ).eval()
    encoder = Encoder(tokenizer)
    runner = Runner(
        model,
        tokenizer,
        encoder,
        probe,
        args,
        image_token=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        end_token=tokenizer.convert_tokens_to_ids(END_TOKEN),
    )
    ks = [int(k) for k in args.ks.split(",")]
    cases = qt.make_question_set(args.seed, ks, args.per_kind, kinds=args.kinds.split(","))
    questions = make_questions(cases, tokenizer, encoder, args.window, args.partial_window)
    started = time.time()
    records = [runner.run_question(q, variants) for q in tqdm(questions, desc="questions")]
    labels = [f"{label}@{b:g}" for b in args.budgets for label in variants]
    rows = summarize(records, labels)
    result = {
        "benchmark": "quality_diagnosis",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "device": "cpu",
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": {label: {"policy": n, **extra} for label, (n, extra) in variants.items()},
        "wall_s": round(time.time() - started, 1),
        "questions": len(records),
        "full_accuracy": _mean([int(r["full_correct"]) for r in records]),
        "classification": classification_summary(records, args.budgets),
        "full_attention": where_the_model_looks(records),
        "failures": failure_analysis(records, labels),
        "rows": rows,
        "per_question": [
            {
                "case": r["case"],
                "turn": r["turn"],
                "k": r["k"],
                "prompt_len": r["prompt_len"],
                "correct": {label: int(c["correct"]) for label, c in r["configs"].items()},
            }
            for r in records
        ],
    }
    if args.keep_questions:
        result["records"] = records
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.plot)
    width = max(len(r["config"]) for r in rows)
    print(f"full accuracy {result['full_accuracy']:.3f} on {len(records)} questions")
    print(f"{'config':<{width}}  acc    read   recall value_tgt")
    for r in rows:
        print(
            f"{r['config']:<{width}}  {r['accuracy']:.3f}  {r['read_fraction']:.3f}  "
            f"{r['recall']:.3f}  {r['value_step_target_recall']:.3f}"
        )
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
