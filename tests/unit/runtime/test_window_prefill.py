"""The prefix-match cap that leaves a compressed request's observation window to prefill, on
SGLang's real ``Req`` and multimodal inputs."""

from __future__ import annotations

from array import array

import pytest
from sglang.srt.managers.schedule_batch import (
    Modality,
    MultimodalDataItem,
    MultimodalInputs,
    Req,
)
from sglang.srt.sampling.sampling_params import SamplingParams

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.hooks.scheduler import cap_prefix_for_window
from hybridkv_sglang.runtime.prefill.requests import window_prefix_cap

CONFIG = HybridKVConfig(window=32, min_prompt_tokens=128)


def _req(prompt_len: int, image: tuple[int, int] | None, **kwargs) -> Req:
    req = Req("r", "", array("q", range(prompt_len)), SamplingParams(max_new_tokens=4), **kwargs)
    if image is not None:
        item = MultimodalDataItem(modality=Modality.IMAGE, offsets=[image])
        req.multimodal_inputs = MultimodalInputs(mm_items=[item])
    return req


def _capped(req: Req, prompt_len: int) -> int:
    return cap_prefix_for_window(req._compute_max_prefix_len(prompt_len), req, prompt_len)


@pytest.mark.usefixtures("session")
@pytest.mark.parametrize(
    ("prompt_len", "image", "expected"),
    [
        (400, (10, 265), 400 - 32),  # compressed: the window is prefilled again
        (400, None, 399),  # text only: stays dense, SGLang's own cap
        (100, (10, 60), 99),  # short prompt: stays dense
        (128, (4, 100), 128 - 32),  # exactly min_prompt_tokens
    ],
)
def test_compressed_requests_leave_the_window_to_prefill(prompt_len, image, expected):
    assert _capped(_req(prompt_len, image), prompt_len) == expected


@pytest.mark.usefixtures("session")
def test_a_tighter_cap_of_sglang_wins():
    req = _req(400, (10, 265), return_logprob=True)
    req.logprob_start_len = 200
    assert _capped(req, 400) == 200


def test_servers_without_the_backend_are_untouched():
    assert _capped(_req(400, (10, 265)), 400) == 399


def test_a_disabled_config_never_caps():
    assert window_prefix_cap(400, 255, HybridKVConfig(enabled=False)) is None
    assert window_prefix_cap(400, 255, CONFIG) == 368
