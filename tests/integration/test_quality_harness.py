"""bench/quality.py end to end on CPU: the committed tile-task model served by ``hybridkv-serve``
(full cache = hybridkv with enabled=false, hybridkv at a 20 % budget and its variant with the
design's stage-3 rules), a small question set at K = 16 images, every column filled in,
full-cache accuracy high, the first reply token the same as the full cache's, the two hybridkv
rows compared."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUALITY_MODEL = ROOT / "bench" / "quality_model"


def _load_harness():
    """Import bench/quality.py (bench/ holds scripts, not a package)."""
    name = "bench_quality"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_harness_end_to_end_on_cpu(tmp_path):
    quality = _load_harness()
    out = tmp_path / "quality"
    started = time.monotonic()
    argv = [
        "--model", str(QUALITY_MODEL),
        "--ks", "16",
        "--per-kind", "2",
        "--full", "disabled",
        "--policies", "hybridkv,hybridkv_design",
        "--budgets", "0.2",
        "--out", str(out),
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert quality.main(argv) == 0
    elapsed = time.monotonic() - started

    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == ["full", "hybridkv@0.2", "hybridkv_design@0.2"]
    for row in rows.values():
        assert row["questions"] == result["dataset"]["questions"] >= 8
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert isinstance(row["mean_read_bytes_fraction"], float)
        assert row["requests_with_stats"] == row["questions"]
        # Every scored answer has a token after the first (decoded over the compressed cache).
        assert row["decode_tokens"] >= row["questions"]
        assert isinstance(row["decode_token_accuracy"], float)
    full, compressed = rows["full"], rows["hybridkv@0.2"]
    assert full["accuracy"] >= 0.8, full["wrong_examples"]
    assert full["mean_read_bytes_fraction"] == 1.0
    assert full["compression_outcomes"] == {"disabled": full["questions"]}
    # Every prompt of the set (~340+ tokens) is compressed at min_prompt_tokens 128.
    assert compressed["compression_outcomes"] == {"compressed": compressed["questions"]}
    assert 0.1 < compressed["mean_read_bytes_fraction"] < 0.3
    assert compressed["max_read_bytes_fraction"] <= 0.2 + 0.005
    assert 0 <= compressed["mean_metadata_bytes_fraction"] < compressed["mean_read_bytes_fraction"]
    assert compressed["mean_device_bytes_fraction"] == compressed["mean_read_bytes_fraction"]
    # The first reply token comes from the dense prefill forward: the full cache's, every turn.
    assert compressed["first_token_agreement"] == 1.0
    assert compressed["first_tokens_compared"] >= result["dataset"]["cases"]
    (comparison,) = result["comparisons"]
    assert (comparison["a"], comparison["b"]) == ("hybridkv@0.2", "hybridkv_design@0.2")
    assert comparison["questions"] == full["questions"]
    print(f"harness end to end: {elapsed:.0f} s")
