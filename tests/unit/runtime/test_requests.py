"""Visual spans from SGLang's multimodal items, and which requests stay dense."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.prefill.requests import PrefillEnd, dense_reason, visual_spans_of


@dataclass
class Item:  # the two fields of sglang's MultimodalDataItem that spans are read from
    offsets: list[tuple[int, int]]


@dataclass
class MMInput:
    mm_items: list[Item]


@pytest.mark.parametrize(
    ("offsets", "prompt_len", "expected"),
    [
        ([[(4, 19)]], 30, ((4, 20),)),  # inclusive -> half-open
        ([[(4, 19)], [(22, 37)]], 50, ((4, 20), (22, 38))),
        ([[(22, 37)], [(4, 19)]], 50, ((4, 20), (22, 38))),  # sorted
        ([[(4, 9), (10, 19)]], 30, ((4, 20),)),  # adjacent ranges merge
        ([[(4, 40)]], 30, ((4, 30),)),  # clipped to the prompt
        ([], 30, ()),
    ],
)
def test_visual_spans_from_inclusive_offsets(offsets, prompt_len, expected):
    mm_input = MMInput([Item(o) for o in offsets])
    assert visual_spans_of(mm_input, prompt_len) == expected


def test_no_multimodal_input_has_no_spans():
    assert visual_spans_of(None, 10) == ()


def _end(prompt_len: int, spans: tuple[tuple[int, int], ...]) -> PrefillEnd:
    return PrefillEnd(0, "r", 1, prompt_len, 0, 0, spans)


@pytest.mark.parametrize(
    ("config", "request_", "reason"),
    [
        (HybridKVConfig(), _end(1000, ((10, 500),)), None),
        (HybridKVConfig(enabled=False), _end(1000, ((10, 500),)), "disabled"),
        (HybridKVConfig(), _end(1000, ()), "no_visual_tokens"),
        (HybridKVConfig(visual_only=False), _end(1000, ()), None),
        (HybridKVConfig(), _end(100, ((10, 50),)), "short_prompt"),
        (HybridKVConfig(min_prompt_tokens=0), _end(30, ((10, 20),)), "short_prompt"),
    ],
)
def test_dense_reason(config, request_, reason):
    assert dense_reason(request_, config) == reason
