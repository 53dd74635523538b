"""Train the quality benchmark's small Qwen2.5-VL from scratch on the "tile" task (CPU is enough).

The model (~1.2 M parameters, ~5 MB float32 safetensors) has the Qwen2.5-VL architecture: LM hidden
128, 4 layers, 4 query / 2 KV heads of 32, MLP 256, M-RoPE sections [4, 6, 6], rope theta 1e6;
vision tower depth 2, hidden 64, patch 14, spatial merge 2; a ~1,000-token byte-level BPE with the
task words as single tokens and Qwen's special tokens; images capped at 112 x 112 px (16 visual
tokens). Tokenizer, chat template, processor and config come from
``hybridkv_sglang.testing.tiny_model`` (``extra_words`` = the task words); the weights are
trained here. The task is ``hybridkv_sglang.testing.quality_task`` (see its docstring).

Recipe (after ``/work/shared/notes/quality-model.md``, which found what does and does not learn):

* Batches of ``--batch`` conversations with the same K, each with 1..8 questions (loss on the
  answers and their ``<|im_end|>`` only); the auxiliary "Describe the <key> square." ->
  "<key> <value>" turn with probability 0.5 per question makes the retrieval learnable. Other
  turns are single questions until K_max reaches ``--pair-from-k`` (4), then two-region questions
  with probability ``--pair-prob`` (0.5): with them from the start, a first run learned to compare
  and list the values present at K = 2 (no key needed) and had not learned the key -> value
  binding after 3,600 steps. A share ``--list-prob`` (default 0) of the two-region questions are
  ``list_name`` questions instead (three keys, four with probability ``--list-four-prob``).
* Adaptive curriculum: K_max starts at 2 and grows (+1 up to 8, then x1.25) whenever the loss
  EMA falls below ``--ema-threshold`` (from K_max 8 on also after ``--patience-steps`` at one
  K_max with the EMA below ``--patience-ema``), up to ``--k-final``; K is K_max half the time,
  else uniform in [2, K_max] (before K_max reaches 8) or [4, K_max]. Batches above K = 8 hold
  ``--batch`` x 8 / K conversations (at least 4).
* AdamW (0.9, 0.98), weight decay 0.05, lr ``--lr`` with 100 warm-up steps; once K_max reaches
  ``--k-final``, ``--anneal-steps`` more steps with a cosine decay to 5 % of ``--lr``.
* The data of step s is a function of (``--seed``, s, K_max), so a run resumed from its checkpoint
  (``--work-dir``/checkpoint.pt, written every ``--checkpoint-minutes``) continues exactly.
  ``--max-minutes`` caps the wall time of one invocation (checkpoint, then exit 3 "not done");
  invoke again to continue. The retrieval "clicks" after a variable time at chance level, so cap
  by time rather than steps.
* ``--init-from DIR`` fine-tunes an exported model (same architecture; its tokenizer must equal
  the one built here) instead of starting from random weights: K_max starts at ``--k-start``
  (default ``--k-final``), lr defaults to 3e-4 (``--warmup-steps`` warm-up). Teaching the
  committed model lists, keeping its other skills in the mix::

    python bench/train_quality_model.py --init-from bench/quality_model --out DIR --threads 1 \
        --list-prob 0.6 --list-four-prob 0.3 --describe-prob 0.4 --pair-prob 0.8 --lr 5e-4 \
        --k-start 16 --k-final 32 --patience-steps 250 --eval-ks 16,32,64 --max-minutes 38

From scratch:

    python bench/train_quality_model.py --out bench/quality_model --max-minutes 60

On exit (done or capped) the current weights are exported to ``--out`` with the tokenizer and
processor files and ``training.json`` (arguments, steps, time, curriculum log, held-out accuracy
by greedy teacher-forced exact match with transformers over single, describe, pair_name,
multi_turn, and list_name when ``--list-prob`` > 0; per kind, per K, per kind and K, and for
lists of 3 and 4 keys).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from hybridkv_sglang.testing import quality_task as qt
from hybridkv_sglang.testing.tiny_model import (
    MANIFEST_NAME,
    PATCH_SIZE,
    SPATIAL_MERGE_SIZE,
    TEMPORAL_PATCH_SIZE,
    build_from_spec,
    resolve_spec,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "quality_model"
DEFAULT_WORK = ROOT / ".cache" / "quality-train"

MODEL_OPTIONS: dict[str, Any] = {
    "layers": 4,
    "hidden": 128,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 256,
    "vision_depth": 2,
    "vision_hidden": 64,
    "vision_heads": 2,
    "vision_intermediate": 128,
    "vision_window": 112,
    "min_pixels": 28 * 28 * 4,
    "max_pixels": qt.IMAGE_SIDE * qt.IMAGE_SIDE,
    "vocab": 1000,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "dtype": "float32",
}
# CLIP normalisation of Qwen2-VL's image processor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
EXPORT_SKIP = {MANIFEST_NAME, "model.safetensors", "config.json"}


# ---------------------------------------------------------------------------------------------
# Encoding (the processor's output, computed directly: numpy image processing is the slow part)


def patchify(images: Sequence[Any]) -> Tensor:
    """Qwen2-VL ``pixel_values`` of equally-sized images that need no resize.

    Args:
        images: ``[H, W, 3]`` uint8 arrays, H and W multiples of 28 within the pixel limits.
    Returns:
        ``[n_images * (H / 14) * (W / 14), 3 * 2 * 14 * 14]`` float32, rows in the processor's
        order (merge-window-major), equal to ``Qwen2VLImageProcessor`` output.
    """
    import numpy as np

    batch = torch.from_numpy(np.stack(images)).float().div_(255.0)  # [N, H, W, 3]
    mean = torch.tensor(IMAGE_MEAN).view(1, 1, 1, 3)
    std = torch.tensor(IMAGE_STD).view(1, 1, 1, 3)
    batch = ((batch - mean) / std).permute(0, 3, 1, 2)  # [N, 3, H, W]
    n, c, h, w = batch.shape
    gh, gw, m, p, t = h // PATCH_SIZE, w // PATCH_SIZE, SPATIAL_MERGE_SIZE, PATCH_SIZE, 2
    x = batch.unsqueeze(1).expand(n, TEMPORAL_PATCH_SIZE, c, h, w)
    x = x.reshape(n, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # n, gh/m, gw/m, m, m, c, t, p, p
    return x.reshape(n * gh * gw, c * t * p * p).contiguous()


@dataclass
class Encoded:
    input_ids: Tensor  # [B, T] int64, right-padded
    attention_mask: Tensor  # [B, T] int64
    labels: Tensor  # [B, T] int64, -100 outside answers
    pixel_values: Tensor  # [B * K * 64, 1176] float32
    image_grid_thw: Tensor  # [B * K, 3] int64
    answer_spans: list[list[tuple[int, int]]]  # per sample, per turn: [start, end) label positions
    list_mask: Tensor  # [B, T] bool, label positions of list_name answers


class Encoder:
    """Chat text + images -> model inputs, as the processor and the chat template make them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.assistant_prefix = tokenizer.encode("<|im_start|>assistant\n")
        grid = qt.IMAGE_SIDE // PATCH_SIZE
        self.grid = (1, grid, grid)

    def expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in ids:
            if token == self.image_pad:
                out.extend([token] * qt.VISUAL_TOKENS_PER_IMAGE)
            else:
                out.append(token)
        return out

    def answer_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each assistant answer including its ``<|im_end|>``."""
        spans, n, i = [], len(self.assistant_prefix), 0
        while i <= len(ids) - n:
            if ids[i : i + n] == self.assistant_prefix:
                start = end = i + n
                while end < len(ids) and ids[end] != self.im_end:
                    end += 1
                spans.append((start, min(end + 1, len(ids))))
                i = end
            else:
                i += 1
        return spans

    def encode(self, cases: Sequence[qt.TileCase]) -> Encoded:
        texts = [qt.training_text(case) for case in cases]
        rows = [self.expand(ids) for ids in self.tokenizer(texts)["input_ids"]]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        list_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        spans = []
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention[b, : len(row)] = 1
            row_spans = self.answer_spans(row)
            spans.append(row_spans)
            for (start, end), turn in zip(row_spans, cases[b].turns, strict=True):
                labels[b, start:end] = input_ids[b, start:end]
                list_mask[b, start:end] = turn.kind == "list_name"
        arrays = [a for case in cases for a in case.image_arrays()]
        grid = torch.tensor([self.grid] * len(arrays), dtype=torch.long)
        return Encoded(input_ids, attention, labels, patchify(arrays), grid, spans, list_mask)


def forward_logits(model: Any, batch: Encoded, positions: Tensor | None = None) -> Tensor:
    """Logits ``[B, T, V]``, or ``[n, V]`` at ``positions`` (``[n, 2]`` (row, index) pairs) only:
    the LM head over every prompt token is a large share of a CPU step and mostly wasted."""
    hidden = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
    ).last_hidden_state
    if positions is not None:
        hidden = hidden[positions[:, 0], positions[:, 1]]
    return model.lm_head(hidden)


def answer_loss(model: Any, batch: Encoded) -> tuple[Tensor, float | None]:
    """Mean next-token cross-entropy over the answer tokens (predicted from the previous one),
    and the mean over the ``list_name`` answer tokens alone (None if the batch has none)."""
    rows, cols = torch.nonzero(batch.labels[:, 1:] != -100, as_tuple=True)
    logits = forward_logits(model, batch, torch.stack([rows, cols], dim=1))
    losses = torch.nn.functional.cross_entropy(
        logits, batch.labels[rows, cols + 1], reduction="none"
    )
    in_list = batch.list_mask[rows, cols + 1]
    list_loss = losses[in_list].mean().item() if bool(in_list.any()) else None
    return losses.mean(), list_loss


@torch.no_grad()
def teacher_forced_exact_match(
    model: Any, encoder: Encoder, cases: Sequence[qt.TileCase], batch_size: int = 8
) -> dict[str, Any]:
    """Greedy exact match per question, computed in one forward per conversation.

    Greedy decoding reproduces an answer (and stops) iff every answer token and the closing
    ``<|im_end|>`` is the argmax given the gold prefix, which is what this checks.
    """
    model.eval()
    by_kind: dict[str, list[int]] = {}
    by_k: dict[int, list[int]] = {}
    by_kind_k: dict[str, list[int]] = {}
    for i in range(0, len(cases), batch_size):
        chunk = cases[i : i + batch_size]
        batch = encoder.encode(chunk)
        predicted = forward_logits(model, batch).argmax(-1)  # [B, T]
        for b, case in enumerate(chunk):
            for (start, end), turn in zip(batch.answer_spans[b], case.turns, strict=True):
                ok = bool(
                    (predicted[b, start - 1 : end - 1] == batch.input_ids[b, start:end]).all()
                )
                by_kind.setdefault(case.kind, []).append(int(ok))
                by_k.setdefault(case.k, []).append(int(ok))
                by_kind_k.setdefault(f"{case.kind} k{case.k}", []).append(int(ok))
                if turn.kind == "list_name":
                    name = f"list_name{len(turn.keys)} k{case.k}"
                    by_kind_k.setdefault(name, []).append(int(ok))
    model.train()
    everything = [x for v in by_kind.values() for x in v]
    return {
        "accuracy": sum(everything) / max(1, len(everything)),
        "questions": len(everything),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "by_k": {str(k): sum(v) / len(v) for k, v in sorted(by_k.items())},
        "by_kind_k": {k: [sum(v) / len(v), len(v)] for k, v in sorted(by_kind_k.items())},
    }


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    step: int = 0
    k_max: int = 2
    ema: float = 5.0
    final_reached_at: int | None = None
    steps_at_k_max: int = 0
    elapsed_s: float = 0.0
    list_ema: float | None = None
    log: list[dict[str, Any]] | None = None


def next_k_max(k_max: int, k_final: int) -> int:
    grown = k_max + 1 if k_max < 8 else max(k_max + 1, math.ceil(k_max * 1.25))
    return min(k_final, grown)


def sample_k(rng: random.Random, k_max: int) -> int:
    if rng.random() < 0.5:
        return k_max
    return rng.randint(2 if k_max <= 8 else 4, k_max)


def learning_rate(state: TrainState, args: argparse.Namespace) -> float:
    warm = min(1.0, (state.step + 1) / args.warmup_steps)
    if state.final_reached_at is None:
        return args.lr * warm
    progress = min(1.0, (state.step - state.final_reached_at) / max(1, args.anneal_steps))
    return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_size_for(k: int, args: argparse.Namespace) -> int:
    """Keep roughly ``--batch`` x 8 images per step at large K (CPU time per step bounded)."""
    return max(4, min(args.batch, args.batch * 8 // max(k, 1))) if k > 8 else args.batch


def build_init_dir(work_dir: Path) -> Path:
    spec = resolve_spec("tiny", **MODEL_OPTIONS)
    return build_from_spec(work_dir / "init", spec, extra_words=qt.TASK_WORDS)


def check_same_tokenizer(init_dir: Path, model_dir: Path) -> None:
    """``--init-from``: the exported model's tokenizer must be the one this script builds."""
    from transformers import AutoTokenizer

    built, exported = (AutoTokenizer.from_pretrained(d) for d in (init_dir, model_dir))
    if built.get_vocab() != exported.get_vocab():
        raise SystemExit(f"{model_dir}: its tokenizer differs from the one this script builds")


def make_model(init_dir: Path, seed: int, init_from: Path | None = None) -> Any:
    """A randomly initialised model, or ``init_from``'s weights (same architecture)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    if init_from is not None:
        check_same_tokenizer(init_dir, init_from)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        model.train()
        return model
    config = AutoConfig.from_pretrained(init_dir)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.train()
    return model


def save_checkpoint(path: Path, model: Any, optimizer: Any, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": vars(state)},
        tmp,
    )
    os.replace(tmp, path)


def export(model: Any, init_dir: Path, out: Path, info: dict[str, Any]) -> None:
    """Write the model directory: tokenizer/processor files of ``init_dir`` + trained weights."""
    out.mkdir(parents=True, exist_ok=True)
    for path in init_dir.iterdir():
        if path.is_file() and path.name not in EXPORT_SKIP:
            shutil.copy2(path, out / path.name)
    model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-time cap per run")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--init-from", type=Path, help="start from this exported model's weights (fine-tune)"
    )
    parser.add_argument("--lr", type=float, help="default 1e-3, or 3e-4 with --init-from")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--k-start", type=int, help="first K_max (default 2, --k-final with --init-from)"
    )
    parser.add_argument("--k-final", type=int, default=24)
    parser.add_argument("--ema-threshold", type=float, default=0.05)
    parser.add_argument(
        "--patience-steps",
        type=int,
        default=800,
        help="from K_max 8 on, grow after this many steps at one K_max if EMA < --patience-ema",
    )
    parser.add_argument("--patience-ema", type=float, default=0.15)
    parser.add_argument("--anneal-steps", type=int, default=1500)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--describe-prob", type=float, default=0.5)
    parser.add_argument("--pair-prob", type=float, default=0.5, help="of non-describe turns")
    parser.add_argument(
        "--list-prob", type=float, default=0.0, help="list_name share of multi-region turns"
    )
    parser.add_argument("--list-four-prob", type=float, default=0.5, help="lists of 4 (else 3)")
    parser.add_argument(
        "--pair-from-k", type=int, default=4, help="two-region questions once K_max reaches this"
    )
    parser.add_argument("--eval-ks", default="8,16,32,64", help="held-out K values at export")
    parser.add_argument("--eval-per-kind", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between quick evals")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--steps-only", type=int, default=0, help="time N steps, then exit")
    parser.add_argument(
        "--evaluate", type=Path, help="only evaluate this exported model on the held-out set"
    )
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 3e-4 if args.init_from else 1e-3
    if args.k_start is None:
        args.k_start = args.k_final if args.init_from else 2
    return args


def eval_kinds(args: argparse.Namespace) -> tuple[qt.CaseKind, ...]:
    """Held-out kinds: what the model learned, plus ``list_name`` when lists are trained."""
    return (*qt.LEARNED_KINDS, "list_name") if args.list_prob > 0 else qt.LEARNED_KINDS


def held_out_set(args: argparse.Namespace) -> list[qt.TileCase]:
    """The held-out questions of the export evaluation (``--eval-ks``, ``--eval-per-kind``)."""
    eval_ks = [int(k) for k in args.eval_ks.split(",")]
    return qt.make_question_set(ks=eval_ks, per_kind=args.eval_per_kind, kinds=eval_kinds(args))


def evaluate_exported(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out teacher-forced exact match of an exported model directory."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    encoder = Encoder(AutoTokenizer.from_pretrained(model_dir))
    return teacher_forced_exact_match(model, encoder, held_out_set(args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        print(json.dumps(evaluate_exported(args.evaluate, args)))
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work_dir / "checkpoint.pt"
    init_dir = build_init_dir(args.work_dir)

    from transformers import AutoTokenizer

    encoder = Encoder(AutoTokenizer.from_pretrained(init_dir))
    model = make_model(init_dir, args.seed, args.init_from)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05
    )
    state = TrainState(k_max=min(args.k_start, args.k_final), log=[])
    if ckpt_path.exists() and not args.fresh:
        saved = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
        print(f"resumed at step {state.step}, K_max {state.k_max}", file=sys.stderr)
    params = sum(p.numel() for p in model.parameters())
    quick_eval = qt.make_question_set(
        ks=(8, 16), per_kind=4, seed=2_000_000, kinds=eval_kinds(args)
    )

    started = time.monotonic()
    base_elapsed = state.elapsed_s
    last_ckpt = started
    done = state.final_reached_at is not None and (
        state.step - state.final_reached_at >= args.anneal_steps
    )
    bar = tqdm(initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    timed_steps = 0
    while not done:
        now = time.monotonic()
        state.elapsed_s = base_elapsed + (now - started)
        if now - started > args.max_minutes * 60:
            break
        rng = random.Random(f"tile-train:{args.seed}:{state.step}:{state.k_max}")
        k = sample_k(rng, state.k_max)
        cases = [
            qt.make_training_case(
                rng,
                k,
                max_turns=args.max_turns,
                describe_prob=args.describe_prob,
                pair_prob=args.pair_prob if state.k_max >= args.pair_from_k else 0.0,
                list_prob=args.list_prob,
                list_four_prob=args.list_four_prob,
            )
            for _ in range(batch_size_for(k, args))
        ]
        batch = encoder.encode(cases)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state, args)
        loss, list_loss = answer_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.step += 1
        value = loss.item()
        state.ema = value if state.ema >= 5.0 else 0.98 * state.ema + 0.02 * value
        if list_loss is not None:
            old = state.list_ema
            state.list_ema = list_loss if old is None else 0.98 * old + 0.02 * list_loss
        state.steps_at_k_max += 1
        patient = (
            state.k_max >= 8
            and state.steps_at_k_max >= args.patience_steps
            and state.ema < args.patience_ema
        )
        if (
            state.k_max == k
            and (state.ema < args.ema_threshold or patient)
            and state.final_reached_at is None
        ):
            state.steps_at_k_max = 0
            if state.k_max < args.k_final:
                state.k_max = next_k_max(state.k_max, args.k_final)
                state.ema = 5.0  # re-measure at the new length
                entry = {"step": state.step, "k_max": state.k_max}
            else:
                state.final_reached_at = state.step
                entry = {"step": state.step, "anneal_from": True}
            state.log.append({**entry, "minutes": round(state.elapsed_s / 60, 1)})
        if state.final_reached_at is not None:
            done = state.step - state.final_reached_at >= args.anneal_steps
        bar.update(1)
        list_ema = "-" if state.list_ema is None else f"{state.list_ema:.3f}"
        bar.set_postfix(
            k=k, k_max=state.k_max, loss=f"{value:.3f}", ema=f"{state.ema:.3f}", list=list_ema
        )
        if args.eval_every and state.step % args.eval_every == 0:
            result = teacher_forced_exact_match(model, encoder, quick_eval)
            state.log.append(
                {
                    "step": state.step,
                    "k_max": state.k_max,
                    "minutes": round(state.elapsed_s / 60, 1),
                    "ema": round(state.ema, 4),
                    "list_ema": None if state.list_ema is None else round(state.list_ema, 4),
                    "quick_eval": result["accuracy"],
                    "quick_eval_by_kind": result["by_kind"],
                }
            )
            tqdm.write(f"step {state.step} K_max {state.k_max} quick eval {result}")
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt_path, model, optimizer, state)
            last_ckpt = time.monotonic()
        timed_steps += 1
        if args.steps_only and timed_steps >= args.steps_only:
            bar.close()
            per_step = (time.monotonic() - started) / timed_steps
            print(f"{per_step:.3f} s/step at K {k}, batch {len(cases)}, {params} params")
            return 0
    bar.close()
    state.elapsed_s = base_elapsed + (time.monotonic() - started)
    save_checkpoint(ckpt_path, model, optimizer, state)

    result = teacher_forced_exact_match(model, encoder, held_out_set(args))
    info = {
        "done": done,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_options": MODEL_OPTIONS,
        "parameters": params,
        "steps": state.step,
        "k_max": state.k_max,
        "train_minutes": round(state.elapsed_s / 60, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "curriculum": state.log,
        "held_out_teacher_forced": result,
    }
    export(model, init_dir, args.out, info)
    print(json.dumps({k: info[k] for k in ("done", "steps", "k_max", "train_minutes")}))
    print(json.dumps(result))
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
