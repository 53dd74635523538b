"""Compressed requests shaped like real plans at a budget, without running a policy.

Real plans at 32K-128K tokens and 28 layers take minutes on a CPU; the decode machinery's cost
depends only on the shapes: per layer, half of the kv heads static (keeping their share of the
budget as sorted positions, the window included) and half dynamic (a resident prefix of one
chunk, top-k chunks of the retrievable ones, the chunk-aligned window, and a chunk index over
``bound_width`` key channels: uint8 codes or values in the bounds dtype). Imports neither SGLang
nor anything CUDA-only, so the device check can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybridkv_sglang.kernels.folded_tables import (
    BOUNDS_START,
    CAND_START,
    CHUNK_BASE,
    DIRECT,
    FIRST_CHUNK,
    FIXED_START,
    NF,
    NUM_CHUNKS,
    NUM_SEL,
    PARAM_ROW,
    POST_LEN,
    POST_START,
    PRE_LEN,
    TAIL_START,
    TOP_START,
)
from hybridkv_sglang.policy.byte_cost import scratch_slots
from hybridkv_sglang.storage.decode_metadata import RequestRows


def synthetic_rows(
    prompt_len: int,
    *,
    layers: int,
    heads: int,
    head_dim: int,
    budget: float = 0.1,
    chunk: int = 16,
    top_k: int = 8,
    window: int = 32,
    gen: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype,
    entry_of: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    random_bounds: bool = True,
    bound_width: int | None = None,
) -> RequestRows:
    """One request's decode rows reading about ``budget`` of its prompt per step.

    ``dtype``: the chunk bounds' (``torch.uint8``: codes with random offsets and scales per
    channel; else values, offset 0 and scale 1), over ``bound_width`` random key channels
    (default ``head_dim``: every channel, in order).
    ``entry_of(head, positions)``: when given, the prompt is read through folded entries of
    its own (``DIRECT`` rows, as compact storage lays them out) instead of ``req_to_token``.
    ``random_bounds=False``: for callers that never read the chunk bounds, ``kmin``/``kmax``
    are one zero row expanded and every dynamic row shares one parameter row (zero stride: no
    memory, no random draws; ``gen`` then draws only the static heads' positions).
    """
    width = bound_width or head_dim
    codes = dtype == torch.uint8
    first = 1
    tail_start = (prompt_len - window) // chunk * chunk
    num_chunks = tail_start // chunk - first
    dynamic_read = first * chunk + top_k * chunk + prompt_len - tail_start
    dynamic_heads = heads // 2
    static_keep = int(
        (budget * prompt_len * heads - dynamic_heads * dynamic_read) / (heads - dynamic_heads)
    )
    static_keep = max(window, min(prompt_len, static_keep))
    meta = torch.zeros(layers, heads, NF, dtype=torch.int32)
    values, kmins, kmaxs, channels, affines = [], [], [], [], []
    used = bounds = params = candidates = tops = 0
    row_candidates, row_tops = scratch_slots(num_chunks, top_k)
    for layer in range(layers):
        for h in range(heads):
            row = meta[layer, h]
            if h < dynamic_heads:
                row[NUM_SEL], row[NUM_CHUNKS], row[FIRST_CHUNK] = top_k, num_chunks, first
                row[BOUNDS_START], row[PARAM_ROW] = bounds, params
                row[CAND_START], row[TOP_START] = candidates, tops
                candidates += row_candidates
                tops += row_tops
                if random_bounds:
                    lo, hi = _random_bounds(num_chunks, width, codes, gen, device)
                    kmins.append(lo.to(dtype))
                    kmaxs.append(hi.to(dtype))
                    channels.append(_random_channels(head_dim, width, gen, device))
                    affines.append(_random_affine(width, codes, gen, device))
                    params += 1
                bounds += num_chunks
                row[FIXED_START], row[PRE_LEN] = used, first * chunk
                if entry_of is None:
                    row[TAIL_START] = tail_start
                    values.append(torch.arange(first * chunk, device=device))
                    used += first * chunk
                    continue
                values.append(entry_of(h, torch.arange(prompt_len, device=device)))
                row[POST_START], row[POST_LEN] = used + tail_start, prompt_len - tail_start
                row[CHUNK_BASE], row[TAIL_START], row[DIRECT] = used, prompt_len, 1
                used += prompt_len
                continue
            body = prompt_len - window
            picked = torch.randperm(body, generator=gen, device=device)[: static_keep - window]
            kept = torch.cat([picked.sort().values, torch.arange(body, prompt_len, device=device)])
            values.append(kept if entry_of is None else entry_of(h, kept))
            row[FIXED_START], row[PRE_LEN], row[TAIL_START] = used, kept.numel(), prompt_len
            row[DIRECT] = int(entry_of is not None)
            used += kept.numel()
    fixed = torch.cat(values).to(torch.int32)
    if random_bounds:
        kmin, kmax = torch.cat(kmins), torch.cat(kmaxs)
        channel_ids, affine = torch.stack(channels), torch.stack(affines)
    else:
        kmin = kmax = torch.zeros(1, width, dtype=dtype, device=device).expand(bounds, width)
        channel_ids = torch.arange(width, dtype=torch.int32, device=device).unsqueeze(0)
        affine = _identity_affine(width, device).unsqueeze(0)
    return RequestRows(
        meta, fixed, kmin, kmax, channel_ids, affine, prompt_len=prompt_len, chunk_size=chunk
    )


def _random_bounds(
    count: int, width: int, codes: bool, gen: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` ``[count, width]`` with ``hi >= lo``: codes in ``[0, 255]`` or floats."""
    if codes:
        lo = torch.randint(0, 192, (count, width), generator=gen, device=device)
        return lo, lo + torch.randint(0, 64, (count, width), generator=gen, device=device)
    lo = torch.randn(count, width, generator=gen, device=device)
    return lo, lo + torch.rand(count, width, generator=gen, device=device)


def _random_channels(
    head_dim: int, width: int, gen: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """``[width]`` int32 distinct key channels, ascending (all of them, in order, at full width)."""
    if width == head_dim:
        return torch.arange(head_dim, dtype=torch.int32, device=device)
    picked = torch.randperm(head_dim, generator=gen, device=device)[:width]
    return picked.sort().values.to(torch.int32)


def _random_affine(
    width: int, codes: bool, gen: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """``[2, width]`` float32 offsets and scales: random for codes, else 0 and 1."""
    if not codes:
        return _identity_affine(width, device)
    offset = torch.randn(width, generator=gen, device=device)
    return torch.stack([offset, torch.rand(width, generator=gen, device=device) / 64])


def _identity_affine(width: int, device: torch.device | str) -> torch.Tensor:
    return torch.stack([torch.zeros(width, device=device), torch.ones(width, device=device)])
