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
    assert result["dry_run"] is True
    names = [c["check"] for c in result["checks"]]
    assert len(names) == 9 and all(c["passed"] for c in result["checks"]), result["checks"]
    assert any("captured hybridkv step" in n for n in names)
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
        assert row["dense_ms"] > 0 and row["hybridkv_ms"] > 0 and row["tables_ms"] > 0
        # 256-token prompts: the dynamic heads' prefix, 8 chunks and window exceed the 10 %
        assert 0 < row["read_fraction"] < 1
    assert set(result["goals"]) >= {"all-dense batch within 2 % of dense"}
    assert (tmp_path / "gpu_check_cpu-dry-run.png").stat().st_size > 0
