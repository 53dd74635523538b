"""Deterministic test images: a PIL image, PNG bytes, base64 or a data URL of a given pixel size.

The pattern is a smooth colour gradient overlaid with seeded 28x28 colour blocks (the size of one
merged Qwen2-VL visual token), so neighbouring visual tokens differ while the PNG stays small.
``kind="noise"`` gives per-pixel noise instead (large PNGs; every patch unlike every other).

    python -m hybridkv_sglang.testing.images OUT.png [--size 448] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import io
import mimetypes
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

ImageKind = Literal["blocks", "noise"]

BLOCK_PIXELS = 28
"""Side of one colour block: one merged visual token of Qwen2-VL (patch 14, spatial merge 2)."""


def make_test_image(
    width: int, height: int, *, seed: int = 0, kind: ImageKind = "blocks"
) -> Image.Image:
    """An RGB image of ``width`` x ``height`` pixels that depends only on its arguments."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if kind not in ("blocks", "noise"):
        raise ValueError(f"kind must be 'blocks' or 'noise', got {kind!r}")
    rng = np.random.default_rng(seed)
    if kind == "noise":
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels, mode="RGB")
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0.0, 2.0 * np.pi, size=3).astype(np.float32)
    gradient = np.stack(
        [0.5 + 0.5 * np.sin(3.0 * xs + 2.0 * ys + p) for p in phase], axis=-1
    )  # [height, width, 3] in [0, 1]
    blocks_y = -(-height // BLOCK_PIXELS)
    blocks_x = -(-width // BLOCK_PIXELS)
    colours = rng.uniform(0.0, 1.0, size=(blocks_y, blocks_x, 3)).astype(np.float32)
    blocks = np.repeat(np.repeat(colours, BLOCK_PIXELS, axis=0), BLOCK_PIXELS, axis=1)
    blocks = blocks[:height, :width]
    pixels = np.clip(255.0 * (0.5 * gradient + 0.5 * blocks), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def image_png_bytes(width: int, height: int, *, seed: int = 0, kind: ImageKind = "blocks") -> bytes:
    """The PNG encoding of :func:`make_test_image` (byte-identical for identical arguments)."""
    buffer = io.BytesIO()
    make_test_image(width, height, seed=seed, kind=kind).save(buffer, format="PNG")
    return buffer.getvalue()


def image_base64(width: int, height: int, *, seed: int = 0, kind: ImageKind = "blocks") -> str:
    """Base64 of the PNG, as SGLang's ``/generate`` takes it in ``image_data``."""
    return base64.b64encode(image_png_bytes(width, height, seed=seed, kind=kind)).decode("ascii")


def image_data_url(width: int, height: int, *, seed: int = 0, kind: ImageKind = "blocks") -> str:
    """A ``data:image/png;base64,...`` URL, as an OpenAI ``image_url`` content part takes it."""
    return "data:image/png;base64," + image_base64(width, height, seed=seed, kind=kind)


def file_data_url(path: Path) -> str:
    """A data URL of an image or video file, so a server need not see the client's files."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    """Write a square test image, for requests that name an image file."""
    parser = argparse.ArgumentParser(prog="python -m hybridkv_sglang.testing.images")
    parser.add_argument("out", type=Path, help="the image file to write (.png, .jpg, ...)")
    parser.add_argument("--size", type=int, default=448, help="side in pixels (448: 256 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_test_image(args.size, args.size, seed=args.seed).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
