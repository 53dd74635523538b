"""`make demo-quality`: real questions answered with the full KV cache and with hybridkv at 10 %.

Serves the project's small trained Qwen2.5-VL (``bench/quality_model``, 1 M parameters, trained on
the "tile" task of ``hybridkv_sglang.testing.quality_task``) twice on this CPU, both servers at
once: stock SGLang with the full KV cache, and ``hybridkv-serve`` keeping ``--budget`` of each
prompt's KV. Every prompt shows K images, each holding one coloured square with a dark core; the
questions ask what is inside squares ("Describe the red square." -> "red navy"). Both servers
answer the same held-out questions greedily; the table shows each answer, whether it is right,
and what hybridkv kept and read of that request's prompt KV cache.

The first token of a reply comes from the prefill, over the full cache on both servers; the kinds
asked here need later tokens too ("navy" after the echoed "red"), decoded over the compressed
cache, so every hybridkv answer shows what compression left.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing import quality_task as qt
from hybridkv_sglang.testing.server import RunningServer, launch_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "bench" / "quality_model"
KINDS: tuple[qt.CaseKind, ...] = ("describe", "pair_name", "multi_turn")
"""Kinds whose answers need tokens decoded after the prefill (see quality_task's docstring)."""
FULL = "full cache"
SERVER_KWARGS: dict[str, Any] = {
    "max_total_tokens": 16384,  # room for a few dozen K = 32 conversations at once
    # SGLang's CPU vision attention masks every patch of a prefill batch at once (quadratic in
    # its images): batches of about two K = 32 prompts keep that cheap.
    "extra_args": ["--max-prefill-tokens", "1300"],
}


@dataclass(frozen=True)
class Reply:
    """One server's answer to one turn, and the request id its hybridkv record is under."""

    text: str
    rid: str


def pick_cases(questions: int, k: int, seed: int) -> list[qt.TileCase]:
    """Held-out cases of every kind in turn, cut so their turns add up to ``questions``."""
    per_kind = -(-questions // len(KINDS))
    by_kind = qt.make_question_set(seed, [k], per_kind, KINDS)
    groups = [by_kind[i * per_kind : (i + 1) * per_kind] for i in range(len(KINDS))]
    cases, left = [], questions
    for case in itertools.chain.from_iterable(zip(*groups, strict=True)):
        if left <= 0:
            break
        cases.append(replace(case, turns=case.turns[:left]))
        left -= len(cases[-1].turns)
    return cases


@contextlib.contextmanager
def start_together(
    configs: dict[str, HybridKVConfig | None], logs: Path
) -> Iterator[dict[str, RunningServer]]:
    """One CPU server per configuration, started concurrently (start-up is mostly waiting on
    imports and the model load, so two overlap well on two cores), yielded in ``configs``'s order
    whichever came up first; all stopped on exit."""
    managers = {
        name: launch_server(
            MODEL, hybridkv=config, log_path=logs / f"{name.split('@')[0]}.log", **SERVER_KWARGS
        )
        for name, config in configs.items()
    }
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(len(managers)) as pool:
            futures = {pool.submit(m.__enter__): name for name, m in managers.items()}
            servers: dict[str, RunningServer] = {}
            errors = []
            bar = tqdm(total=len(futures), desc="starting servers", unit="server", leave=False)
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                try:
                    servers[name] = future.result()
                    stack.push(managers[name].__exit__)
                except Exception as err:  # stop the other server before reporting
                    errors.append(err)
                bar.update()
            bar.close()
        if errors:
            raise errors[0]
        yield {name: servers[name] for name in configs}  # in the order asked, not the order up


def ask(base_url: str, messages: list[dict[str, Any]], max_new_tokens: int, tag: str) -> Reply:
    rid = f"{tag}-{uuid.uuid4().hex[:12]}"
    payload = {
        "model": "default",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_new_tokens,
        "rid": rid,
    }
    response = requests.post(f"{base_url}/v1/chat/completions", json=payload, timeout=600)
    response.raise_for_status()
    return Reply(response.json()["choices"][0]["message"]["content"] or "", rid)


def converse(
    base_url: str, case: qt.TileCase, images: Sequence[str], max_new_tokens: int, bar: tqdm
) -> list[Reply]:
    """Every turn of ``case`` in order; later turns carry this server's own earlier replies."""
    replies: list[Reply] = []
    for i in range(len(case.turns)):
        history = [r.text for r in replies]
        messages = qt.messages(case, images, answers=history, upto=i + 1)
        replies.append(ask(base_url, messages, max_new_tokens, f"{case.case_id}-t{i}"))
        bar.update()
    return replies


def mark(reply: str, right: bool) -> str:
    return f"{' '.join(reply.split()) or '(empty)'} {'✓' if right else '✗'}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def compression(record: dict[str, Any] | None) -> tuple[float, float] | None:
    """(kept, read): the share of a compressed request's prompt KV entries hybridkv kept
    resident, and the share of its prompt KV bytes a decode step reads (chunk index included);
    ``None`` if it was served dense (or left no record)."""
    if record is None or not record["compressed"]:
        return None
    return record["kept_entries"] / record["prompt_entries"], record["read_fraction"]


def table(
    cases: Sequence[qt.TileCase],
    replies: dict[str, list[list[Reply]]],
    records: dict[str, dict[str, Any]],
    compressed_name: str,
) -> str:
    """The side-by-side table, one row per question, then each column's accuracy and hybridkv's
    mean kept and read fractions."""
    header = ["kind", "question", "expected", *replies, "prompt", "kept", "read"]
    rows: list[list[str]] = []
    right = dict.fromkeys(replies, 0)
    fractions: list[tuple[float, float]] = []
    for n, case in enumerate(cases):
        for i, turn in enumerate(case.turns):
            kind = case.kind if len(case.turns) == 1 else f"{case.kind} {i + 1}/{len(case.turns)}"
            row = [kind, turn.question, turn.answer]
            for name, answers in replies.items():
                reply = answers[n][i].text
                ok = qt.is_correct(reply, [turn.answer])
                right[name] += ok
                row.append(mark(reply, ok))
            record = records.get(replies[compressed_name][n][i].rid)
            shares = compression(record)
            if shares is not None:
                fractions.append(shares)
                row += [str(record["prompt_tokens"]), *map(percent, shares)]
            elif record is not None:
                row += [str(record["prompt_tokens"]), f"dense: {record['dense_reason']}", "100 %"]
            else:
                row += ["-", "no record", "-"]
            rows.append(row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    rule = "-" * max(len(line) for line in lines)
    head = "  ".join(f"{c:<{w}}" for c, w in zip(header, widths, strict=True)).rstrip()
    summary = ", ".join(
        f"{name} {right[name]}/{len(rows)} ({right[name] / len(rows):.0%})" for name in replies
    )
    footer = [f"accuracy: {summary}"]
    if fractions:
        kept = sum(f[0] for f in fractions) / len(fractions)
        read = sum(f[1] for f in fractions) / len(fractions)
        footer.append(
            f"hybridkv compressed {len(fractions)}/{len(rows)} requests: kept {percent(kept)} of "
            f"their prompt KV entries and read {percent(read)} per decode step, on average"
        )
    return "\n".join([head, rule, *lines, rule, *footer])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8, help="how many questions to ask")
    parser.add_argument("--images", type=int, default=32, help="images per prompt (K)")
    parser.add_argument("--budget", type=float, default=0.1, help="hybridkv's KV budget")
    parser.add_argument("--seed", type=int, default=1_000_000, help="held-out question seed")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "quality-demo")
    args = parser.parse_args(argv)

    started = time.monotonic()
    cases = pick_cases(args.questions, args.images, args.seed)
    images = {case.case_id: [qt.png_data_url(im) for im in case.images()] for case in cases}
    compressed_name = f"hybridkv@{args.budget:.0%}"
    config = HybridKVConfig(budget=args.budget, **qt.TILE_MODEL_SETTINGS)
    configs = {FULL: None, compressed_name: config}
    print(f"model: {MODEL.relative_to(ROOT)} (Qwen2.5-VL trained on the tile task), on CPU")
    print(f"{FULL}: stock SGLang, the whole prompt's KV cache")
    print(
        f"{compressed_name}: hybridkv-serve keeping {args.budget:.0%} of the prompt's KV cache "
        f"(model settings {config.model_dump_json(include=set(qt.TILE_MODEL_SETTINGS))})"
    )
    with start_together(configs, args.work_dir / "logs") as servers:
        print(f"both servers up in {time.monotonic() - started:.0f} s; asking ...", flush=True)
        total = sum(len(c.turns) for c in cases) * len(servers)
        with (
            concurrent.futures.ThreadPoolExecutor(len(cases) * len(servers)) as pool,
            tqdm(total=total, desc="answers", unit="answer", leave=False) as bar,
        ):
            futures = {
                name: [
                    pool.submit(
                        converse, s.base_url, c, images[c.case_id], args.max_new_tokens, bar
                    )
                    for c in cases
                ]
                for name, s in servers.items()
            }
            replies = {name: [f.result() for f in fs] for name, fs in futures.items()}
        records = servers[compressed_name].hybridkv_stats()["requests"]
    print(f"\n{len(cases)} conversations, {args.images} images each, held-out seed {args.seed}")
    print("prompt: tokens; kept: share of the prompt's KV entries hybridkv keeps resident (always")
    print("attended); read: share a decode step reads, retrieved chunks included\n")
    print(table(cases, replies, records, compressed_name))
    print(f"\ntotal {time.monotonic() - started:.0f} s; server logs in {args.work_dir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
