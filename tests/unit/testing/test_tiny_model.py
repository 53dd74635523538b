"""The tiny Qwen2.5-VL builder: config, tokenizer, processor and weights load in transformers."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.testing.images import (
    image_base64,
    image_data_url,
    image_png_bytes,
    make_test_image,
)
from hybridkv_sglang.testing.tiny_model import (
    MANIFEST_NAME,
    PIXELS_PER_VISUAL_TOKEN,
    PRESETS,
    QWEN_SPECIAL_TOKENS,
    TinyQwen2_5_VLSpec,
    build_tiny_qwen2_5_vl,
    cached_build,
    main,
    resolve_spec,
)
from hybridkv_sglang.testing.videos import make_test_frames

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LARGE_MAX_PIXELS = PIXELS_PER_VISUAL_TOKEN * 1280


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    return transformers.AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_dir, torch_dtype=torch.float32
    ).eval()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chat_inputs(processor, width: int, height: int, text: str = "Describe the image."):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": text}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = make_test_image(width, height)
    return prompt, processor(text=[prompt], images=[image], return_tensors="pt")


# --- spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset: str) -> None:
    spec = PRESETS[preset]
    spec.validate()
    assert sum(spec.mrope_section) == spec.head_dim // 2


@pytest.mark.parametrize("head_dim", [6, 8, 16, 32, 64, 80, 96, 128, 256])
def test_mrope_section_sums_to_half_head_dim(head_dim: int) -> None:
    spec = TinyQwen2_5_VLSpec(hidden=4 * head_dim, heads=4)
    assert sum(spec.mrope_section) == head_dim // 2
    assert min(spec.mrope_section) >= 1


def test_bench7b_has_the_kv_layout_of_qwen2_5_vl_7b() -> None:
    spec = PRESETS["bench7b"]
    assert (spec.heads, spec.kv_heads, spec.head_dim) == (28, 4, 128)
    assert spec.mrope_section == [16, 24, 24]
    assert spec.image_tokens(1792, 1792) == 4096


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
        ({"hidden": 66, "heads": 4}, "multiple of heads"),
        ({"hidden": 20, "heads": 4}, "head_dim must be even"),
        ({"min_pixels": 10_000, "max_pixels": 5_000}, "min_pixels must be <= max_pixels"),
        ({"vision_hidden": 24, "vision_heads": 4}, "multiple of 4"),
        ({"layers": 0}, "layers must be >= 1"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"colour": 3}, "unknown option"),
    ],
)
def test_bad_options_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_spec("tiny", **overrides)


def test_head_dim_sets_hidden() -> None:
    assert resolve_spec("tiny", head_dim=32).hidden == 4 * 32
    assert resolve_spec("bench7b", heads=14, kv_heads=2, head_dim=128).hidden == 1792
    with pytest.raises(ValueError, match="hidden must equal heads \\* head_dim"):
        resolve_spec("tiny", hidden=64, head_dim=32)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve_spec("huge")


# --- build, cache --------------------------------------------------------------------------------


def test_build_writes_a_complete_model_dir(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        MANIFEST_NAME,
    } <= names
    manifest = json.loads((tiny_dir / MANIFEST_NAME).read_text())
    assert manifest["spec"] == json.loads(json.dumps(PRESETS["tiny"].__dict__))


def test_same_options_skip_the_build_and_force_rebuilds_identically(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, _digest(weights))
    assert build_tiny_qwen2_5_vl(tiny_dir) == tiny_dir
    assert weights.stat().st_mtime_ns == before[0]
    assert main([str(tiny_dir)]) == 0
    assert weights.stat().st_mtime_ns == before[0]
    rebuilt = build_tiny_qwen2_5_vl(tiny_dir, force=True)
    assert _digest(rebuilt / "model.safetensors") == before[1]


def test_concurrent_builds_of_one_directory_build_once(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_tiny_qwen2_5_vl(out, vocab=400)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [out, out]
    assert [p.name for p in tmp_path.iterdir() if ".building-" in p.name] == []
    assert json.loads((out / MANIFEST_NAME).read_text())["spec"]["vocab"] == 400


def test_cached_build_keys_directories_by_options(tmp_path: Path, tiny_dir: Path) -> None:
    first = cached_build(tmp_path, preset="tiny", vocab=400)
    assert cached_build(tmp_path, preset="tiny", vocab=400) == first
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    assert _digest(first / "model.safetensors") != _digest(tiny_dir / "model.safetensors")


def test_cli_reports_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([str(tmp_path / "m"), "--heads", "4", "--kv-heads", "3"]) == 2
    assert "multiple of kv_heads" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        build_tiny_qwen2_5_vl(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --- config and tokenizer ------------------------------------------------------------------------


def test_config_shapes_and_special_token_ids(tiny_dir: Path, processor) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    text = getattr(config, "text_config", config)
    spec = PRESETS["tiny"]
    assert text.hidden_size == spec.hidden
    assert text.num_hidden_layers == spec.layers
    assert text.num_attention_heads == spec.heads
    assert text.num_key_value_heads == spec.kv_heads
    assert text.rope_scaling["mrope_section"] == spec.mrope_section
    tokenizer = processor.tokenizer
    assert text.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # Qwen's order, contiguous
    assert 900 <= ids[0] <= spec.vocab


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(processor) -> None:
    tokenizer = processor.tokenizer
    text = "The image shows 3 red cars, ünïcödé and emoji 🙂 next to a tree."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"


def test_chat_template_renders_the_qwen_vision_placeholder(processor) -> None:
    prompt, _ = _chat_inputs(processor, 56, 56, text="What is this?")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    openai_style = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:..."}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    assert (
        processor.apply_chat_template(openai_style, add_generation_prompt=True, tokenize=False)
        == prompt
    )


# --- processor: visual token counts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"),
    [(28, 28), (56, 56), (100, 50), (112, 112), (300, 200), (448, 448), (640, 480)],
)
def test_image_token_count_matches_the_image_size(processor, width: int, height: int) -> None:
    spec = PRESETS["tiny"]
    _, inputs = _chat_inputs(processor, width, height)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    count = int((inputs["input_ids"] == image_token_id).sum())
    grid_t, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    assert (grid_t, grid_h, grid_w) == (1, *spec.image_grid(width, height))
    assert count == spec.image_tokens(width, height)
    assert 4 <= count <= 256  # min/max pixels of the tiny preset: 28²·4 .. 448²


def test_large_max_pixels_gives_a_thousand_visual_tokens(tmp_path: Path) -> None:
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "large", max_pixels=LARGE_MAX_PIXELS)
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    _, inputs = _chat_inputs(processor, 1024, 1024)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    count = int((inputs["input_ids"] == image_token_id).sum())
    assert count == resolve_spec(max_pixels=LARGE_MAX_PIXELS).image_tokens(1024, 1024)
    assert count >= 1000


@pytest.mark.parametrize(
    ("frames", "width", "height", "expected"),
    [
        (2, 448, 448, 256),  # one temporal patch of 16 x 16 merged tokens
        (3, 448, 448, 512),  # an odd frame count is padded to a pair
        (8, 448, 448, 1024),
        (4, 100, 50, 256),  # small frames are scaled up to the video min pixels (128 tokens)
        (4, 640, 480, 782),
        (2, 1792, 1792, 729),  # large frames are scaled down to the video max pixels (768 tokens)
    ],
)
def test_video_token_count_matches_frames_and_size(
    processor, frames: int, width: int, height: int, expected: int
) -> None:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|>?" in prompt
    videos = [make_test_frames(frames, width, height)]
    inputs = processor(text=[prompt], videos=videos, return_tensors="pt")
    video_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    count = int((inputs["input_ids"] == video_token_id).sum())
    assert count == PRESETS["tiny"].video_tokens(frames, width, height) == expected


def test_a_few_frames_are_enough_to_compress_by_default() -> None:
    assert PRESETS["tiny"].video_tokens(4, 448, 448) > HybridKVConfig().min_prompt_tokens


# --- model ---------------------------------------------------------------------------------------


def test_greedy_generate_with_an_image_produces_tokens(processor, model) -> None:
    _, inputs = _chat_inputs(processor, 112, 84)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    new = first[0, prompt_len:]
    assert new.numel() >= 1
    assert torch.equal(first, second)
    assert int(new.max()) < len(processor.tokenizer)


def test_the_image_changes_the_logits(processor, model) -> None:
    logits = []
    for seed in (0, 1):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(
            text=[prompt], images=[make_test_image(56, 56, seed=seed)], return_tensors="pt"
        )
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


# --- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blocks", "noise"])
def test_test_images_are_deterministic_and_sized(kind: str) -> None:
    png = image_png_bytes(37, 23, seed=5, kind=kind)
    assert png == image_png_bytes(37, 23, seed=5, kind=kind)
    assert png != image_png_bytes(37, 23, seed=6, kind=kind)
    assert png.startswith(b"\x89PNG")
    assert make_test_image(37, 23, kind=kind).size == (37, 23)
    assert image_data_url(8, 8) == "data:image/png;base64," + image_base64(8, 8)


def test_one_picture_is_enough_to_compress_by_default() -> None:
    """The documented path (default build, default config) compresses a one-image question."""
    assert PRESETS["tiny"].image_tokens(448, 448) >= HybridKVConfig().min_prompt_tokens
