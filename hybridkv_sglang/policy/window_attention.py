"""Observation-window attention: how the last ``w`` prompt tokens attend over the whole prompt.

Every later stage (head classification, static-head scores) reads this matrix, so it is computed
exactly once per layer at the end of prefill, from the window's queries and the keys already in
the pool. Only the ``[w, N]`` block is formed, never the ``[N, N]`` prompt attention.
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_attention(q_window: Tensor, keys: Tensor, sm_scale: float) -> Tensor:
    """Attention of the observation window over the prompt, averaged over each GQA group.

    Window row ``i`` is the query at absolute prompt position ``N - w + i``; it sees keys at
    positions ``<= N - w + i`` (causal). Query head ``j`` belongs to kv head ``j // G`` with
    ``G = H_q // H_kv`` (the contiguous grouping of SGLang and HF ``repeat_kv``).

    Args:
        q_window: ``[w, H_q, D]`` float (any float dtype), queries of the last ``w`` prompt tokens
            (RoPE already applied, as the attention layer sees them).
        keys: ``[N, H_kv, D]`` float, the prompt's keys in position order, ``N >= w``.
        sm_scale: softmax scale, normally ``1 / sqrt(D)``.

    Returns:
        ``[H_kv, w, N]`` float32: ``A[h] = mean_g softmax(Q_W K^T * sm_scale)``; every row sums
        to 1 and is zero right of its causal limit.
    """
    if q_window.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            f"expected q_window [w, H_q, D] and keys [N, H_kv, D], got {tuple(q_window.shape)} "
            f"and {tuple(keys.shape)}"
        )
    w, num_q_heads, head_dim = q_window.shape
    n, num_kv_heads, key_dim = keys.shape
    if head_dim != key_dim:
        raise ValueError(f"expected equal head_dim, got q {head_dim} and keys {key_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"expected H_q to be a multiple of H_kv (GQA), got H_q={num_q_heads}, "
            f"H_kv={num_kv_heads}"
        )
    if not 1 <= w <= n:
        raise ValueError(f"expected 1 <= window <= prompt length, got window={w}, N={n}")
    if q_window.device != keys.device:
        raise ValueError(f"expected one device, got q on {q_window.device}, keys on {keys.device}")
    group = num_q_heads // num_kv_heads

    q = q_window.float().view(w, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [H,G,w,D]
    k = keys.float().permute(1, 2, 0)  # [H, D, N]
    logits = torch.matmul(q, k.unsqueeze(1)) * sm_scale  # [H, G, w, N]
    rows = torch.arange(w, device=keys.device) + (n - w)
    cols = torch.arange(n, device=keys.device)
    future = cols.unsqueeze(0) > rows.unsqueeze(1)  # [w, N]
    logits.masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
