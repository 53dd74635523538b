"""The test videos: deterministic frames, and MP4s that SGLang's own video decoder reads back."""

from __future__ import annotations

import base64
import itertools

import numpy as np
import pytest

from hybridkv_sglang.testing.videos import (
    DEFAULT_FPS,
    make_test_frames,
    video_data_url,
    video_mp4_bytes,
)


def test_frames_are_deterministic_sized_and_moving() -> None:
    frames = make_test_frames(6, 90, 60, seed=3)
    assert frames.shape == (6, 60, 90, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, make_test_frames(6, 90, 60, seed=3))
    assert not np.array_equal(frames, make_test_frames(6, 90, 60, seed=4))
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames))


@pytest.mark.parametrize(("frames", "width", "height"), [(0, 8, 8), (2, 0, 8), (2, 8, -1)])
def test_empty_videos_are_refused(frames: int, width: int, height: int) -> None:
    with pytest.raises(ValueError, match="video size must be positive"):
        make_test_frames(frames, width, height)


def test_odd_sides_are_refused_by_the_encoder() -> None:
    with pytest.raises(ValueError, match="must be even"):
        video_mp4_bytes(2, 45, 44)


@pytest.mark.parametrize(("frames", "width", "height"), [(8, 448, 448), (5, 112, 56)])
def test_sglang_decodes_the_mp4_back_to_the_frames(frames: int, width: int, height: int) -> None:
    """Through SGLang's decoder wrapper (torchcodec, else decord), as the server reads a video."""
    from sglang.srt.utils.common import load_video

    mp4 = video_mp4_bytes(frames, width, height, seed=1)
    assert mp4 == video_mp4_bytes(frames, width, height, seed=1)
    decoder = load_video(mp4, use_gpu=False)
    assert len(decoder) == frames
    assert decoder.avg_fps == pytest.approx(DEFAULT_FPS)
    decoded = decoder.get_frames_at(list(range(frames))).astype(np.int16)
    expected = make_test_frames(frames, width, height, seed=1).astype(np.int16)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 6  # lossy codec, shapes and colours intact
    assert np.abs(decoded[1:] - decoded[:-1]).mean() > 6  # and the shapes still move


def test_data_url_carries_the_mp4() -> None:
    url = video_data_url(2, 56, 56)
    prefix = "data:video/mp4;base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix) :]) == video_mp4_bytes(2, 56, 56)
