"""Name -> policy registry, the way SGLang registers attention backends."""

from __future__ import annotations

import dataclasses
from typing import Any

from hybridkv_sglang.policy.adakv import AdaKVPolicy
from hybridkv_sglang.policy.baselines import (
    AllDynamicPolicy,
    AllStaticPolicy,
    SnapKVPolicy,
    StreamingPolicy,
)
from hybridkv_sglang.policy.compressor import CompressionPolicy, HybridKVPolicy
from hybridkv_sglang.policy.flashcache import FlashCachePolicy
from hybridkv_sglang.policy.lookm import LookMPolicy
from hybridkv_sglang.policy.pyramidkv import PyramidKVPolicy

POLICIES: dict[str, type[CompressionPolicy]] = {
    cls.name: cls
    for cls in (
        HybridKVPolicy,
        SnapKVPolicy,
        StreamingPolicy,
        AllStaticPolicy,
        AllDynamicPolicy,
        AdaKVPolicy,
        PyramidKVPolicy,
        FlashCachePolicy,
        LookMPolicy,
    )
}


def build_policy(name: str, **values: Any) -> CompressionPolicy:
    """Build the policy ``name`` from plain hyper-parameter values (``budget=0.1, window=32, ...``).

    Every policy accepts the same fields (those of :class:`CompressionPolicy`); ``None`` values
    are passed through (``budget_tokens=None`` = use the ratio).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    accepted = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - accepted)
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {unknown} for policy {name!r}; expected {sorted(accepted)}"
        )
    return cls(**values)
