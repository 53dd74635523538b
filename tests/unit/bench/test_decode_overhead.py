"""bench/decode_overhead.py --quick runs end to end on CPU (Triton interpreter) and writes every
row of the schema; a batch with nothing compressed costs outside the graph what stock costs.
bench/synthetic_rows.py's zero-stride bounds (what the benchmark uses) keep the plan's shape."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridkv_sglang.kernels.folded_tables import NF, PARAM_ROW

ROOT = Path(__file__).resolve().parents[3]
ROW_FIELDS = {
    "system": str,
    "batch_kind": str,
    "batch": int,
    "context": int,
    "ops_outside_graph": int,
    "launches_outside_graph": int,
    "ops_per_layer_in_graph": (int, float),
    "host_us": float,
    "table_bytes": int,
}


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("decode_overhead") / "decode_overhead.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "decode_overhead.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def _rows(result: dict) -> dict[tuple[str, str, int], dict]:
    return {(r["system"], r["batch_kind"], r["batch"]): r for r in result["rows"]}


def test_schema(result):
    assert isinstance(result["machine"], str) and result["context"] == 32768
    rows = _rows(result)
    assert set(rows) == {
        (s, k, b) for s in ("hybridkv", "stock") for k in ("compressed", "dense") for b in (1, 8)
    }
    for row in rows.values():
        for name, kind in ROW_FIELDS.items():
            assert isinstance(row[name], kind), (name, row[name])
        assert row["context"] == 32768 and row["host_us"] > 0 and row["table_bytes"] > 0
        assert row["ops_per_layer_in_graph"] > 0
    for name in (
        "ops_outside_le_stock_plus_5_every_batch",
        "dense_batch_ops_outside_equal_stock",
        "table_bytes_le_2x_stock_kv_indices",
    ):
        assert isinstance(result["goals"][name], bool)
    assert result["validation"]["passed"], result["validation"]


def test_compressed_batch_launches_nothing_outside_the_graph(result):
    for (system, kind, _), row in _rows(result).items():
        if (system, kind) == ("hybridkv", "compressed"):
            assert row["launches_outside_graph"] == 0 and row["graph_variant"] == "hybridkv"


def test_dense_batch_costs_what_stock_costs_when_nothing_is_compressed(result):
    rows = _rows(result)
    for batch in (1, 8):
        hybrid, stock = rows["hybridkv", "dense", batch], rows["stock", "dense", batch]
        assert hybrid["graph_variant"] == "dense"
        assert hybrid["ops_outside_graph_idle"] == stock["ops_outside_graph"]
        assert hybrid["launches_outside_graph"] == stock["launches_outside_graph"]
        assert hybrid["ops_per_layer_in_graph"] == stock["ops_per_layer_in_graph"]


def test_goals_on_ops_and_table_bytes(result):
    goals = result["goals"]
    assert goals["launches_per_layer_in_graph_le_3"]
    assert goals["ops_outside_le_stock_plus_5_every_batch"]
    assert goals["ops_outside_same_at_batch_1_and_8"]
    assert goals["table_bytes_le_2x_stock_kv_indices"], goals["table_bytes_ratio"]


def test_dense_batch_with_compressed_requests_alive_runs_stocks_ops(result):
    """The pool rows come from SGLang's own host mirror (no tensor made, no loop over requests)
    and the lookup holds while the batch stays: stock's ops, nothing more."""
    rows = _rows(result)
    for batch in (1, 8):
        hybrid, stock = rows["hybridkv", "dense", batch], rows["stock", "dense", batch]
        assert hybrid["ops_outside_graph"] == stock["ops_outside_graph"], hybrid[
            "ops_outside_graph_detail"
        ]
    assert result["goals"]["dense_batch_ops_outside_equal_stock"]


def test_synthetic_rows_zero_stride_bounds_keep_the_plan_shape():
    spec = importlib.util.spec_from_file_location(
        "synthetic_rows", ROOT / "bench" / "synthetic_rows.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = {"layers": 2, "heads": 4, "head_dim": 8, "device": "cpu", "dtype": torch.bfloat16}
    rows = [
        module.synthetic_rows(
            1024, gen=torch.Generator().manual_seed(0), random_bounds=random, **shape
        )
        for random in (True, False)
    ]
    drawn, zero = rows
    shared = torch.arange(NF) != PARAM_ROW  # zero-stride rows share one parameter row
    assert torch.equal(drawn.meta[..., shared], zero.meta[..., shared])
    assert not zero.meta[..., PARAM_ROW].any()
    assert drawn.fixed_values.shape == zero.fixed_values.shape
    assert zero.kmin.shape == drawn.kmin.shape and zero.kmax.shape == drawn.kmax.shape
    assert zero.kmin.stride() == (0, 1) and not zero.kmin.any()
    assert drawn.kmin.stride() == (8, 1) and bool((drawn.kmax >= drawn.kmin).all())
    # one parameter row per dynamic row (half the heads), or one shared by all
    assert drawn.bound_channels.shape == (4, 8) and zero.bound_channels.shape == (1, 8)
    assert torch.equal(drawn.bound_affine[:, 0], torch.zeros(4, 8))
    assert torch.equal(drawn.bound_affine[:, 1], torch.ones(4, 8))
    codes = module.synthetic_rows(
        1024,
        gen=torch.Generator().manual_seed(0),
        bound_width=3,
        **(shape | {"dtype": torch.uint8}),
    )
    assert codes.kmin.dtype == torch.uint8 and codes.kmin.shape == (drawn.kmin.shape[0], 3)
    assert bool((codes.kmax >= codes.kmin).all()) and bool((codes.bound_affine[:, 1] > 0).all())
    assert bool((codes.bound_channels.diff(dim=1) > 0).all()) and codes.bound_channels.max() < 8
