"""Stage 2: top-down budget allocation over one request's (layer, kv head) pairs.

The request's total ``B`` is fixed by the user's ratio (``budget × N × L × H_kv`` entries: the
byte budget in KV entry-equivalents) or absolute per-head token budget. It is split first between
the two head types (each dynamic head costs ``b_dyn = sink + w + k·C`` entries read per step plus
its chunk index, priced in entries by :mod:`~hybridkv_sglang.policy.byte_cost`), then among
static heads in proportion to their focus size: a head that looked at more keys needs more of
them kept.

Decisions this module pins (and tests check):

* ``sink + window`` is every static head's floor and is always kept. When ``B`` cannot pay for
  the floors of all heads, every static head gets exactly the floor, so the request then keeps
  ``L × H_kv × (sink + w)`` entries, more than ``B``. This is the only case where budgets exceed
  ``B``, and policies never reach it: their geometry scales sink and window down to ``b_mean``.
* When ``B`` cannot pay for the dynamic heads (entries and index) plus every static head's
  floor, the dynamic heads with the smallest ``|U|`` are demoted to static until it can
  (``demote_unaffordable``; the ``all_dynamic`` ablation turns it off and sizes its heads to pay
  for themselves instead). A dynamic head that costs no more than a static head's floor is
  always affordable. The policy makes every head static when a request has nothing to retrieve.
* Otherwise static budgets plus every dynamic head's cost sum to exactly ``B`` (or less, when
  every static head is capped at ``N``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def uniform_head_budget(prompt_len: int, budget: float, budget_tokens: int | None) -> int:
    """``b_mean``: the uniform per-head budget in tokens, in ``[1, N]``.

    ``budget_tokens`` (absolute) wins over the ratio ``budget`` when set; ``budget=1.0`` (or
    ``budget_tokens >= N``) gives ``N``, which keeps every token.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if budget_tokens is not None:
        if budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1 when set, got {budget_tokens}")
        return min(budget_tokens, prompt_len)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget} (1.0 keeps every token)")
    return max(1, min(prompt_len, math.floor(budget * prompt_len + 1e-9)))


def water_fill(weights: Tensor, total: int, lo: int, hi: int) -> Tensor:
    """Integer budgets ``b`` proportional to ``weights``, clamped to ``[lo, hi]``, summing to total.

    Finds ``c`` with ``sum(clamp(c * w, lo, hi)) = total`` by iterative water-filling: each
    iteration shares what is left among the free heads in proportion to their weight, then fixes
    the side whose clamping is known to hold at the solution (caps when the overflow exceeds the
    underflow, floors otherwise). Every iteration fixes at least one head, so it ends within
    ``len(weights) + 1`` iterations; each is a handful of vectorised ops. Fractions are then
    rounded by largest remainder.

    Args:
        weights: ``[n]`` positive float.
        total: entries to share.
        lo, hi: per-head floor and cap, ``0 <= lo <= hi``.

    Returns:
        ``[n]`` int64 on the device of ``weights``. ``sum == total`` when
        ``n*lo <= total <= n*hi``; all ``lo`` when ``total < n*lo``; all ``hi`` when
        ``total > n*hi``.
    """
    if weights.dim() != 1:
        raise ValueError(f"expected weights [n], got {tuple(weights.shape)}")
    if not 0 <= lo <= hi:
        raise ValueError(f"expected 0 <= lo <= hi, got lo={lo}, hi={hi}")
    n = weights.numel()
    device = weights.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if total <= n * lo:
        return torch.full((n,), lo, dtype=torch.int64, device=device)
    if total >= n * hi:
        return torch.full((n,), hi, dtype=torch.int64, device=device)

    w = weights.detach().to("cpu", torch.float64).clamp(min=1e-12)
    x = torch.zeros(n, dtype=torch.float64)
    fixed = torch.zeros(n, dtype=torch.bool)
    for _ in range(n + 1):
        free = ~fixed
        if not bool(free.any()):
            break
        share = w * ((total - float(x[fixed].sum())) / float(w[free].sum()))
        over = free & (share > hi)
        under = free & (share < lo)
        overflow = float((share - hi)[over].sum())
        underflow = float((lo - share)[under].sum())
        if not bool(over.any() or under.any()):
            x[free] = share[free]
            break
        # sum(clamp(share)) = remaining - overflow + underflow: if that is short of the
        # remaining total, c must grow, so every head over its cap now stays capped (and vice
        # versa). On a tie, c is already the solution and both sides are fixed.
        if overflow >= underflow:
            x[over] = float(hi)
            fixed |= over
        if underflow >= overflow:
            x[under] = float(lo)
            fixed |= under
    else:  # pragma: no cover - the loop fixes a head per iteration
        raise AssertionError("water_fill did not converge")

    x = x.clamp(lo, hi)
    b = x.floor().to(torch.int64).clamp(lo, hi)
    frac = x - b.to(torch.float64)
    left = total - int(b.sum())
    if left > 0:  # hand the rounding remainder to the largest fractions with room below the cap
        key = torch.where(b < hi, frac, -1.0)
        grant = torch.argsort(key, descending=True, stable=True)[:left]
        b[grant[key[grant] >= 0]] += 1
    elif left < 0:  # float noise only: take back from the smallest fractions above the floor
        key = torch.where(b > lo, frac, 2.0)
        take = torch.argsort(key, stable=True)[:-left]
        b[take[key[take] <= 1.0]] -= 1
    assert int(b.min()) >= lo and int(b.max()) <= hi, "water_fill left its bounds"
    assert int(b.sum()) <= total, "water_fill overspent"
    return b.to(device)


@dataclass(frozen=True)
class BudgetAllocation:
    """Stage-2 result for one request.

    Attributes:
        is_dynamic: ``[L, H_kv]`` bool, the classification after demoting unaffordable heads.
        budgets: ``[L, H_kv]`` int64, entries each head reads per step (dynamic: ``b_dyn``,
            its chunk index not included).
        total: ``B``, the request's budget in entry-equivalents.
    """

    is_dynamic: Tensor
    budgets: Tensor
    total: int


@dataclass(frozen=True)
class TopDownAllocator:
    """Type level (dynamic heads cost ``b_dyn`` each), then static heads ∝ ``|U|`` (DESIGN §2)."""

    demote_unaffordable: bool = True

    def allocate(
        self,
        focus: Tensor,
        is_dynamic: Tensor,
        *,
        prompt_len: int,
        head_budget: int,
        floor: int,
        dynamic_budget: int,
        dynamic_cost: int | None = None,
    ) -> BudgetAllocation:
        """Budgets for one request's heads.

        Args:
            focus: ``[L, H_kv]`` int64, ``|U|`` per head (the static-head weights).
            is_dynamic: ``[L, H_kv]`` bool from stage 1.
            prompt_len: ``N``, the cap of a static head.
            head_budget: ``b_mean`` tokens; ``B = b_mean × L × H_kv``.
            floor: ``sink + w`` (already clamped to ``N``), kept by every static head.
            dynamic_budget: ``b_dyn``, entries a dynamic head reads per step (``>= 1``).
            dynamic_cost: what a dynamic head costs in entry-equivalents, ``b_dyn`` plus its
                chunk index (default ``b_dyn``: a free index).
        """
        if focus.shape != is_dynamic.shape or focus.dim() != 2:
            raise ValueError(
                f"expected focus and is_dynamic of one shape [L, H_kv], got "
                f"{tuple(focus.shape)} and {tuple(is_dynamic.shape)}"
            )
        if not 0 <= floor <= prompt_len:
            raise ValueError(f"expected 0 <= floor <= prompt_len, got {floor}, N={prompt_len}")
        if dynamic_budget < 1:
            raise ValueError(f"expected dynamic_budget >= 1, got {dynamic_budget}")
        cost = dynamic_budget if dynamic_cost is None else dynamic_cost
        if cost < dynamic_budget:
            raise ValueError(f"expected dynamic_cost >= dynamic_budget, got {cost}")
        n = focus.numel()
        total = head_budget * n
        dynamic = is_dynamic.clone()

        if self.demote_unaffordable:
            n_dyn = int(dynamic.sum())
            extra = cost - floor
            if extra > 0:
                affordable = max(0, (total - n * floor) // extra)
            else:  # costs no more than a static floor: affordable whenever the floors are
                affordable = n if total >= n * floor else 0
            if n_dyn > affordable:
                key = torch.where(dynamic, focus.to(torch.float64), -1.0).flatten()
                keep = torch.argsort(key, descending=True, stable=True)[:affordable]
                kept = torch.zeros(n, dtype=torch.bool, device=focus.device)
                kept[keep] = True
                dynamic &= kept.view_as(dynamic)

        n_dyn = int(dynamic.sum())
        budgets = torch.full_like(focus, dynamic_budget, dtype=torch.int64)
        static = ~dynamic
        budgets[static] = water_fill(
            focus[static].to(torch.float64).clamp(min=1.0),
            total - n_dyn * cost,
            floor,
            prompt_len,
        )
        return BudgetAllocation(is_dynamic=dynamic, budgets=budgets, total=total)
