"""The prepared device check runs end to end on CPU (--dry-run): the same code the GPU runs,
through the same launcher, at small shapes; every check must pass and every number be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_check_dry_run_passes_and_writes_results(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the launcher's dry run sets it itself
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert result["dry_run"] is True and result["complete"] is True
    names = [c["check"] for c in result["checks"]]
    assert len(names) == 10 and all(c["passed"] for c in result["checks"]), result["checks"]
    assert any("captured hybridkv step" in n for n in names)
    assert any("paged pool (stock)" in n for n in names)
    assert any("captured compact host-tier step" in n for n in names)
    (host,) = result["host_tier"]
    assert host["graph_captured"] is False and host["host_tier_ms"] > 0  # eager on CPU
    assert 0 < host["moved_chunks_per_step"] < host["selected_chunks_per_step"]
    assert [context for context, _ in result["crossover"]] == [256]
    # retrieval over the timed index (8-bit codes over 16 channels) and over plain bounds
    assert [n for n in names if n.startswith("chunk_retrieval")] == [
        "chunk_retrieval compiled vs ref, 16 channels of torch.uint8 bounds",
        "chunk_retrieval compiled vs ref, 128 channels of torch.float32 bounds",
    ]
    assert result["chunk_index"] == {"bound_channels": 16, "bound_precision": "uint8"}
    for row in result["speed"]:
        for key in ("stock_triton_ms", "dense_sdpa_ms", "dense_variant_ms", "hybridkv_ms"):
            assert row[key] > 0, key
        assert row["attention_ms"] > 0 and row["linear_ms"] > 0
        # in place, the retrieval grid sized for the server's context, not this one
        assert row["placement"] == "in_place" and row["max_chunks"] == 256 // 16
        # 256-token prompts: the dynamic heads' prefix, 8 chunks and window exceed the 10 %
        assert 0 < row["read_fraction"] < 1
        moved = row["bytes_per_step"]
        assert set(moved["hybridkv"]) == {
            "retrieval_metadata",
            "kv_entries",
            "row_metadata_indices",
            "split_scratch",
        }
        assert moved["hybridkv"]["kv_entries"] < moved["stock_triton"]["kv_entries"]
        assert set(row["tb_per_s"]) == {"stock_triton", "sdpa", "hybridkv"}
        assert row["projected_ratio"] > 0 and row["projected_ratio_vs_sdpa"] > 0
    assert [r["batch"] for r in result["linear"]] == [1, 2]
    assert result["prefill"]["prefill_ms"] > 0
    assert [r["storage"] for r in result["compression"]] == ["in_place", "compact"]
    for row in result["compression"]:
        assert row["total_ms"] > 0 and row["host_syncs"] > 0 and row["share_of_prefill"] > 0
    assert "paged pool" in result["dense_variant_compares"]
    assert set(result["goals"]) >= {
        "dense_batch_within_2pct",
        "ge_1x_stock_triton_every_shape",
        "ge_1x_sdpa_every_shape",
        "speedup_b8_32k_ge_3",
        "speedup_b32_32k_ge_5",
        "speedup_b1_128k_ge_1_5",
        "projected_ratio_b8_ge_1_3",
        "projected_ratio_b32_ge_2",
        "compression_le_5pct_of_prefill",
    }
    assert result["goals"]["speedup_b8_32k_ge_3"] is None  # not a dry-run shape
    assert (tmp_path / "gpu_check_cpu-dry-run.png").stat().st_size > 0
