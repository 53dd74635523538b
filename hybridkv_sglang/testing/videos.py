"""Deterministic test videos: frames of moving coloured shapes, as MP4 bytes or a data URL.

Each frame is a dark seeded gradient with a square, a disc and a diamond in seeded colours that move
a little every frame, so consecutive frames (and the two frames Qwen2-VL merges into one temporal
patch) differ. Encoding needs PyAV (``pip install av``); SGLang decodes the result with torchcodec
or decord. The MPEG-4 Part 2 codec is used because every FFmpeg build has its encoder (an H.264
encoder is optional).
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np

DEFAULT_FPS = 2
"""Qwen2.5-VL samples video at 2 frames per second in SGLang, so every frame of a 2-fps video is
used."""


def make_test_frames(frames: int, width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """``[frames, height, width, 3] uint8`` RGB frames that depend only on the arguments."""
    if frames < 1 or width < 1 or height < 1:
        raise ValueError(f"video size must be positive, got {frames} frames of {width}x{height}")
    rng = np.random.default_rng(seed)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    tint = rng.uniform(0.1, 0.35, size=3).astype(np.float32)
    shade = (0.5 + 0.5 * ys / height) * (0.5 + 0.5 * xs / width)  # [height, width]
    background = shade[..., None] * tint  # [height, width, 3] in [0, 0.35]
    colours = rng.uniform(0.5, 1.0, size=(3, 3)).astype(np.float32)
    size = max(1, min(width, height) // 4)
    start = rng.uniform(0.0, 1.0, size=(3, 2)) * (width - size, height - size)
    velocity = rng.uniform(-1.0, 1.0, size=(3, 2)) * size / 2  # pixels per frame
    span = np.maximum(1, (width - size, height - size))
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        # Each shape bounces inside the frame: t * velocity folded into [0, side - size].
        corner = span - np.abs((start + t * velocity) % (2 * span) - span)
        cx, cy = (corner + size / 2).T  # [3] centres
        frame = background.copy()
        square = (np.abs(xs - cx[0]) <= size / 2) & (np.abs(ys - cy[0]) <= size / 2)
        disc = (xs - cx[1]) ** 2 + (ys - cy[1]) ** 2 <= (size / 2) ** 2
        diamond = np.abs(xs - cx[2]) + np.abs(ys - cy[2]) <= size / 2
        for colour, mask in zip(colours, (square, disc, diamond), strict=True):
            frame[mask] = colour
        out[t] = np.clip(255.0 * frame, 0, 255).astype(np.uint8)
    return out


def video_mp4_bytes(
    frames: int, width: int, height: int, *, seed: int = 0, fps: int = DEFAULT_FPS
) -> bytes:
    """The MP4 (MPEG-4 Part 2, yuv420p) encoding of :func:`make_test_frames` at ``fps``."""
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even (yuv420p), got {width}x{height}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: the decoded shapes keep their colours
        for pixels in make_test_frames(frames, width, height, seed=seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def video_data_url(
    frames: int, width: int, height: int, *, seed: int = 0, fps: int = DEFAULT_FPS
) -> str:
    """A ``data:video/mp4;base64,...`` URL, as an OpenAI ``video_url`` content part takes it."""
    encoded = base64.b64encode(video_mp4_bytes(frames, width, height, seed=seed, fps=fps))
    return "data:video/mp4;base64," + encoded.decode("ascii")
