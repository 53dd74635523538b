"""The chunk index: 8-bit codes still bound the keys, the widest channels are kept, and what it
costs in bytes is what the planner charges."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.policy.byte_cost import ByteCosts
from hybridkv_sglang.policy.chunk_index import chunk_index
from hybridkv_sglang.policy.chunk_retrieval import chunk_bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("channels", [None, 5])
def test_uint8_codes_rounded_outward_still_bound_every_key(
    dtype: torch.dtype, seed: int, channels: int | None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scale = 4 * torch.rand(1, 1, 16, generator=gen) + 0.01
    keys = (torch.randn(203, 3, 16, generator=gen) * scale + torch.randn(16, generator=gen)).to(
        dtype
    )
    q = torch.randn(8, 6, 16, generator=gen)
    kmin, kmax = chunk_bounds(keys, 8)
    index = chunk_index(kmin, kmax, q, channels, "uint8")
    r = 16 if channels is None else channels
    assert index.kmin.dtype == torch.uint8 and index.kmin.shape == (3, 26, r)
    lo, hi = index.dequantized()
    ch = index.channels.to(torch.int64)
    for c in range(26):
        block = keys[c * 8 : (c + 1) * 8].float().transpose(0, 1)  # [H, C, D]
        picked = block.gather(2, ch.unsqueeze(1).expand(-1, block.shape[1], -1))
        assert torch.all(lo[:, c : c + 1] <= picked) and torch.all(picked <= hi[:, c : c + 1])
    # and they are tight: within a code step of the exact bounds
    exact_lo = kmin.float().gather(2, ch.unsqueeze(1).expand(-1, 26, -1))
    step = index.scale.unsqueeze(1)
    assert torch.all(exact_lo - lo <= 2 * step)


def test_kv_precision_over_every_channel_is_the_plain_bound() -> None:
    keys = torch.randn(64, 2, 8, dtype=torch.bfloat16)
    kmin, kmax = chunk_bounds(keys, 16)
    index = chunk_index(kmin, kmax, None, None, "kv")
    assert torch.equal(index.kmin, kmin) and torch.equal(index.kmax, kmax)
    assert index.channels.tolist() == [list(range(8))] * 2
    lo, hi = index.dequantized()
    assert torch.equal(lo, kmin.float()) and torch.equal(hi, kmax.float())


def test_channels_are_the_widest_under_the_window_queries() -> None:
    keys = 0.01 * torch.randn(64, 1, 8)
    keys[:, 0, 2] *= 100  # wide keys, weak queries
    keys[:, 0, 5] *= 30  # narrower keys, strong queries
    q = torch.ones(4, 2, 8)
    q[..., 2] = 0.1
    q[..., 5] = 10.0
    kmin, kmax = chunk_bounds(keys, 16)
    assert chunk_index(kmin, kmax, q, 1, "kv").channels.tolist() == [[5]]
    assert chunk_index(kmin, kmax, q, 2, "kv").channels.tolist() == [[2, 5]]


def test_bad_index_settings_are_refused() -> None:
    kmin, kmax = chunk_bounds(torch.randn(32, 1, 4), 16)
    with pytest.raises(ValueError, match="precision"):
        chunk_index(kmin, kmax, None, None, "int4")
    with pytest.raises(ValueError, match="window's queries"):
        chunk_index(kmin, kmax, None, 2, "kv")


def test_byte_costs() -> None:
    # Qwen2.5-VL-7B shapes: bf16, D 128; 16 uint8 channels
    costs = ByteCosts.of(128, torch.bfloat16, 16, "uint8")
    assert costs.entry_bytes == 512
    assert costs.chunk_bytes == 2 * 16 and costs.head_bytes == 16 * 12
    assert costs.index_bytes(0, 4) == 0
    # 100 chunks: bounds, parameters, room for a candidate per selected chunk in each of 4
    # blocks of 32 (score and id) and the 4 selected ids
    assert costs.scratch_bytes(100, 4) == 8 * 4 * 4 + 4 * 4
    assert costs.scratch_bytes(100, 40) == 8 * 4 * 40 + 4 * 40
    assert costs.index_bytes(100, 4) == 100 * 32 + 192 + 144
    assert costs.index_entries(100, 4) == 7  # 3536 bytes, rounded up to entries of 512
    assert costs.scratch_bytes(3, 8) == 8 * 3 + 4 * 3  # no more selected than there are chunks
    plain = ByteCosts.of(128, torch.bfloat16, None, "kv")
    assert plain.chunk_bytes == 2 * 128 * 2  # the full Quest bound: 1/C of the KV
    with pytest.raises(ValueError, match="bound_channels"):
        ByteCosts(head_dim=8, kv_bytes=2, bound_channels=9, bound_bytes=1)
