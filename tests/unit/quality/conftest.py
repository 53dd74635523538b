"""Fixtures for the quality benchmark's parts: the bench scripts as modules, the committed model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
QUALITY_MODEL = ROOT / "bench" / "quality_model"


def load_bench_module(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def quality_bench() -> ModuleType:
    return load_bench_module("quality")


@pytest.fixture(scope="session")
def train_script() -> ModuleType:
    return load_bench_module("train_quality_model")


@pytest.fixture(scope="session")
def quality_processor():
    """The committed checkpoint's processor (tokenizer with the task words, chat template)."""
    transformers = pytest.importorskip("transformers")
    if not (QUALITY_MODEL / "tokenizer.json").is_file():
        pytest.fail(f"{QUALITY_MODEL} holds no tokenizer; run bench/train_quality_model.py")
    return transformers.AutoProcessor.from_pretrained(QUALITY_MODEL)
