"""A request's compression at prefill end waits on the device a fixed number of times, whatever
the model's depth and width: no loop over layers or heads reads a device value
(bench/compression_cost.py runs the runtime's stages; on a CPU every value read is counted,
host mirrors included, so this is an upper bound of the syncs a GPU sees)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _compression_cost() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "compression_cost", ROOT / "bench" / "compression_cost.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("storage", ["in_place", "compact"])
def test_host_syncs_do_not_grow_with_layers_or_heads(storage):
    cost = _compression_cost()
    counts = {}
    for layers, kv_heads in [(2, 2), (4, 2), (2, 8)]:
        prompt = cost.synthetic_prompt(512, layers, kv_heads, 2 * kv_heads, 32, "cpu", torch.float)
        compressor = cost.Compressor.setup(prompt, storage)
        counter = cost.count_syncs(compressor)
        assert compressor.meta.live_requests == 1  # registered, replacing the setup's record
        counts[(layers, kv_heads)] = counter.counts
    assert len({tuple(sorted(c.items())) for c in counts.values()}) == 1, counts
    assert 0 < sum(counts[(2, 2)].values()) <= 64, counts


def test_counter_sees_scalar_reads_and_value_sized_ops():
    cost = _compression_cost()
    x = torch.arange(6)
    with cost.HostSyncCounter("cpu") as counter:
        int(x.sum())
        x[x > 2]
        x.nonzero()
        x.repeat_interleave(torch.full((6,), 2))
        x.repeat_interleave(torch.full((6,), 2), output_size=12)  # sized on the host: no sync
    assert counter.counts == {
        "_local_scalar_dense": 1,
        "index (bool mask)": 1,
        "nonzero": 1,
        "repeat_interleave": 1,
    }
    with cost.HostSyncCounter("cuda") as counter:
        int(x.sum())  # a host tensor: no device to wait for
    assert counter.total == 0
