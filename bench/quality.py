"""Answer quality under KV compression: exact-match accuracy, full cache vs hybridkv vs baselines.

For every configuration the harness starts a server (or uses ``--url``), sends each question of a
held-out set through ``/v1/chat/completions`` (greedy, with the reply's tokens), scores the reply
by exact match, and reads what hybridkv did to each request (fraction of the prompt KV read per
decode step) from ``GET /server_info``. Configurations:

* ``full``: the uncompressed reference, stock ``sglang.launch_server --attention-backend
  torch_native`` on CPU (``--full stock``, the default there) or ``hybridkv-serve`` with
  ``enabled=false`` (``--full disabled``; always on GPU);
* ``<policy>@<budget>`` for every ``--policies`` entry and every ``--budgets`` fraction, served by
  ``hybridkv-serve`` with ``HybridKVConfig(policy=, budget=, window=, sink=, chunk_size=,
  top_k_chunks=, min_prompt_tokens=, **--hybridkv-json)``. A policy is a name of the registry
  ``hybridkv_sglang.policy.POLICIES`` (``hybridkv`` and its baselines) or a variant of
  ``VARIANTS`` / ``--variant`` (a registered policy with more config fields, e.g.
  ``hybridkv_design`` = hybridkv with the design's text prior and fixed top-k).

Which tokens decide. hybridkv compresses a request at the end of its prefill forward, so the first
reply token of every turn is computed over the full cache and is the same in every configuration
(the harness checks it: ``first_token_agreement`` with the ``full`` row); every later token is
decoded over the compressed cache. The default tile set therefore only asks questions whose answer
needs a tile after the first token (the value after the echoed key of "Describe the <key>
square." -> "<key> <value>", the second value of "What is inside the <k1> and <k2> squares?" ->
"<v1> <v2>"), so every difference between two rows comes from compressed decode steps. Besides the
exact-match accuracy (with a 95 % Wilson interval) each row reports ``decode_token_accuracy``: the
share of the gold answer's tokens after its first that the reply reproduces at their position (the
gold answer tokenized by the model's tokenizer, the reply's tokens as the server returned them).
Rows at the same budget are compared question by question against each hybridkv row (McNemar's
exact test on the discordant questions, and the accuracy difference with a 95 % interval).

Default question set: the "tile" task (``hybridkv_sglang.testing.quality_task``) with the
committed model ``bench/quality_model`` (trained by ``bench/train_quality_model.py``): K = 16, 32
and 64 images of 16 visual tokens each (prompts of ~340 to ~1,200 tokens, 75-85 % visual), 20
conversations per kind and K of ``describe``, ``pair_name``, ``multi_turn`` (2-3 describe turns,
each about a new image) and ``multi_mixed`` (describe, pair_name, describe over four images): 240
conversations, 452 questions. ``min_prompt_tokens`` defaults to 128 so every prompt of the set is
compressed; ``window`` stays at the config default (32), which with this model's short questions
also covers the last image's 16 visual tokens; the rest are the committed model's settings
(``quality_task.TILE_MODEL_SETTINGS``: sink, chunk size, top-k, the chunk index and the dynamic
window share), the same for every row.
Each server answers a warm-up conversation, then its prefix cache is flushed (every configuration
starts from the same empty cache), then every conversation, ``--concurrency`` at a time (SGLang
batches them; greedy replies are the same as one at a time). Later turns hit the cached prefix of
the earlier ones; the last ``window`` tokens of every compressed prompt are prefilled again, so
each turn is observed over a whole window.

Dataset format (``--dataset FILE.jsonl``, one conversation per line)::

    {"id": "q1",                      # unique id (string)
     "images": ["img/a.png", "https://.../b.jpg", "data:image/png;base64,..."],
     "turns": [{"question": "What is inside the red square?", "answer": "navy"},
               {"question": "And the blue one?", "answer": ["teal", "dark teal"]}],
     "kind": "single",                # optional label; accuracy is also reported per kind
     "max_new_tokens": 8,             # optional, overrides --max-new-tokens
     "meta": {...}}                   # optional, ignored ("meta.k" is reported as K if present)

Image paths are relative to the JSONL file; every image is sent inline as a data URL (URLs as
given). Images go, in order, at the start of the first user turn, unless that turn's question
contains ``<image>`` placeholders (one per image), which place them. ``"question"``/``"answer"`` at
the top level is shorthand for one turn. Every turn is scored: the reply and the answer(s) are
lower-cased, stripped of surrounding whitespace, quotes and a trailing full stop, and whitespace is
collapsed; ``--match exact`` (default) needs equality, ``--match prefix`` accepts a reply that
starts with an answer followed by a word boundary (for models that explain after answering).
Later turns carry the model's own earlier replies as history.

Run::

    python bench/quality.py                       # defaults: CPU, committed model, tile set
    python bench/quality.py --out bench/results/quality   # the same, refreshing committed results
    python bench/quality.py --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda \\
        --dataset my_set.jsonl --max-new-tokens 16 --match prefix
    python bench/quality.py --url http://127.0.0.1:30000 --label hybridkv@0.1 --dataset ...

Writes ``<out>.json`` (machine, arguments, dataset summary, one row per configuration, the paired
comparisons) and ``<out>.png`` (accuracy with its 95 % interval against the budget and against the
measured read fraction, one line per policy), and prints both tables. ``--out`` defaults to
``.cache/quality`` (git-ignored), so a trial run never overwrites the committed results; refresh
those with ``--out bench/results/quality`` (or ``bench/results/quality.json``: the suffix is
replaced).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import math
import mimetypes
import os
import platform
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.policy import POLICIES as POLICY_REGISTRY
from hybridkv_sglang.policy.plan import OVER_BUDGET_SLACK
from hybridkv_sglang.testing.quality_task import TILE_MODEL_SETTINGS, is_correct
from hybridkv_sglang.testing.server import (
    NO_CUDA_GRAPHS,
    free_port,
    launch_server,
    serve_command,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "bench" / "quality_model"
POLICIES: tuple[str, ...] = tuple(POLICY_REGISTRY)
"""Every registered policy (``hybridkv`` and the baselines run by the same machinery)."""
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hybridkv_design": ("hybridkv", {"static_priority": "text", "dynamic_top_k": "fixed"}),
}
"""Named variants: label -> (registered policy, extra HybridKVConfig fields). ``hybridkv_design``
is hybridkv with DESIGN §2's stage-3 rules (text prior, fixed top-k) instead of the defaults."""
DEFAULT_POLICIES: tuple[str, ...] = tuple(
    name for name, cls in POLICY_REGISTRY.items() if cls.benchmarked
)
"""The default run's rows: every policy whose class says ``benchmarked`` (not ``lookm``, which
needs compact storage; ``hybridkv_design`` and lookm with ``--policies``)."""
IMAGE_PLACEHOLDER = "<image>"
REQUEST_TIMEOUT_S = 600
Z95 = 1.959964
"""Two-sided 95 % normal quantile."""

# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class EvalTurn:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class EvalCase:
    """One conversation: images (data or http URLs) in the first user turn, scored turns."""

    case_id: str
    kind: str
    images: tuple[str, ...]
    turns: tuple[EvalTurn, ...]
    max_new_tokens: int | None = None
    k: int | None = None


def _image_url(entry: str, base_dir: Path) -> str:
    if entry.startswith(("data:", "http://", "https://")):
        return entry
    path = Path(entry) if Path(entry).is_absolute() else base_dir / entry
    if not path.is_file():
        raise ValueError(f"image {entry!r} not found (looked at {path})")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def case_from_record(record: dict[str, Any], base_dir: Path = Path(".")) -> EvalCase:
    """Parse one JSONL record (format in the module docstring); errors name the field."""
    if "id" not in record:
        raise ValueError(f"record has no 'id': {str(record)[:200]}")
    case_id = str(record["id"])
    if "turns" in record:
        raw_turns = record["turns"]
    elif "question" in record and "answer" in record:
        raw_turns = [{"question": record["question"], "answer": record["answer"]}]
    else:
        raise ValueError(f"record {case_id!r}: expected 'turns' or 'question' + 'answer'")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise ValueError(f"record {case_id!r}: 'turns' must be a non-empty list")
    turns = []
    for i, turn in enumerate(raw_turns):
        answer = turn.get("answer")
        answers = (answer,) if isinstance(answer, str) else tuple(answer or ())
        if "question" not in turn or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(
                f"record {case_id!r} turn {i}: expected a 'question' and an 'answer' (a string "
                f"or a list of strings), got {str(turn)[:200]}"
            )
        turns.append(EvalTurn(str(turn["question"]), answers))
    images = tuple(_image_url(str(x), base_dir) for x in record.get("images", []))
    placeholders = turns[0].question.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise ValueError(
            f"record {case_id!r}: {placeholders} {IMAGE_PLACEHOLDER} placeholders in the first "
            f"question but {len(images)} images (give one placeholder per image, or none)"
        )
    meta = record.get("meta") or {}
    max_new = record.get("max_new_tokens")
    return EvalCase(
        case_id,
        str(record.get("kind", "default")),
        images,
        tuple(turns),
        None if max_new is None else int(max_new),
        meta.get("k", len(images)),
    )


def load_jsonl(path: str | Path) -> list[EvalCase]:
    path = Path(path)
    cases = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                cases.append(case_from_record(json.loads(line), path.parent))
            except (ValueError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{line_no}: {err}") from None
    ids = Counter(c.case_id for c in cases)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise ValueError(f"{path}: duplicate ids {duplicated[:5]}")
    return cases


def tile_cases(
    seed: int, ks: Sequence[int], per_kind: int, kinds: Sequence[str] | None = None
) -> list[EvalCase]:
    """The default set: the tile task's held-out cases, images as PNG data URLs."""
    from hybridkv_sglang.testing import quality_task as qt

    chosen = tuple(kinds) if kinds else qt.EVAL_KINDS
    unknown = sorted(set(chosen) - set(qt.CASE_KINDS))
    if unknown:
        raise ValueError(f"--kinds: expected names from {qt.CASE_KINDS}, got {unknown}")
    cases = qt.make_question_set(seed, ks, per_kind, kinds=chosen)  # type: ignore[arg-type]
    return [case_from_record(case.to_record()) for case in cases]


def message_list(case: EvalCase, replies: Sequence[str], upto: int) -> list[dict[str, Any]]:
    """OpenAI chat messages for turns ``[0, upto)``; earlier turns answered by ``replies``."""
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(case.turns[:upto]):
        if i == 0:
            content: list[dict[str, Any]] = []
            pieces = turn.question.split(IMAGE_PLACEHOLDER)
            if len(pieces) == 1:  # no placeholders: images first
                content += [_image_part(u) for u in case.images]
                content.append({"type": "text", "text": turn.question})
            else:
                for j, piece in enumerate(pieces):
                    if piece:
                        content.append({"type": "text", "text": piece})
                    if j < len(case.images):
                        content.append(_image_part(case.images[j]))
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "user", "content": turn.question})
        if i < upto - 1:
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------------------------
# Scoring


def decode_token_matches(reply_tokens: Sequence[str], gold_tokens: Sequence[str]) -> int:
    """How many gold tokens after the first the reply has at the same position (the first token
    comes from the dense prefill forward; the others from compressed decode steps)."""
    return sum(
        1
        for i in range(1, len(gold_tokens))
        if i < len(reply_tokens) and reply_tokens[i] == gold_tokens[i]
    )


class GoldTokenizer:
    """Gold answers as the model's tokens (text pieces, as the server returns reply tokens)."""

    def __init__(self, model: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(model))
        self._lock = threading.Lock()
        self._pieces: dict[str, tuple[str, ...]] = {}

    def pieces(self, answer: str) -> tuple[str, ...]:
        with self._lock:
            if answer not in self._pieces:
                ids = self._tokenizer.encode(answer, add_special_tokens=False)
                self._pieces[answer] = tuple(self._tokenizer.decode([i]) for i in ids)
            return self._pieces[answer]


# ---------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound near 0 and 1, unlike Wald's)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1 (rounding would leave 1e-16 off).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return (low, 1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs ~ Binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """Accuracy of ``a`` minus ``b`` on the same questions: difference, 95 % interval (normal
    approximation of the paired difference), discordant counts and McNemar's exact p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"expected two equally long non-empty lists, got {len(a)} and {len(b)}")
    n = len(a)
    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    difference = (a_only - b_only) / n
    se = math.sqrt(max(0.0, a_only + b_only - (a_only - b_only) ** 2 / n)) / n
    return {
        "questions": n,
        "a_only": a_only,
        "b_only": b_only,
        "difference": round(difference, 4),
        "ci95": [round(difference - z * se, 4), round(difference + z * se, 4)],
        "p_mcnemar": round(mcnemar_exact_p(a_only, b_only), 4),
    }


def read_fraction_gap(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Largest per-question difference of the measured read fractions of two rows (``None``
    when either row lacks them): equal budgets must hold request by request, not on average."""
    pairs = [
        (x, y)
        for x, y in zip(a.get("read_fractions") or [], b.get("read_fractions") or [], strict=False)
        if x is not None and y is not None
    ]
    return round(max(abs(x - y) for x, y in pairs), 4) if pairs else None


def paired_comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each hybridkv row (method ``hybridkv``, any variant) against every other compressed row at
    its budget, on the same questions (``correct_bits``)."""
    out = []
    for ours in rows:
        if ours["method"] != "hybridkv":
            continue
        for other in rows:
            if other is ours or other["budget"] != ours["budget"] or other["method"] == "full":
                continue
            if other["method"] == "hybridkv" and other["config"] < ours["config"]:
                continue  # each hybridkv pair once
            bits_a = [c == "1" for c in ours["correct_bits"]]
            bits_b = [c == "1" for c in other["correct_bits"]]
            out.append(
                {
                    "a": ours["config"],
                    "b": other["config"],
                    "budget": ours["budget"],
                    "a_read_bytes_fraction": ours["mean_read_bytes_fraction"],
                    "b_read_bytes_fraction": other["mean_read_bytes_fraction"],
                    "max_read_fraction_gap": read_fraction_gap(ours, other),
                    **paired_difference(bits_a, bits_b),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# Configurations and servers


@dataclass(frozen=True)
class EvalConfig:
    """One row of the comparison: ``hybridkv=None`` is the stock server. ``policy`` is the row's
    line in the plot (a registered name or a variant label), ``method`` the registered policy."""

    name: str
    policy: str
    method: str
    budget: float | None
    hybridkv: HybridKVConfig | None


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``LABEL=POLICY:JSON`` (``hybridkv_fixed=hybridkv:{"dynamic_top_k": "fixed"}``)."""
    label, sep, rest = text.partition("=")
    policy, _, fields = rest.partition(":")
    if not sep or not label or policy not in POLICIES:
        raise ValueError(
            f"--variant: expected LABEL=POLICY:JSON with POLICY from {POLICIES}, got {text!r}"
        )
    extra = json.loads(fields) if fields else {}
    if not isinstance(extra, dict):
        raise ValueError(
            f"--variant {label}: expected a JSON object of config fields, got {fields}"
        )
    return label, (policy, extra)


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields of every row: the committed model's settings (``TILE_MODEL_SETTINGS``) when
    it is the model served, else the config defaults; ``--sink``, ``--chunk-size`` and
    ``--top-k-chunks`` override them."""
    committed = Path(args.model).resolve() == DEFAULT_MODEL.resolve()
    settings: dict[str, Any] = dict(TILE_MODEL_SETTINGS) if committed else {}
    flags = {"sink": args.sink, "chunk_size": args.chunk_size, "top_k_chunks": args.top_k_chunks}
    settings.update({name: value for name, value in flags.items() if value is not None})
    return settings


def build_configs(args: argparse.Namespace) -> list[EvalConfig]:
    extra = json.loads(args.hybridkv_json) if args.hybridkv_json else {}
    common = {
        "window": args.window,
        **model_settings(args),
        "min_prompt_tokens": args.min_prompt_tokens,
        "dense_below_crossover": False,  # answers of the compressed cache at every batch size
        **extra,
    }
    variants = {**VARIANTS, **dict(parse_variant(v) for v in args.variant)}
    configs = []
    if args.full != "none":
        stock = args.full == "stock" and args.device == "cpu"
        full = None if stock else HybridKVConfig(enabled=False, **common)
        configs.append(EvalConfig("full", "full", "full", 1.0, full))
    for label in args.policies:
        if label in POLICIES:  # a policy that merges KV needs the storage that can hold it
            policy = label
            fields = {"storage": "compact"} if POLICY_REGISTRY[label].merges_evicted else {}
        elif label in variants:
            policy, fields = variants[label]
        else:
            raise ValueError(
                f"--policies: expected names from {POLICIES} or variants {sorted(variants)}, "
                f"got {label!r}"
            )
        for budget in args.budgets:
            config = HybridKVConfig(**{**common, **fields, "policy": policy, "budget": budget})
            configs.append(EvalConfig(f"{label}@{budget:g}", label, policy, budget, config))
    return configs


@contextlib.contextmanager
def serve(config: EvalConfig, args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    """Start the configuration's server; yields its base URL."""
    if args.device == "cpu":
        with launch_server(
            args.model,
            hybridkv=config.hybridkv,
            log_path=log_path,
            max_total_tokens=args.max_total_tokens,
            context_length=args.context_length,
            max_running_requests=args.concurrency * 2,
            extra_args=["--max-prefill-tokens", str(args.max_prefill_tokens), *args.server_args],
        ) as server:
            yield server.base_url
        return
    with _serve_gpu(config, args, log_path) as server:
        yield server.base_url


@contextlib.contextmanager
def _serve_gpu(config: EvalConfig, args: argparse.Namespace, log_path: Path) -> Iterator[Any]:
    """``hybridkv-serve`` on CUDA with SGLang's defaults plus ``--server-args``."""
    port = free_port()
    assert config.hybridkv is not None  # on GPU "full" is hybridkv with enabled=false
    command = [
        sys.executable, "-m", "hybridkv_sglang.cli",
        "--model-path", str(args.model),
        "--host", "127.0.0.1", "--port", str(port),
        *NO_CUDA_GRAPHS,
        *args.server_args,
    ]  # fmt: skip
    env = {**os.environ, ENV_VAR: config.hybridkv.to_env()}
    with serve_command(command, port, log_path, env, timeout_s=1800) as server:
        yield server


class ServerPipeline:
    """Starts servers ahead of use (``ahead`` beyond the ``parallel`` being evaluated), so SGLang's
    start-up (a minute or more on a busy CPU) overlaps the previous configurations' questions.
    Thread-safe: configurations evaluated in parallel share one pipeline."""

    def __init__(self, args: argparse.Namespace, ahead: int, parallel: int = 1) -> None:
        self.args = args
        self.ahead = ahead
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, ahead + parallel))
        self.servers: dict[str, tuple[Any, concurrent.futures.Future]] = {}
        self._closed: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> ServerPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in list(self.servers):
            self._close(name)
        self.executor.shutdown(wait=True)

    def prepare(self, configs: Sequence[EvalConfig]) -> None:
        with self._lock:
            for config in configs:
                if config.name not in self.servers and config.name not in self._closed:
                    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", config.name)
                    manager = serve(config, self.args, self.args.log_dir / f"{tag}.log")
                    self.servers[config.name] = (manager, self.executor.submit(manager.__enter__))

    def wait(self, config: EvalConfig) -> tuple[str, float]:
        """The server's URL once it answers, and how long this call waited for it."""
        started = time.perf_counter()
        with self._lock:
            future = self.servers[config.name][1]
        url = future.result()
        return url, time.perf_counter() - started

    def stop(self, config: EvalConfig) -> None:
        self._close(config.name)

    def _close(self, name: str) -> None:
        with self._lock:
            manager, future = self.servers.pop(name)
            self._closed.add(name)
        try:
            future.result()
        except Exception:  # start-up failed: nothing to stop (the error surfaced in wait())
            return
        manager.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# Running one configuration


@dataclass
class TurnResult:
    case_id: str
    kind: str
    k: int | None
    turn: int
    rid: str
    reply: str
    tokens: tuple[str, ...]  # the reply's tokens as text pieces (empty if the server gave none)
    answers: tuple[str, ...]
    correct: bool
    decode_tokens: int  # gold answer tokens after the first (decoded over the compressed cache)
    decode_tokens_correct: int
    prompt_tokens: int | None
    stats: dict[str, Any] | None = None


@dataclass
class StatsCollector:
    """Reads hybridkv's per-request records from /server_info before they age out (256 kept)."""

    base_url: str
    every: int = 48
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    available: bool = True
    _since: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def completed(self) -> None:
        with self._lock:
            self._since += 1
            if self._since >= self.every:
                self._since = 0
                self.fetch()

    def fetch(self) -> None:
        if not self.available:
            return
        try:
            response = requests.get(f"{self.base_url}/server_info", timeout=120)
            response.raise_for_status()
            states = response.json().get("internal_states") or [{}]
            snapshot = states[0].get("hybridkv")
        except (requests.RequestException, ValueError):
            snapshot = None
        if snapshot is None:  # not a hybridkv server (stock, or a remote one)
            self.available = False
            return
        self.records.update(snapshot.get("requests", {}))


def chat(
    base_url: str, messages: list[dict[str, Any]], max_new_tokens: int, rid: str, **extra: Any
) -> Any:
    """One greedy chat completion with its tokens' logprobs (``extra``: more request fields)."""
    payload = {
        "model": "default",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_new_tokens,
        "logprobs": True,
        "rid": rid,
        **extra,
    }
    response = requests.post(
        f"{base_url}/v1/chat/completions", json=payload, timeout=REQUEST_TIMEOUT_S
    )
    if response.status_code != 200:
        raise RuntimeError(f"server answered {response.status_code}: {response.text[:500]}")
    return response.json()


def reply_tokens(choice: dict[str, Any]) -> tuple[str, ...]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return tuple(entry["token"] for entry in content)


def run_case(
    base_url: str,
    case: EvalCase,
    args: argparse.Namespace,
    tag: str,
    collector: StatsCollector,
    gold: GoldTokenizer,
) -> list[TurnResult]:
    replies: list[str] = []
    results = []
    max_new = case.max_new_tokens or args.max_new_tokens
    for i, turn in enumerate(case.turns):
        rid = f"{tag}-{case.case_id}-t{i}-{uuid.uuid4().hex[:8]}"
        body = chat(base_url, message_list(case, replies, i + 1), max_new, rid)
        choice = body["choices"][0]
        reply = choice["message"]["content"] or ""
        replies.append(reply)
        tokens = reply_tokens(choice)
        gold_tokens = gold.pieces(turn.answers[0])
        usage = body.get("usage") or {}
        results.append(
            TurnResult(
                case.case_id,
                case.kind,
                case.k,
                i,
                rid,
                reply,
                tokens,
                turn.answers,
                is_correct(reply, turn.answers, args.match),
                max(0, len(gold_tokens) - 1),
                decode_token_matches(tokens, gold_tokens),
                usage.get("prompt_tokens"),
            )
        )
        collector.completed()
    return results


def flush_cache(base_url: str) -> bool:
    """Empty the server's prefix cache (after the warm-up), so no measured prompt is a repeat."""
    with contextlib.suppress(requests.RequestException):
        return requests.post(f"{base_url}/flush_cache", timeout=120).status_code == 200
    return False


def run_config(
    base_url: str,
    cases: Sequence[EvalCase],
    args: argparse.Namespace,
    tag: str,
    gold: GoldTokenizer,
    position: int = 1,
) -> tuple[list[TurnResult], float, bool]:
    """All cases through one server, ``--concurrency`` at a time: per-turn results in case order,
    wall time (after one warm-up case and a cache flush) and whether hybridkv stats came back."""
    collector = StatsCollector(base_url)
    run_case(base_url, cases[0], args, f"{tag}-warmup", collector, gold)
    if not flush_cache(base_url):
        tqdm.write(f"{tag}: could not flush the prefix cache; {cases[0].case_id} is a repeat")
    started = time.perf_counter()
    results: list[TurnResult] = []
    questions = sum(len(c.turns) for c in cases)
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool,
        tqdm(
            total=questions, desc=tag, unit="q", leave=False, position=position, dynamic_ncols=True
        ) as bar,
    ):
        futures = [pool.submit(run_case, base_url, c, args, tag, collector, gold) for c in cases]
        for future in concurrent.futures.as_completed(futures):
            case_results = future.result()
            results.extend(case_results)
            bar.update(len(case_results))
    seconds = time.perf_counter() - started
    collector.fetch()
    for result in results:
        result.stats = collector.records.get(result.rid)
    order = {c.case_id: n for n, c in enumerate(cases)}
    results.sort(key=lambda r: (order[r.case_id], r.turn))
    return results, seconds, collector.available


def first_token_agreement(
    results: Sequence[TurnResult], reference: Sequence[TurnResult]
) -> tuple[float | None, int]:
    """Share of turns whose first reply token equals the reference's, over the turns whose
    prompt is the reference's (every earlier reply of the conversation the same); and their
    count. The first token comes from the dense prefill forward, so this should be 1."""
    same_history: dict[str, bool] = {}
    agree = compared = 0
    for ours, ref in zip(results, reference, strict=True):
        assert (ours.case_id, ours.turn) == (ref.case_id, ref.turn)
        if ours.turn == 0:
            same_history[ours.case_id] = True
        if same_history[ours.case_id] and ours.tokens and ref.tokens:
            compared += 1
            agree += ours.tokens[0] == ref.tokens[0]
        same_history[ours.case_id] &= ours.reply == ref.reply
    return (round(agree / compared, 4) if compared else None), compared


BYTE_FIGURES = {
    "read_fraction": 1.0,
    "index_fraction": 0.0,
    "device_fraction_compact": 1.0,
    "read_entries_fraction": 1.0,
}
"""Per-request figures each row averages (fractions of the dense prompt KV, bytes unless named
entries), with their value for a request served dense."""


def _per_question(
    config: EvalConfig, results: Sequence[TurnResult], has_stats: bool, key: str
) -> list[float | None]:
    """One figure of every question's request: from the server's records when it keeps them
    (a dense record reads everything), the dense value for a stock or disabled server, ``None``
    where unknown. ``device_fraction_compact`` is what the plan would hold on the device in
    compact storage, whichever storage served it."""
    dense = BYTE_FIGURES[key]
    if not has_stats:
        served_dense = config.hybridkv is None or not config.hybridkv.enabled
        return [dense if served_dense else None for _ in results]
    out: list[float | None] = []
    for r in results:
        if r.stats is None:
            out.append(None)
        elif not r.stats["compressed"]:
            out.append(dense)
        elif key in r.stats:
            out.append(r.stats[key])
        else:
            out.append(r.stats["extra"].get(key))
    return out


BYTE_ROW_KEYS = (
    "mean_read_bytes_fraction",
    "max_read_bytes_fraction",
    "mean_metadata_bytes_fraction",
    "mean_device_bytes_fraction",
    "mean_read_entries_fraction",
)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 4) if known else None


def summarize(
    config: EvalConfig, results: Sequence[TurnResult], seconds: float, has_stats: bool
) -> dict[str, Any]:
    def accuracy_by(key: Any) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for r in results:
            groups.setdefault(str(key(r)), []).append(r.correct)
        return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}

    stats = [r.stats for r in results if r.stats is not None]
    per_question = {key: _per_question(config, results, has_stats, key) for key in BYTE_FIGURES}
    read = [f for f in per_question["read_fraction"] if f is not None]
    over = None
    if config.budget is not None and read:
        over = sum(f > config.budget + OVER_BUDGET_SLACK for f in read)
    reasons = Counter(s.get("dense_reason") or "compressed" for s in stats)
    correct = sum(r.correct for r in results)
    decode_total = sum(r.decode_tokens for r in results)
    decode_ok = sum(r.decode_tokens_correct for r in results)
    prompt_tokens = [r.prompt_tokens for r in results if r.prompt_tokens]
    low, high = wilson_interval(correct, len(results))
    return {
        "config": config.name,
        "policy": config.policy,
        "method": config.method,
        "budget": config.budget,
        "hybridkv": None if config.hybridkv is None else config.hybridkv.model_dump(),
        "accuracy": round(correct / len(results), 4),
        "ci95": [round(low, 4), round(high, 4)],
        "correct": correct,
        "questions": len(results),
        "decode_token_accuracy": round(decode_ok / decode_total, 4) if decode_total else None,
        "decode_tokens": decode_total,
        "mean_read_bytes_fraction": _mean(per_question["read_fraction"]),
        "max_read_bytes_fraction": round(max(read), 4) if read else None,
        "mean_metadata_bytes_fraction": _mean(per_question["index_fraction"]),
        "mean_device_bytes_fraction": _mean(per_question["device_fraction_compact"]),
        "mean_read_entries_fraction": _mean(per_question["read_entries_fraction"]),
        "over_budget_requests": over,
        "read_fractions": [
            None if f is None else round(f, 4) for f in per_question["read_fraction"]
        ],
        "requests_with_stats": len(stats) if has_stats else None,
        "compression_outcomes": dict(reasons) if has_stats else None,
        "accuracy_by_kind": accuracy_by(lambda r: r.kind),
        "accuracy_by_k": accuracy_by(lambda r: r.k),
        "accuracy_by_turn": accuracy_by(lambda r: r.turn),
        "mean_prompt_tokens": round(statistics.mean(prompt_tokens), 1) if prompt_tokens else None,
        "seconds": round(seconds, 1),
        "correct_bits": "".join("1" if r.correct else "0" for r in results),
        "wrong_examples": [
            {"id": r.case_id, "turn": r.turn, "reply": r.reply, "answer": r.answers[0]}
            for r in results
            if not r.correct
        ][:10],
    }


# ---------------------------------------------------------------------------------------------
# Output


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'config':<18} {'budget':>6} {'accuracy':>8} {'95% interval':>14} {'read B':>6} "
        f"{'max B':>6} {'index':>6} {'over':>4} {'decode tok':>10} {'questions':>9}",
        "-" * 99,
    ]
    for row in rows:
        budget = "-" if row["budget"] is None else f"{row['budget']:.0%}"
        read, most, index = (
            "-" if row.get(key) is None else f"{row[key]:.3f}"
            for key in (
                "mean_read_bytes_fraction",
                "max_read_bytes_fraction",
                "mean_metadata_bytes_fraction",
            )
        )
        low, high = row["ci95"]
        token = row.get("decode_token_accuracy")
        over = row.get("over_budget_requests")
        lines.append(
            f"{row['config']:<18} {budget:>6} {row['accuracy']:>8.1%} "
            f"{f'{low:.1%}-{high:.1%}':>14} {read:>6} {most:>6} {index:>6} "
            f"{'-' if over is None else over:>4} "
            f"{'-' if token is None else f'{token:.1%}':>10} {row['questions']:>9}"
        )
    return "\n".join(lines)


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'a':<18} {'b':<18} {'a - b':>7} {'95% interval':>16} {'a only':>6} {'b only':>6} "
        f"{'McNemar p':>9} {'read gap':>8}",
        "-" * 95,
    ]
    for c in comparisons:
        low, high = c["ci95"]
        gap = c.get("max_read_fraction_gap")
        lines.append(
            f"{c['a']:<18} {c['b']:<18} {c['difference']:>+7.1%} "
            f"{f'{low:+.1%} {high:+.1%}':>16} {c['a_only']:>6} {c['b_only']:>6} "
            f"{c['p_mcnemar']:>9.3g} {'-' if gap is None else f'{gap:.3f}':>8}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (95 % interval bars) against the budget and against the measured bytes read per
    decode step (a fraction of the dense prompt KV bytes, chunk indexes included), one line per
    policy; the full cache as a dashed line and band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    full = [r for r in rows if r["policy"] == "full"]
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != "full"]
    for ax, x_key, x_label in (
        (axes[0], "budget", "budget (fraction of the prompt KV bytes)"),
        (
            axes[1],
            "mean_read_bytes_fraction",
            "measured prompt KV bytes read per decode step (index included)",
        ),
    ):
        for n, policy in enumerate(policies):
            points = sorted(
                (r[x_key], r["accuracy"], *r["ci95"])
                for r in rows
                if r["policy"] == policy and r[x_key] is not None
            )
            if not points:
                continue
            # Spread the policies a little along x at equal budgets so the bars do not overlap.
            shift = 1.0 + 0.012 * (n - (len(policies) - 1) / 2) if x_key == "budget" else 1.0
            xs = [p[0] * shift for p in points]
            ys = [p[1] for p in points]
            yerr = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            color = plt.cm.tab20(n % 20)  # more policies than the default 10 colours
            ax.errorbar(
                xs, ys, yerr=yerr, marker="o", markersize=4, capsize=3, label=policy, color=color
            )
        for r in full:
            ax.axhline(r["accuracy"], color="black", linestyle="--", label="full cache")
            ax.axhspan(*r["ci95"], color="black", alpha=0.08)
        ax.set_xscale("log")
        # The nominal budgets on both axes: measured fractions cluster around them.
        ticks = sorted({r["budget"] for r in rows if r["budget"] is not None} - {1.0})
        if len(ticks) > 6:
            ticks = [0.02, 0.05, 0.1, 0.2, 0.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel(x_label)
        ax.set_ylabel("exact-match accuracy (95 % Wilson interval)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dataset_summary(cases: Sequence[EvalCase]) -> dict[str, Any]:
    return {
        "cases": len(cases),
        "questions": sum(len(c.turns) for c in cases),
        "kinds": dict(Counter(c.kind for c in cases)),
        "images_per_case": dict(sorted(Counter(len(c.images) for c in cases).items())),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Exact-match accuracy: full cache vs hybridkv vs baselines at KV budgets."
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint path or hub id")
    parser.add_argument("--dataset", type=Path, help="JSONL question set (default: tile task)")
    parser.add_argument("--ks", type=_ints, default=[16, 32, 64], help="tile set: images/prompt")
    parser.add_argument("--per-kind", type=int, default=20, help="tile set: cases per kind and K")
    parser.add_argument("--seed", type=int, default=1_000_000, help="tile set seed (held out)")
    parser.add_argument(
        "--kinds",
        type=_names,
        default=None,
        help="tile set: question kinds (default describe,pair_name,multi_turn,multi_mixed; also "
        "single, pair_same)",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N cases")
    parser.add_argument("--budgets", type=_floats, default=[0.1, 0.2])
    parser.add_argument(
        "--policies",
        type=_names,
        default=list(DEFAULT_POLICIES),
        help=f"comma-separated, from {','.join(POLICIES)} or a variant ({','.join(VARIANTS)}, "
        "--variant); empty: full only",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='LABEL=POLICY:JSON, a policy with more config fields (hybridkv_x=hybridkv:{"w": 1})',
    )
    parser.add_argument(
        "--full",
        choices=("stock", "disabled", "none"),
        default="stock",
        help="reference: stock torch_native server (CPU), hybridkv enabled=false, or none",
    )
    parser.add_argument("--window", type=int, default=HybridKVConfig().window)
    for flag in ("--sink", "--chunk-size", "--top-k-chunks"):
        parser.add_argument(
            flag,
            type=int,
            help="every row (default: the committed model's setting, see "
            "quality_task.TILE_MODEL_SETTINGS, or the config default for other models)",
        )
    parser.add_argument("--min-prompt-tokens", type=int, default=128)
    parser.add_argument("--hybridkv-json", help="more HybridKVConfig fields for every row, JSON")
    parser.add_argument("--match", choices=("exact", "prefix"), default="exact")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-total-tokens", type=int, default=65536, help="CPU servers")
    parser.add_argument("--context-length", type=int, default=4096, help="CPU servers")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=1300,
        help="CPU servers: new tokens per prefill batch. SGLang's CPU vision attention masks all "
        "patches of a batch at once (quadratic in its images); 1300 holds one K=64 prompt",
    )
    parser.add_argument(
        "--server-args", default="", help="extra SGLang flags, one string (e.g. '--tp 2')"
    )
    parser.add_argument(
        "--prestart",
        type=int,
        default=1,
        help="servers started ahead of the one in use (0: one at a time; each ~2 GB on CPU)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="configurations evaluated at once (a CPU server's scheduler uses one core)",
    )
    parser.add_argument("--url", help="evaluate this running server instead of starting any")
    parser.add_argument("--label", default="served", help="with --url: the row's config name")
    parser.add_argument("--label-budget", type=float, help="with --url: the row's budget")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / ".cache" / "quality",
        help="writes OUT.json and OUT.png (committed results: bench/results/quality)",
    )
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "quality-logs")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw --out .png from its .json, run nothing"
    )
    parser.add_argument(
        "--add-to",
        type=Path,
        help="results JSON of an earlier run on the same questions: this run's rows join (or "
        "replace, by name) its rows and the file is rewritten (use with --full none)",
    )
    parser.add_argument(
        "--join",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="run nothing: add the rows of these results or .partial.json files (written after "
        "each row of a run, so a run stopped early keeps what it finished) to --add-to; a "
        "row in a later file replaces the same row of an earlier one",
    )
    args = parser.parse_args(argv)
    if args.join and not args.add_to:
        parser.error("--join needs --add-to: the results file the rows join")
    args.server_args = args.server_args.split()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        title = f"{Path(saved['model']).name}: {saved['dataset']['source']}"
        plot(saved["rows"], args.out.with_suffix(".png"), title)
        print(saved["table"])
        return 0
    total_started = time.perf_counter()
    if args.dataset:
        cases = load_jsonl(args.dataset)
        source = str(args.dataset)
    else:
        cases = tile_cases(args.seed, args.ks, args.per_kind, args.kinds)
        kinds = ",".join(dict.fromkeys(c.kind for c in cases))
        source = f"tile task ({kinds}), seed {args.seed}, K {args.ks}, {args.per_kind} per kind"
    if args.limit:
        cases = cases[: args.limit]
    if not cases:
        raise SystemExit("no cases to evaluate")

    dataset = {"source": source, **dataset_summary(cases)}
    saved = [saved_run(path, dataset) for path in args.join]
    # a row saved again in a later file replaces the earlier one (a rerun)
    joined = list({row["config"]: row for rows, _ in saved for row in rows}.values())
    joined_seconds = sum(seconds for _, seconds in saved)
    if args.join:
        configs: list[EvalConfig] = []  # nothing to run: the rows come from --join
    elif args.url:
        label = args.label.split("@")[0]
        configs = [EvalConfig(args.label, label, label, args.label_budget, None)]
    else:
        configs = build_configs(args)
    gold = GoldTokenizer(args.model)
    ahead = 0 if args.url else args.prestart
    parallel = 1 if args.url else max(1, args.parallel)

    def evaluate(i: int, pipeline: ServerPipeline) -> tuple[dict[str, Any], list[TurnResult]]:
        config = configs[i]
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", config.name)
        if args.url:
            url, waited = args.url.rstrip("/"), 0.0
        else:
            pipeline.prepare(configs[i : i + 1 + ahead])
            url, waited = pipeline.wait(config)
        try:
            results, seconds, has_stats = run_config(
                url, cases, args, tag, gold, position=1 + i % parallel
            )
        finally:
            if not args.url:
                pipeline.stop(config)
        row = summarize(config, results, seconds, has_stats)
        if args.url:
            row["hybridkv"] = None
            if not has_stats:
                for key in BYTE_ROW_KEYS:
                    row[key] = None
        else:
            row["server_wait_seconds"] = round(waited, 1)
        read = row["mean_read_bytes_fraction"]
        low, high = row["ci95"]
        tqdm.write(
            f"{config.name}: accuracy {row['accuracy']:.1%} [{low:.1%}, {high:.1%}] "
            f"({row['correct']}/{row['questions']}), bytes read per step "
            f"{'-' if read is None else f'{read:.3f}'}, {seconds:.0f} s"
        )
        return row, results

    out = args.add_to.with_suffix("") if args.add_to else args.out
    partial = out.with_name(out.name + ".partial.json")
    done: dict[int, tuple[dict[str, Any], list[TurnResult]]] = {}
    failed: dict[str, str] = {}
    with (
        ServerPipeline(args, ahead=ahead, parallel=parallel) as pipeline,
        concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool,
        tqdm(total=len(configs), desc="configs", unit="config", position=0) as bar,
    ):
        futures = {pool.submit(evaluate, i, pipeline): i for i in range(len(configs))}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            bar.update()
            try:
                done[i] = future.result()
            except Exception as err:
                # a server that died (out of memory, say): the other rows go on
                failed[configs[i].name] = repr(err)
                tqdm.write(f"{configs[i].name}: failed, row left out: {err!r}")
                continue
            save_partial(
                partial,
                [row for row, _ in done.values()],
                dataset,
                time.perf_counter() - total_started,
            )
    if failed:
        raise SystemExit(
            f"{len(failed)} row(s) failed: {failed}; the finished rows are in {partial} "
            "(--join them, run the failed ones again)"
        )
    rows = joined + [done[i][0] for i in range(len(configs))]
    reference = next((done[i][1] for i, c in enumerate(configs) if c.method == "full"), None)
    for i, config in enumerate(configs):
        row, results = done[i]
        if reference is not None and config.method != "full":
            row["first_token_agreement"], row["first_tokens_compared"] = first_token_agreement(
                results, reference
            )

    total = time.perf_counter() - total_started + joined_seconds
    if args.add_to:
        rows, total = rows_added_to(args.add_to, rows, total, dataset)
    comparisons = paired_comparisons(rows)
    table = format_table(rows)
    comparison_table = format_comparisons(comparisons)
    print(table)
    print()
    print(comparison_table)
    print(f"total {total / 60:.1f} min")
    result = {
        "benchmark": "quality",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "device": args.device,
        },
        "args": {
            k: [str(x) for x in v] if k == "join" else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
        },
        "dataset": dataset,
        "model": str(args.model),
        "total_seconds": round(total, 1),
        "rows": rows,
        "comparisons": comparisons,
        "table": table,
        "comparison_table": comparison_table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    title = f"{Path(str(args.model)).name}: {source}"
    plot(rows, out.with_suffix(".png"), title)
    partial.unlink(missing_ok=True)
    print(f"wrote {json_path} and {out.with_suffix('.png')}")
    return 0


def save_partial(
    path: Path, rows: list[dict[str, Any]], dataset: dict[str, Any], seconds: float
) -> None:
    """The rows finished so far, after each one, with the run's time so far: a run stopped early
    (a long CPU run, a session that ends) keeps them, and ``--join`` adds them to a results file
    later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"dataset": dataset, "total_seconds": round(seconds, 1), "rows": rows}
    path.write_text(json.dumps(saved, indent=2) + "\n")


def saved_run(
    path: Path, dataset: dict[str, Any], replaced: frozenset[str] = frozenset()
) -> tuple[list[dict[str, Any]], float]:
    """The rows of a results or ``.partial.json`` file made on these questions (but those named
    in ``replaced``), and the time they took (0 for a partial file saved before runs recorded
    it), so a joined file's total counts every run it holds."""
    saved = json.loads(path.read_text())
    if saved["dataset"] != json.loads(json.dumps(dataset)):  # as saved: tuples become lists
        raise SystemExit(
            f"{path}: its questions differ from this run's ({saved['dataset']['source']} vs "
            f"{dataset['source']}); use the same --seed/--ks/--per-kind/--kinds/--dataset"
        )
    rows = [in_bytes(row, path) for row in saved["rows"] if row["config"] not in replaced]
    return rows, saved.get("total_seconds", 0.0)


def in_bytes(row: dict[str, Any], source: Path) -> dict[str, Any]:
    """A saved row with its figures in bytes. Rows saved before budgets counted bytes measured
    entries: a policy without a chunk index (the full cache, every static baseline) reads the
    same share of bytes as of entries, so its row carries over, labelled; a row whose policy
    retrieves chunks read its index on top and must be run again."""
    if "mean_read_bytes_fraction" in row:
        return row
    method = row["method"]
    if method != "full" and POLICY_REGISTRY[method].needs_chunk_bounds:
        raise SystemExit(
            f"{source}: row {row['config']} was measured in entries before budgets counted "
            f"bytes, and {method} reads a chunk index on top of its entries: run it again"
        )
    mean, (_, most) = row.pop("mean_read_fraction"), row.pop("read_fraction_range")
    return {
        **row,
        "mean_read_bytes_fraction": mean,
        "max_read_bytes_fraction": most,
        "mean_metadata_bytes_fraction": 0.0,
        "mean_device_bytes_fraction": mean,
        "mean_read_entries_fraction": mean,
        "accounting": "carried over from an entry-count run: no chunk index, bytes = entries",
    }


def rows_added_to(
    path: Path, rows: list[dict[str, Any]], seconds: float, dataset: dict[str, Any]
) -> tuple[list[dict[str, Any]], float]:
    """An earlier run's rows with this run's joined (same name: replaced), and the total time.

    Paired comparisons need the same questions, so the earlier run's dataset must be this one.
    """
    earlier, earlier_seconds = saved_run(path, dataset, frozenset(r["config"] for r in rows))
    return earlier + rows, earlier_seconds + seconds


if __name__ == "__main__":
    sys.exit(main())
