"""SGLang's Triton decode kernel, staged by bench/device_sglang.py, runs without sglang and
computes hybridkv's folded decode.

The staged copy is imported in a subprocess (``TRITON_INTERPRET=1``) in which every ``sglang``
module must come from the staged folder: a meta-path finder refuses the installed one.

The call convention on the folded view (page size 1; one *row* per (request, kv head)):

    decode_attention_fwd(
        q,              # [R, G, D]  R = B * H_kv rows, G = query heads per kv head; last dim
                        #            contiguous; cast to k_buffer's dtype inside the kernel
        k_buffer,       # [S * H_kv, 1, D] = pool k_buffer[layer] ([S, H_kv, D]) .view(-1, 1, D)
        v_buffer,       # [S * H_kv, 1, Dv] likewise
        o,              # [R, G, Dv] output, any float dtype, last dim contiguous
        kv_indptr,      # [>= R + 1] int32 (int64 works too), row r owns indptr[r]:indptr[r+1]
        kv_indices,     # int32 entries slot * H_kv + h (int64 works too)
        attn_logits,    # [>= R, G, max_kv_splits, Dv] float32, CONTIGUOUS, last dim exactly Dv
        attn_lse,       # [>= R, G, max_kv_splits] float32, CONTIGUOUS (addressed through
                        #            attn_logits' strides divided by Dv)
        num_kv_splits,  # [>= R] int32, each in 1..max_kv_splits
        max_kv_splits,  # int == attn_logits.shape[2]
        sm_scale,       # Python float
        k_scale,        # Python float (1.0 unquantized); multiplied into sm_scale on the host
        v_scale,        # Python float (1.0 unquantized); a scalar kernel argument, not a tensor
    )

G == 1 takes ``decode_attention_fwd_normal``, G > 1 ``decode_attention_fwd_grouped``: both are
checked. A row with no entries comes out NaN (stage 2 divides 0 by 0): callers must not hand the
kernel empty rows, or must overwrite them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridkv_sglang.kernels.sparse_decode import sparse_decode_reference

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("device_sglang", ROOT / "bench" / "device_sglang.py")
device_sglang = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_sglang)
stage_sglang_kernels = device_sglang.stage_sglang_kernels

CHILD = r"""
import importlib.abc
import importlib.machinery
import sys

staged, out_path = sys.argv[1], sys.argv[2]


class OnlyStaged(importlib.abc.MetaPathFinder):
    # sglang and its submodules resolve under the staged folder or not at all
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] != "sglang":
            return None
        where = [staged] if path is None else path
        spec = importlib.machinery.PathFinder.find_spec(fullname, where)
        if spec is None or not str(spec.origin).startswith(staged):
            raise ImportError(f"{fullname} is not staged")
        return spec


sys.meta_path.insert(0, OnlyStaged())
sys.path.insert(0, staged)

import torch
from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton  # noqa: F401

import sglang

assert sglang.__file__.startswith(staged), sglang.__file__
outside = [m.__file__ for n, m in sys.modules.items()
           if n.split(".")[0] == "sglang" and not str(m.__file__).startswith(staged)]
assert not outside, outside

MAX_SPLITS = 4


def case(seed, batch, kv_heads, groups, dim, lengths, splits, index_dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    slots = 4 * max(lengths) + 8
    k_pool = torch.randn(slots, kv_heads, dim, generator=gen)  # one layer of the KV pool
    v_pool = torch.randn(slots, kv_heads, dim, generator=gen)
    rows = batch * kv_heads  # row r = (request r // kv_heads, kv head r % kv_heads)
    q = torch.randn(rows, groups, dim, generator=gen)
    indptr = [0]
    indices = []
    for r, n in enumerate(lengths):
        chosen = torch.randperm(slots, generator=gen)[:n]
        indices += (chosen * kv_heads + r % kv_heads).tolist()
        indptr.append(indptr[-1] + n)
    kv_indptr = torch.tensor(indptr, dtype=index_dtype)
    kv_indices = torch.tensor(indices, dtype=index_dtype)
    o = torch.empty(rows, groups, dim)
    attn_logits = torch.empty(rows, groups, MAX_SPLITS, dim, dtype=torch.float32)
    attn_lse = torch.empty(rows, groups, MAX_SPLITS, dtype=torch.float32)
    num_kv_splits = torch.tensor(splits, dtype=torch.int32)
    sm_scale = dim**-0.5
    decode_attention_fwd(
        q, k_pool.view(-1, 1, dim), v_pool.view(-1, 1, dim), o, kv_indptr, kv_indices,
        attn_logits, attn_lse, num_kv_splits, MAX_SPLITS, sm_scale, 1.0, 1.0,
    )
    return dict(q=q, k=k_pool, v=v_pool, kv_indptr=kv_indptr, kv_indices=kv_indices,
                sm_scale=sm_scale, out=o)


torch.save({
    # grouped path (G > 1), rows of different lengths and per-row split counts
    "grouped": case(0, 2, 2, 4, 64, [37, 150, 5, 64], [4, 1, 2, 4]),
    # normal path (G == 1), head dim not a power of two
    "mha": case(1, 2, 3, 1, 96, [70, 1, 33, 128, 2, 40], [4, 4, 4, 4, 4, 4]),
    "int64 indices": case(2, 2, 2, 4, 64, [37, 150, 5, 64], [4] * 4, torch.int64),
    "empty row": case(3, 1, 2, 4, 64, [0, 50], [4, 4]),
}, out_path)
print("ok")
"""


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_sglang")
    staged = stage_sglang_kernels(tmp / "staged")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(staged.resolve()), str(tmp / "runs.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(tmp / "runs.pt")


def _reference(run):
    dim = run["q"].shape[-1]
    return sparse_decode_reference(
        run["q"],
        run["k"].view(-1, dim),
        run["v"].view(-1, dim),
        run["kv_indptr"].to(torch.int32),
        run["kv_indices"].to(torch.int32),
        run["sm_scale"],
    )


@pytest.mark.parametrize("name", ["grouped", "mha", "int64 indices"])
def test_staged_kernel_matches_reference_on_folded_view(kernel_runs, name):
    run = kernel_runs[name]
    ref = _reference(run)
    err = (run["out"] - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_empty_row_is_nan_and_others_exact(kernel_runs):
    run = kernel_runs["empty row"]
    ref = _reference(run)
    assert torch.isnan(run["out"][0]).all()
    err = (run["out"][1] - ref[1]).abs().max() / ref[1].abs().max()
    assert err < 1e-4


def test_stage_writes_only_the_kernel_files_and_stand_ins(tmp_path):
    root = stage_sglang_kernels(tmp_path) / "sglang"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    assert files == [
        "__init__.py",
        "kernels/__init__.py",
        "kernels/ops/__init__.py",
        "kernels/ops/attention/__init__.py",
        "kernels/ops/attention/decode_attention.py",
        "kernels/ops/attention/metadata.py",
        "kernels/ops/attention/score_mod.py",
        "srt/__init__.py",
        "srt/environ.py",
        "srt/utils.py",
    ]
    environ = (root / "srt" / "environ.py").read_text()
    assert "envs.SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS = _Flag(False)" in environ
    assert sum(p.stat().st_size for p in root.rglob("*.py")) < 1 << 20
