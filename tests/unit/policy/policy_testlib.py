"""Shared builders for the policy tests: planted attention structure, naive references."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_window_attention(q_window: Tensor, keys: Tensor, sm_scale: float) -> Tensor:
    """Row-by-row, head-by-head masked softmax in float64: the definition, no batching."""
    w, num_q, _ = q_window.shape
    n, num_kv, _ = keys.shape
    group = num_q // num_kv
    out = torch.zeros(num_kv, w, n, dtype=torch.float64)
    for h in range(num_kv):
        for g in range(group):
            qh = q_window[:, h * group + g].double()
            for i in range(w):
                visible = n - w + i + 1
                logits = keys[:visible, h].double() @ qh[i] * sm_scale
                out[h, i, :visible] += torch.softmax(logits, dim=0) / group
    return out


def smallest_set_size(row: list[float], theta: float) -> int:
    """Hand count: how many of the largest weights are needed to reach theta of the row's mass."""
    total = sum(row)
    acc, count = 0.0, 0
    for v in sorted(row, reverse=True):
        if acc >= theta * total:
            break
        acc += v
        count += 1
    return count


def planted_layer(
    n: int,
    window: int,
    head_targets: list[list[list[int]]],
    *,
    dim: int = 64,
    group: int = 1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Queries and keys whose window attention sits on chosen keys.

    ``head_targets[h][i]`` lists the key positions window row ``i`` of kv head ``h`` attends
    (almost all its mass, split evenly). The targets of a head get orthonormal random
    directions; the row's query is the sum of its targets' directions. With ``sm_scale = 1`` the
    target logits are ~12 above the rest, so each row puts > 0.99 of its mass on its targets.

    Returns:
        ``q_window [window, H_kv * group, dim]`` and ``keys [n, H_kv, dim]`` float32.
    """
    gen = torch.Generator().manual_seed(seed)
    num_kv = len(head_targets)
    keys = 0.05 * torch.randn(n, num_kv, dim, generator=gen)
    q = torch.zeros(window, num_kv * group, dim)
    for h, rows in enumerate(head_targets):
        assert len(rows) == window
        targets_of_head = sorted({p for targets in rows for p in targets})
        assert len(targets_of_head) <= dim, "orthonormal directions need dim >= targets"
        basis, _ = torch.linalg.qr(torch.randn(dim, len(targets_of_head), generator=gen))
        directions = {p: basis[:, j] for j, p in enumerate(targets_of_head)}
        for p in targets_of_head:
            keys[p, h] = 3.0 * directions[p]
        for i, targets in enumerate(rows):
            qi = sum(directions[p] for p in targets) * 4.0
            q[i, h * group : (h + 1) * group] = qi
    return q, keys


def dense_attention(q: Tensor, keys: Tensor, values: Tensor, sm_scale: float) -> Tensor:
    """``q [G, D]``, ``keys/values [n, D]`` -> ``[G, D]`` plain softmax attention (float64)."""
    p = torch.softmax(q.double() @ keys.double().T * sm_scale, dim=-1)
    return p @ values.double()


def inv_sqrt(d: int) -> float:
    return 1.0 / math.sqrt(d)
