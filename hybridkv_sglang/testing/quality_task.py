"""The "tile" task: synthetic multi-image questions whose answer sits in a few visual tokens.

Every image is 112 x 112 px (16 merged Qwen2-VL visual tokens) of noisy light grey holding one
56 x 56 px tile (2 x 2 merged tokens, aligned to the 28 px token grid): a bright KEY-colour border
around a dark VALUE-colour core. A prompt shows K images and asks about tiles by their key:

* ``single``: "What is inside the red square?" -> "navy"
* ``describe``: "Describe the red square." -> "red navy" (echo of the key first; in training it
  makes the retrieval learnable, see ``/work/shared/notes/quality-model.md``)
* ``pair_name``: "What is inside the red and blue squares?" -> "navy teal" (two regions at once)
* ``pair_same``: "Are the red and blue squares the same inside?" -> "yes" / "no" (balanced)
* ``list_name``: "What is inside the red, blue and green squares?" -> "navy teal black" (three or
  four keys, values in question order: each decode step needs a different image)
* ``multi_turn``: 2-3 ``describe`` questions in one conversation, each about an image no earlier
  turn asked about (later turns need tokens an earlier question did not point at)
* ``multi_mixed``: describe, then pair_name, then describe, four different images (each turn asks
  about images no earlier turn asked about; the pair turn needs two regions)

Which kinds measure compression: a server compresses a request's KV cache after its prefill, and
the first answer token comes from the prefill's own (dense) forward. A ``single`` answer is that
one token, so compression cannot change it; the value of ``describe`` (and of every ``describe``
turn of a conversation) and the second value of ``pair_name`` are decoded from the compressed
cache. The default benchmark set is therefore ``EVAL_KINDS`` = describe, pair_name, multi_turn,
multi_mixed. ``pair_same`` is out too: the committed model never learned the comparison (it
answers "no" to every such question, chance level) though it trained on them. ``list_name`` is
not in the default set either: the committed model, trained on pairs only, does not answer lists
(0 % with the full cache); training draws them only when asked (``list_prob`` of
:func:`make_training_case`, default 0).

Asked keys are unique within a prompt. With K <= 8 every image has its own key colour; with K > 8,
``ASKABLE_KEYS_LARGE_K`` images carry unique (askable) keys and the rest reuse up to three of the
remaining key colours, each at least twice; those repeated colours are never asked.

Everything is a function of the seed: :func:`make_case` builds one case, :func:`make_question_set`
the held-out evaluation set, :func:`make_training_case` one training conversation. A case renders
its images (:meth:`TileCase.images`) and converts to the benchmark's JSONL record format
(:meth:`TileCase.to_record`; the format is documented in ``bench/quality.py``). Replies are scored
by :func:`is_correct`, and ``TILE_MODEL_SETTINGS`` are the committed model's hybridkv settings:
what the benchmark (``bench/quality.py``) and the demo (``examples/quality_demo.py``) share.

    python -m hybridkv_sglang.testing.quality_task OUT.jsonl [--seed S] [--ks 16,32,64] ...

writes a held-out question set as JSONL, images inlined as PNG data URLs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

IMAGE_SIDE = 112
"""Image side in pixels: 4 x 4 merged visual tokens (28 px each) = 16 tokens per image."""
CELL = 28
"""One merged visual token (patch 14, spatial merge 2)."""
TILE_SIDE = 56
"""Tile side in pixels: 2 x 2 merged tokens; every one of them shows key border and value core."""
BORDER = 12
"""Width of the key-colour border in pixels (the core is TILE_SIDE - 2 * BORDER = 32 px)."""
VISUAL_TOKENS_PER_IMAGE = (IMAGE_SIDE // CELL) ** 2
TILE_POSITIONS = (IMAGE_SIDE - TILE_SIDE) // CELL + 1
"""Tile corners per axis on the token grid (0, 28, 56 px): 9 placements."""

KEY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "green": (40, 200, 40),
    "blue": (40, 90, 250),
    "yellow": (245, 225, 30),
    "orange": (255, 140, 10),
    "purple": (160, 60, 230),
    "pink": (255, 110, 200),
    "cyan": (20, 225, 235),
}
"""Bright border colours that name a tile."""
VALUE_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "brown": (115, 65, 20),
    "navy": (15, 25, 130),
    "maroon": (130, 15, 45),
    "olive": (95, 110, 10),
    "teal": (0, 105, 105),
}
"""Dark core colours: the answers."""
KEYS = tuple(KEY_COLOURS)
VALUES = tuple(VALUE_COLOURS)
ASKABLE_KEYS_LARGE_K = 5
"""With K > len(KEYS), how many images carry a unique (askable) key colour."""
BACKGROUND = 200
NOISE = 24
COLOUR_JITTER = 12

TASK_WORDS = (*KEYS, *VALUES, "yes", "no", "inside", "square", "squares", "same", "Describe")
"""Words the task's tokenizer encodes as single tokens (``tiny_model`` ``extra_words``)."""

QuestionKind = Literal["single", "describe", "pair_name", "pair_same", "list_name"]
CaseKind = Literal[
    "single", "describe", "pair_name", "pair_same", "list_name", "multi_turn", "multi_mixed"
]
CASE_KINDS: tuple[CaseKind, ...] = (
    "single",
    "describe",
    "pair_name",
    "pair_same",
    "list_name",
    "multi_turn",
    "multi_mixed",
)
EVAL_KINDS: tuple[CaseKind, ...] = ("describe", "pair_name", "multi_turn", "multi_mixed")
"""The compression benchmark's default kinds: an answer token comes from the compressed cache."""
MIN_ASKABLE: dict[CaseKind, int] = {
    "single": 1,
    "describe": 1,
    "pair_name": 2,
    "pair_same": 2,
    "list_name": 4,
    "multi_turn": 2,
    "multi_mixed": 4,
}
"""Distinct askable keys (hence images) each kind needs (``list_name`` asks three or four)."""
LIST_KEYS = (3, 4)
"""How many keys a ``list_name`` question names."""
LEARNED_KINDS: tuple[CaseKind, ...] = ("single", "describe", "pair_name", "multi_turn")
"""What the committed model answers (its held-out accuracy is measured on these)."""

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
SYSTEM_PROMPT = "You are a helpful assistant."
TILE_MODEL_SETTINGS: dict[str, int | float | str] = {
    "sink": 0,
    "chunk_size": 4,
    "top_k_chunks": 64,
    "bound_channels": 8,
    "bound_precision": "uint8",
    "dynamic_window_share": 0.15,
}
"""``HybridKVConfig`` fields for the committed tile-task model (``bench/quality_model``;
``docs/quality-diagnosis.md``): it has no attention sink (< 2 % of any head's mass on the first
4 tokens), its tiles are 2 x 2 tokens (16-token chunks are coarse against them), and with
``dynamic_top_k="budget"`` the budget, not ``top_k_chunks``, bounds retrieval. Its chunk index,
paid from the byte budget, keeps 8 of the 32 key channels in 8-bit codes (28 bytes a 4-token
chunk before scratch, against 1,024 of KV), and dynamic heads keep 15 % of their budget as a
resident window: the best byte-honest settings of the offline sweep (``docs/quality-
benchmark.md``). Other models keep the config defaults."""


@dataclass(frozen=True)
class Tile:
    """One image's tile: its key (border) and value (core) colour names and grid corner."""

    key: str
    value: str
    row: int  # top edge in 28 px cells, 0 .. TILE_POSITIONS - 1
    col: int  # left edge in 28 px cells


@dataclass(frozen=True)
class Turn:
    """One question and its answer; ``keys`` are the tiles it needs, in question order."""

    question: str
    answer: str
    kind: QuestionKind
    keys: tuple[str, ...]


@dataclass(frozen=True)
class TileCase:
    """A conversation over K images: the tiles, the turns, and the seed its pixels come from."""

    case_id: str
    kind: CaseKind | Literal["train"]
    seed: int
    tiles: tuple[Tile, ...]
    turns: tuple[Turn, ...]

    @property
    def k(self) -> int:
        return len(self.tiles)

    def images(self) -> list[Image.Image]:
        """The K RGB images, in prompt order (pixel noise seeded by the case seed)."""
        return [render_tile_image(t, seed=self.seed * 1009 + i) for i, t in enumerate(self.tiles)]

    def image_arrays(self) -> list[np.ndarray]:
        """The K images as ``[112, 112, 3]`` uint8 arrays (what :meth:`images` wraps)."""
        return [render_tile_array(t, seed=self.seed * 1009 + i) for i, t in enumerate(self.tiles)]

    def to_record(self) -> dict[str, Any]:
        """This case as one line of the benchmark's JSONL format (images as PNG data URLs)."""
        return {
            "id": self.case_id,
            "kind": self.kind,
            "images": [png_data_url(image) for image in self.images()],
            "turns": [{"question": t.question, "answer": t.answer} for t in self.turns],
            "meta": {"k": self.k, "keys": [list(t.keys) for t in self.turns]},
        }


def render_tile_array(tile: Tile, *, seed: int) -> np.ndarray:
    """``[112, 112, 3]`` uint8: noisy grey, the tile's key border and value core (jittered)."""
    rng = np.random.default_rng(seed)
    pixels = BACKGROUND + rng.integers(-NOISE, NOISE + 1, size=(IMAGE_SIDE, IMAGE_SIDE, 3))
    key = np.array(KEY_COLOURS[tile.key]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    value = np.array(VALUE_COLOURS[tile.value]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    top, left = tile.row * CELL, tile.col * CELL
    pixels[top : top + TILE_SIDE, left : left + TILE_SIDE] = key
    inner = slice(BORDER, TILE_SIDE - BORDER)
    core_rows = slice(top + inner.start, top + inner.stop)
    core_cols = slice(left + inner.start, left + inner.stop)
    pixels[core_rows, core_cols] = value
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_tile_image(tile: Tile, *, seed: int) -> Image.Image:
    return Image.fromarray(render_tile_array(tile, seed=seed), mode="RGB")


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_tiles(rng: random.Random, k: int) -> tuple[tuple[Tile, ...], tuple[str, ...]]:
    """K tiles in prompt order and the askable keys (each on exactly one image)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k <= len(KEYS):
        keys = rng.sample(KEYS, k)
        askable = tuple(keys)
    else:
        shuffled = rng.sample(KEYS, len(KEYS))
        askable = tuple(shuffled[:ASKABLE_KEYS_LARGE_K])
        # The other images reuse up to three other colours, each at least twice, so no
        # colour but the askable ones is unique in the prompt.
        n_fill = k - len(askable)
        repeated = shuffled[ASKABLE_KEYS_LARGE_K:][: max(1, n_fill // 2)]
        fill = [repeated[i % len(repeated)] for i in range(n_fill)]
        keys = [*askable, *fill]
        rng.shuffle(keys)
    tiles = tuple(
        Tile(
            key=key,
            value=rng.choice(VALUES),
            row=rng.randrange(TILE_POSITIONS),
            col=rng.randrange(TILE_POSITIONS),
        )
        for key in keys
    )
    return tiles, askable


def _value_of(tiles: Sequence[Tile], key: str) -> str:
    (value,) = [t.value for t in tiles if t.key == key]
    return value


def single_turn(tiles: Sequence[Tile], key: str) -> Turn:
    return Turn(f"What is inside the {key} square?", _value_of(tiles, key), "single", (key,))


def describe_turn(tiles: Sequence[Tile], key: str) -> Turn:
    return Turn(f"Describe the {key} square.", f"{key} {_value_of(tiles, key)}", "describe", (key,))


def pair_name_turn(tiles: Sequence[Tile], k1: str, k2: str) -> Turn:
    answer = f"{_value_of(tiles, k1)} {_value_of(tiles, k2)}"
    return Turn(f"What is inside the {k1} and {k2} squares?", answer, "pair_name", (k1, k2))


def list_name_turn(tiles: Sequence[Tile], *keys: str) -> Turn:
    """ "What is inside the k1, k2 and k3 squares?" -> the values in question order."""
    if len(keys) < 3:
        raise ValueError(f"a list names at least three keys, got {keys}")
    names = f"{', '.join(keys[:-1])} and {keys[-1]}"
    answer = " ".join(_value_of(tiles, key) for key in keys)
    return Turn(f"What is inside the {names} squares?", answer, "list_name", tuple(keys))


def pair_same_turn(tiles: Sequence[Tile], k1: str, k2: str) -> Turn:
    same = _value_of(tiles, k1) == _value_of(tiles, k2)
    question = f"Are the {k1} and {k2} squares the same inside?"
    return Turn(question, "yes" if same else "no", "pair_same", (k1, k2))


def _set_value(tiles: tuple[Tile, ...], key: str, value: str) -> tuple[Tile, ...]:
    return tuple(Tile(t.key, value, t.row, t.col) if t.key == key else t for t in tiles)


def make_case(seed: int, k: int, kind: CaseKind, *, case_id: str | None = None) -> TileCase:
    """One evaluation case of ``kind`` over ``k`` images, fully determined by ``seed``."""
    if kind not in CASE_KINDS:
        raise ValueError(f"kind must be one of {CASE_KINDS}, got {kind!r}")
    rng = random.Random(f"tile-case:{seed}:{k}:{kind}")
    tiles, askable = sample_tiles(rng, k)
    if len(askable) < MIN_ASKABLE[kind]:
        raise ValueError(f"kind {kind!r} needs k >= {MIN_ASKABLE[kind]}, got {k}")
    if kind == "single":
        turns: tuple[Turn, ...] = (single_turn(tiles, rng.choice(askable)),)
    elif kind == "describe":
        turns = (describe_turn(tiles, rng.choice(askable)),)
    elif kind == "pair_name":
        turns = (pair_name_turn(tiles, *rng.sample(askable, 2)),)
    elif kind == "pair_same":
        k1, k2 = rng.sample(askable, 2)
        v1 = _value_of(tiles, k1)
        same = rng.random() < 0.5  # balanced yes / no, whatever the values drawn above
        v2 = v1 if same else rng.choice([v for v in VALUES if v != v1])
        tiles = _set_value(tiles, k2, v2)
        turns = (pair_same_turn(tiles, k1, k2),)
    elif kind == "list_name":
        turns = (list_name_turn(tiles, *rng.sample(askable, rng.choice(LIST_KEYS))),)
    elif kind == "multi_turn":  # each turn about an image no earlier turn asked about
        n_turns = min(len(askable), rng.choice((2, 3)))
        turns = tuple(describe_turn(tiles, key) for key in rng.sample(askable, n_turns))
    else:  # multi_mixed: describe, pair_name, describe over four different images
        k1, k2, k3, k4 = rng.sample(askable, 4)
        turns = (
            describe_turn(tiles, k1),
            pair_name_turn(tiles, k2, k3),
            describe_turn(tiles, k4),
        )
    return TileCase(case_id or f"{kind}-k{k}-s{seed}", kind, seed, tiles, turns)


def make_question_set(
    seed: int = 1_000_000,
    ks: Iterable[int] = (16, 32, 64),
    per_kind: int = 10,
    kinds: Iterable[CaseKind] = EVAL_KINDS,
) -> list[TileCase]:
    """The held-out set: ``per_kind`` cases of each kind at each K (seeds disjoint from training,
    which draws from ``random.Random(f"tile-train:...")``)."""
    cases = []
    for k in ks:
        for kind in kinds:
            for i in range(per_kind):
                case_seed = seed + 1000 * k + i
                cases.append(make_case(case_seed, k, kind, case_id=f"{kind}-k{k}-{i}"))
    return cases


def make_training_case(
    rng: random.Random,
    k: int,
    *,
    max_turns: int = 8,
    describe_prob: float = 0.5,
    pair_prob: float = 0.5,
    list_prob: float = 0.0,
    list_four_prob: float = 0.5,
) -> TileCase:
    """One training conversation of 1..max_turns questions, pixel seed drawn from ``rng``.

    Each turn is ``describe`` with probability ``describe_prob``, else a multi-region question
    with probability ``pair_prob``, else ``single``. A multi-region question is ``list_name``
    with probability ``list_prob`` (if three keys are askable; four keys with probability
    ``list_four_prob`` if four are), else ``pair_name`` or ``pair_same`` (the latter with same /
    different values balanced by setting the second tile's value). With ``list_prob`` = 0 no
    extra draws are made: the cases equal those of the generator before lists existed.
    """
    tiles, askable = sample_tiles(rng, k)
    specs: list[tuple[QuestionKind, tuple[str, ...]]] = []
    for _ in range(rng.randint(1, max_turns)):
        if rng.random() < describe_prob:
            specs.append(("describe", (rng.choice(askable),)))
        elif len(askable) >= 2 and rng.random() < pair_prob:
            if list_prob > 0 and len(askable) >= 3 and rng.random() < list_prob:
                four = len(askable) >= 4 and rng.random() < list_four_prob
                specs.append(("list_name", tuple(rng.sample(askable, 4 if four else 3))))
                continue
            k1, k2 = rng.sample(askable, 2)
            if rng.random() < 0.5:
                specs.append(("pair_name", (k1, k2)))
                continue
            specs.append(("pair_same", (k1, k2)))
            v1 = _value_of(tiles, k1)
            same = rng.random() < 0.5
            tiles = _set_value(
                tiles, k2, v1 if same else rng.choice([v for v in VALUES if v != v1])
            )
        else:
            specs.append(("single", (rng.choice(askable),)))
    # Answers from the final tiles (a later pair_same may have changed a value asked before).
    build = {
        "describe": describe_turn,
        "single": single_turn,
        "pair_name": pair_name_turn,
        "pair_same": pair_same_turn,
        "list_name": list_name_turn,
    }
    turns = tuple(build[kind](tiles, *keys) for kind, keys in specs)
    return TileCase("train", "train", rng.randrange(2**31), tiles, turns)


def chat_text(
    case: TileCase, *, answers: Sequence[str] | None = None, upto: int | None = None
) -> str:
    """The Qwen2-VL chat-template text of the case's first ``upto`` turns (all by default).

    Earlier turns are followed by ``answers`` (default: the gold answers); the last turn ends with
    the generation prompt ``<|im_start|>assistant\\n``. Equals the processor's
    ``apply_chat_template(..., add_generation_prompt=True)`` of the same messages.
    """
    upto = len(case.turns) if upto is None else upto
    answers = [t.answer for t in case.turns] if answers is None else list(answers)
    parts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"]
    for i, turn in enumerate(case.turns[:upto]):
        images = VISION_BLOCK * case.k if i == 0 else ""
        parts.append(f"<|im_start|>user\n{images}{turn.question}<|im_end|>\n")
        parts.append("<|im_start|>assistant\n")
        if i < upto - 1:
            parts.append(f"{answers[i]}<|im_end|>\n")
    return "".join(parts)


def training_text(case: TileCase) -> str:
    """The whole conversation with every gold answer, each closed by ``<|im_end|>``."""
    return chat_text(case) + f"{case.turns[-1].answer}<|im_end|>\n"


def messages(case: TileCase, image_urls: Sequence[str], *, answers: Sequence[str], upto: int):
    """OpenAI chat messages for the first ``upto`` turns (images in the first user message)."""
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(case.turns[:upto]):
        content: list[dict[str, Any]] = []
        if i == 0:
            content += [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
        content.append({"type": "text", "text": turn.question})
        out.append({"role": "user", "content": content})
        if i < upto - 1:
            out.append({"role": "assistant", "content": answers[i]})
    return out


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding quotes and a trailing full stop dropped."""
    text = " ".join(text.strip().lower().split())
    text = text.strip("\"'`")
    return text[:-1].rstrip() if text.endswith(".") else text


def is_correct(reply: str, answers: Sequence[str], match: str = "exact") -> bool:
    """Whether ``reply`` gives one of ``answers`` after :func:`normalize`: equal (``exact``), or
    followed by a word boundary (``prefix``, for models that explain after answering)."""
    got = normalize(reply)
    for answer in answers:
        want = normalize(answer)
        if got == want:
            return True
        if match == "prefix" and got.startswith(want) and re.match(r"\W|$", got[len(want) :]):
            return True
    return False


def prompt_tokens(case: TileCase, text_tokens: int) -> int:
    """Prompt length in tokens given the chat text's token count (each image pad -> 16 tokens)."""
    return text_tokens + case.k * (VISUAL_TOKENS_PER_IMAGE - 1)


def write_jsonl(cases: Iterable[TileCase], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for case in cases:
            handle.write(json.dumps(case.to_record()) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybridkv_sglang.testing.quality_task",
        description="Write a held-out tile-task question set as JSONL (bench/quality.py format).",
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--ks", default="16,32,64", help="images per prompt, comma-separated")
    parser.add_argument("--per-kind", type=int, default=10)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    cases = make_question_set(args.seed, ks, args.per_kind)
    print(write_jsonl(cases, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
