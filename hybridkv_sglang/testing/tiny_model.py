"""Build a random-weight Qwen2.5-VL directory that SGLang serves on CPU and transformers loads.

Nothing is downloaded: the config, the seeded weights, a byte-level BPE tokenizer trained on a
built-in corpus (carrying Qwen's special tokens), the Qwen2-VL chat template, the generation config
and the Qwen2-VL image and video processor configs are all made here.

    python -m hybridkv_sglang.testing.tiny_model OUT_DIR [--preset tiny|bench7b] [--layers N] ...

Presets:
- ``tiny``: hidden 64, 2 layers, 4 query / 2 KV heads (head dim 16), vision depth 2 hidden 32,
  images of 4..256 visual tokens (min/max pixels 28²·4 .. 448²), so one 448 x 448 image makes a
  prompt long enough for the default config to compress. Builds in seconds.
- ``bench7b``: the KV layout of Qwen2.5-VL-7B (28 query / 4 KV heads, head dim 128, hidden 3584)
  with 2 layers and a small MLP and vision tower, and Qwen's own pixel limits (28²·4 .. 28²·16384),
  so one large image gives thousands of visual tokens.

A build is cached: ``OUT_DIR/hybridkv_tiny_model.json`` records the options; calling again with the
same options returns at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILD_FORMAT = 1
"""Bumped whenever the builder's output changes for identical options (invalidates caches)."""

MANIFEST_NAME = "hybridkv_tiny_model.json"

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
PIXELS_PER_VISUAL_TOKEN = (PATCH_SIZE * SPATIAL_MERGE_SIZE) ** 2  # 28² = 784
# Per-frame pixel limits of the video processor, Qwen's own (and SGLang's video preprocessing
# defaults), in every preset: a 448x448 frame pair stays 256 visual tokens, so a clip of a few
# frames is long enough to be compressed under the default ``min_prompt_tokens``.
VIDEO_MIN_PIXELS = PIXELS_PER_VISUAL_TOKEN * 128
VIDEO_MAX_PIXELS = PIXELS_PER_VISUAL_TOKEN * 768

# Qwen2/Qwen2.5-VL special tokens, in Qwen's id order (placed right after the trained vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added as ordinary (non-special) added tokens, as in Qwen's tokenizer.
QWEN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenization regex.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen2-VL chat template (as shipped with Qwen2.5-VL-*-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_SEED_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in detail. What is shown in this picture? How many objects are there?
The cat sat on the mat while the dog slept near the warm fire in the small house.
Please answer the question about the image. The image shows a red car parked on a street.
There is a blue sky with white clouds above green trees and a tall building made of glass.
Write a short story about a robot who learns to paint colorful landscapes by the sea.
The model reads the tokens, attends to the keys and values, and writes the next token.
Compression keeps the important tokens of the cache and drops the ones nobody looks at.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1e-6; symbols: + - * / = < > ( ) [ ] { } # @ !
def main(argv: list[str]) -> int:
    return 0
{"role": "user", "content": "Hello, world!"} <html><body>Hi</body></html>
Bonjour le monde. Hallo Welt. Hola mundo. Ciao mondo. Olá mundo.
"""

_CORPUS_WORDS_TEXT = """
image picture photo video frame pixel patch token key value query head layer cache budget
attention window sink text visual vision language model server request response batch prefix
tree radix memory compress select score keep drop static dynamic hybrid policy red green blue
yellow black white orange purple brown gray small large tall short wide narrow bright dark
left right top bottom center corner edge line circle square triangle person people man woman
child dog cat bird horse car bus train boat plane tree flower house road street river
mountain sky cloud sun moon star water fire table chair book read write look see show find
count describe answer question explain think know make the a an of in on at to from with by
for and or but not is are was were be been has have this that these those there here what
which who where when why how many much some every one two three four five six seven eight
nine ten hundred thousand first second last next
"""


def _training_corpus(seed: int, extra_words: tuple[str, ...] = ()) -> list[str]:
    """The tokenizer's training text: fixed prose plus seeded sentences over a word list.

    ``extra_words`` (none by default, which leaves the corpus unchanged) are appended often enough,
    alone on a line and after a space, that the BPE learns each as a single token both ways.
    """
    rng = random.Random(seed)
    lines = _CORPUS_SEED_TEXT.splitlines()
    vocabulary = _CORPUS_WORDS_TEXT.split()
    for _ in range(2000):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(".?!,;:"))
    for _ in range(200):
        for word in extra_words:
            lines.append(word)
            lines.append(f"{rng.choice(vocabulary)} {word} {rng.choice(vocabulary)}")
    return lines


@dataclass(frozen=True)
class TinyQwen2_5_VLSpec:
    """Every option of a built model; equal specs build byte-identical directories."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    vision_window: int = 112  # pixels; 112 = 4x4 merged tokens per attention window
    min_pixels: int = PIXELS_PER_VISUAL_TOKEN * 4
    max_pixels: int = PIXELS_PER_VISUAL_TOKEN * 256  # 448 x 448: a prompt long enough to compress
    vocab: int = 1000  # trained BPE vocabulary before the special tokens (corpus allows ~1200)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    dtype: str = "float32"  # float32 | bfloat16 | float16: saved weights and config torch_dtype
    seed: int = 0

    @property
    def head_dim(self) -> int:
        """hidden // heads (transformers' Qwen2.5-VL requires heads * head_dim == hidden)."""
        return self.hidden // self.heads

    @property
    def mrope_section(self) -> list[int]:
        """[temporal, height, width] rotary pairs; sums to head_dim / 2 ([16, 24, 24] for 128)."""
        half = self.head_dim // 2
        temporal = max(1, half // 4)
        height = (half - temporal) // 2
        return [temporal, height, half - temporal - height]

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, int) and name != "seed" and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads must be a multiple of kv_heads, got {self.heads} and {self.kv_heads} "
                "(each KV head serves heads / kv_heads query heads)"
            )
        head_dim = self.head_dim
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden must be a multiple of heads, got {self.hidden} and {self.heads} "
                "(transformers' Qwen2.5-VL requires hidden == heads * head_dim)"
            )
        if head_dim % 2 or head_dim < 6:
            raise ValueError(
                f"head_dim must be even and >= 6 (M-RoPE splits head_dim / 2 into three "
                f"sections), got {head_dim}"
            )
        if self.vision_hidden % self.vision_heads or (self.vision_hidden // self.vision_heads) % 4:
            raise ValueError(
                f"vision_hidden / vision_heads must be a multiple of 4 (2-D vision rotary), got "
                f"{self.vision_hidden} / {self.vision_heads}"
            )
        if self.vision_window % (PATCH_SIZE * SPATIAL_MERGE_SIZE):
            raise ValueError(
                f"vision_window must be a multiple of {PATCH_SIZE * SPATIAL_MERGE_SIZE} pixels, "
                f"got {self.vision_window}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels must be <= max_pixels, got {self.min_pixels} > {self.max_pixels}"
            )
        if self.vocab < 300:
            raise ValueError(
                f"vocab must be >= 300 (256 byte tokens plus merges), got {self.vocab}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(grid_h, grid_w) in 14-pixel patches after Qwen2-VL's ``smart_resize``."""
        resized_h, resized_w = smart_resize(height, width, self.min_pixels, self.max_pixels)
        return resized_h // PATCH_SIZE, resized_w // PATCH_SIZE

    def image_tokens(self, width: int, height: int) -> int:
        """Number of ``<|image_pad|>`` tokens one ``width`` x ``height`` image expands to."""
        grid_h, grid_w = self.image_grid(width, height)
        return grid_h * grid_w // (SPATIAL_MERGE_SIZE**2)

    def video_tokens(self, frames: int, width: int, height: int) -> int:
        """Number of ``<|video_pad|>`` tokens ``frames`` frames of ``width`` x ``height`` expand
        to in the processor (frames are padded to pairs: the temporal patch is 2 frames).

        These are the frames the processor receives: SGLang first samples the video at 2 fps.
        """
        resized_h, resized_w = smart_resize(height, width, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        per_pair = (resized_h // PATCH_SIZE) * (resized_w // PATCH_SIZE) // (SPATIAL_MERGE_SIZE**2)
        return -(-frames // TEMPORAL_PATCH_SIZE) * per_pair


PRESETS: dict[str, TinyQwen2_5_VLSpec] = {
    "tiny": TinyQwen2_5_VLSpec(),
    "bench7b": TinyQwen2_5_VLSpec(
        layers=2,
        hidden=3584,
        heads=28,
        kv_heads=4,
        intermediate=1024,
        vision_depth=2,
        vision_hidden=128,
        vision_heads=4,
        vision_intermediate=256,
        min_pixels=PIXELS_PER_VISUAL_TOKEN * 4,
        max_pixels=PIXELS_PER_VISUAL_TOKEN * 16384,
        max_position_embeddings=128000,
    ),
}


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of 28, area within [min, max] pixels."""
    factor = PATCH_SIZE * SPATIAL_MERGE_SIZE
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be <= 200, got {height}x{width}")
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        resized_h = max(factor, math.floor(height / beta / factor) * factor)
        resized_w = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * beta / factor) * factor
        resized_w = math.ceil(width * beta / factor) * factor
    return resized_h, resized_w


def resolve_spec(
    preset: str = "tiny", *, head_dim: int | None = None, **overrides: Any
) -> TinyQwen2_5_VLSpec:
    """The preset's spec with the non-None ``overrides`` applied, validated.

    ``head_dim`` is not a field (transformers' Qwen2.5-VL requires hidden == heads * head_dim):
    giving it sets ``hidden = heads * head_dim``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(TinyQwen2_5_VLSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options: {sorted(fields)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if head_dim is not None:
        heads = overrides.get("heads", PRESETS[preset].heads)
        hidden = overrides.setdefault("hidden", heads * head_dim)
        if hidden != heads * head_dim:
            raise ValueError(
                f"hidden must equal heads * head_dim, got hidden {hidden}, heads {heads}, "
                f"head_dim {head_dim} (give either hidden or head_dim)"
            )
    spec = dataclasses.replace(PRESETS[preset], **overrides)
    spec.validate()
    return spec


def build_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "tiny",
    force: bool = False,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vision_depth: int | None = None,
    vision_hidden: int | None = None,
    vision_heads: int | None = None,
    vision_intermediate: int | None = None,
    vision_window: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    vocab: int | None = None,
    max_position_embeddings: int | None = None,
    rope_theta: float | None = None,
    dtype: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write a random-weight Qwen2.5-VL model directory to ``out_dir`` and return its path.

    Options left as None take the ``preset``'s value; ``head_dim`` sets ``hidden = heads *
    head_dim`` (transformers' Qwen2.5-VL ties the two). If ``out_dir`` already holds a build with
    the same options (and ``force`` is False) nothing is rebuilt. An existing ``out_dir`` that is
    not empty and holds no build of ours is refused rather than overwritten.
    """
    spec = resolve_spec(
        preset,
        head_dim=head_dim,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vision_depth=vision_depth,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
        vision_window=vision_window,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        vocab=vocab,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        dtype=dtype,
        seed=seed,
    )
    return build_from_spec(out_dir, spec, force=force)


def _manifest(spec: TinyQwen2_5_VLSpec, extra_words: tuple[str, ...] = ()) -> dict[str, Any]:
    manifest: dict[str, Any] = {"build_format": BUILD_FORMAT, "spec": dataclasses.asdict(spec)}
    if extra_words:  # recorded only when given, so existing builds stay up to date
        manifest["extra_words"] = list(extra_words)
    return manifest


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded build options of ``model_dir``, or None if it holds no complete build."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_from_spec(
    out_dir: str | os.PathLike[str],
    spec: TinyQwen2_5_VLSpec,
    *,
    force: bool = False,
    extra_words: tuple[str, ...] = (),
) -> Path:
    """Like :func:`build_tiny_qwen2_5_vl`, from a resolved spec.

    ``extra_words`` are words the tokenizer must encode as single tokens, with and without a
    leading space (e.g. a synthetic task's answer words); none by default.

    Concurrent builders of one ``out_dir`` (parallel test sessions sharing a cache) serialise on
    a lock file beside it; the model is built in a staging directory and renamed into place, so
    ``out_dir`` is either absent, a complete older build, or the complete new one.
    """
    spec.validate()
    out = Path(out_dir).resolve()
    extra_words = tuple(extra_words)
    manifest = _manifest(spec, extra_words)
    if not force and read_manifest(out) == manifest:
        logger.info("tiny model at %s is up to date", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out.parent / f".{out.name}.lock"):
        if not force and read_manifest(out) == manifest:  # built meanwhile by another process
            return out
        if out.exists() and (
            not out.is_dir() or (any(out.iterdir()) and read_manifest(out) is None)
        ):
            raise ValueError(
                f"{out} exists and holds no tiny-model build; refusing to overwrite it "
                "(choose an empty or new directory)"
            )
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        try:
            _write_model(staging, spec, extra_words)
            # The manifest is written last: its presence marks a complete build.
            (staging / MANIFEST_NAME).write_text(
                json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            )
            staging.chmod(0o755)  # mkdtemp makes it 0700
            for path in staging.iterdir():
                path.chmod(0o644)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("built tiny Qwen2.5-VL at %s in %.1f s", out, time.perf_counter() - started)
    return out


def cached_build(
    cache_root: str | os.PathLike[str], *, preset: str = "tiny", **options: Any
) -> Path:
    """Build (once) into ``cache_root/<preset>-<digest of the options>`` and return that path.

    For fixtures shared across test sessions: every distinct set of options gets its own
    directory, so differently-shaped models never evict each other.
    """
    spec = resolve_spec(preset, **options)
    digest = hashlib.sha256(json.dumps(_manifest(spec), sort_keys=True).encode()).hexdigest()[:12]
    return build_from_spec(Path(cache_root) / f"{preset}-{digest}", spec)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_tokenizer(spec: TinyQwen2_5_VLSpec, extra_words: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE (``tokenizers.Tokenizer``) with Qwen's special tokens after the vocab."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_corpus(spec.seed, extra_words), trainer=trainer)
    if tokenizer.get_vocab_size() < spec.vocab:
        logger.warning(
            "the built-in corpus supports %d BPE tokens, fewer than vocab=%d; using %d",
            tokenizer.get_vocab_size(),
            spec.vocab,
            tokenizer.get_vocab_size(),
        )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS]
    )
    return tokenizer


def _qwen2_tokenizer_class() -> Any:
    try:
        from transformers import Qwen2TokenizerFast

        return Qwen2TokenizerFast
    except ImportError:  # transformers >= 5 folds the fast class into Qwen2Tokenizer
        from transformers import Qwen2Tokenizer

        return Qwen2Tokenizer


def _write_model(out: Path, spec: TinyQwen2_5_VLSpec, extra_words: tuple[str, ...] = ()) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    raw_tokenizer = _train_tokenizer(spec, extra_words)
    tokenizer = _qwen2_tokenizer_class()(
        tokenizer_object=raw_tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=spec.max_position_embeddings,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    ids = {t: raw_tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = raw_tokenizer.get_vocab_size(with_added_tokens=True)

    image_processor = Qwen2VLImageProcessor(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    # transformers 5 writes the image processor into processor_config.json; SGLang and older
    # transformers also read preprocessor_config.json (with Qwen's legacy min/max_pixels keys).
    legacy = image_processor.to_dict()
    legacy.update(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    legacy["processor_class"] = type(processor).__name__
    (out / "preprocessor_config.json").write_text(json.dumps(legacy, indent=2, sort_keys=True))

    text = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": spec.mrope_section},
        "use_sliding_window": False,
        "sliding_window": spec.max_position_embeddings,
        "max_window_layers": spec.layers,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "num_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": spec.vision_window,
        "out_hidden_size": spec.hidden,
        # Qwen2.5-VL: full attention every 8th block, window attention elsewhere; here the last.
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )

    torch_dtype = getattr(torch, spec.dtype)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    state = {name: _init_tensor(name, p.shape, spec.seed) for name, p in model.state_dict().items()}
    # Only persistent tensors are set: non-persistent buffers (rotary inverse frequencies) stay
    # uninitialised, which is fine because this model is saved, never run.
    model.load_state_dict(state, strict=True, assign=False)
    model = model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)


def _init_tensor(name: str, shape: Any, seed: int) -> Any:
    """Seeded initial value of one parameter, independent of construction order.

    Norm weights are 1; biases N(0, 0.02); token embeddings N(0, 1); every other matrix
    N(0, 1 / fan_in), which keeps activations of order 1 so attention is not uniform.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    module = name.split(".")[-2]
    if len(shape) == 1 and ("norm" in module or module.startswith("ln")):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if len(shape) == 1:
        return torch.randn(shape, generator=generator) * 0.02
    if "embed_tokens" in name:
        return torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hybridkv_sglang.testing.tiny_model",
        description="Build a random-weight Qwen2.5-VL directory for SGLang/transformers tests.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--head-dim",
        type=int,
        default=None,
        help="sets hidden = heads * head_dim (tiny: 16, bench7b: 128)",
    )
    for field in dataclasses.fields(TinyQwen2_5_VLSpec):
        kind = float if field.name == "rope_theta" else str if field.name == "dtype" else int
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=None,
            help=f"(preset tiny: {getattr(PRESETS['tiny'], field.name)}, "
            f"bench7b: {getattr(PRESETS['bench7b'], field.name)})",
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = vars(_parse_args(argv))
    out_dir = args.pop("out_dir")
    try:
        path = build_tiny_qwen2_5_vl(out_dir, **args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
