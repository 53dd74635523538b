"""Compression of the requests whose last prefill chunk runs in this forward.

Each layer, after its dense attention, hands the policy the request's window queries and the
prompt keys read from the pool (all of ``[0, N)`` is there at the last chunk, prefix hits and
earlier chunks included). After the last layer the policy plans, and the plan becomes the
request's decode layout. A failure is contained to its request: it stays dense and the reason
is logged and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridkv_sglang.policy import CompressionPolicy, LayerObservation
from hybridkv_sglang.runtime.requests import PrefillEnd
from hybridkv_sglang.runtime.stats import RequestStats
from hybridkv_sglang.runtime.window_queries import WindowQueryTails
from hybridkv_sglang.storage.compressed_layout import CompressedLayout

logger = logging.getLogger(__name__)


@dataclass
class PrefillOutcome:
    """What became of one request at its prefill end."""

    request: PrefillEnd
    dense_reason: str | None
    policy: CompressionPolicy
    """The server's policy at this request's own budget (``custom_params``), or the server's."""
    observations: list[LayerObservation] = field(default_factory=list)
    layout: CompressedLayout | None = None
    plan_stats: dict[str, Any] = field(default_factory=dict)
    window_rows: int = 0

    def fail(self, err: Exception) -> None:
        self.dense_reason = "compression_error"
        self.observations = []
        self.layout = None
        logger.warning(
            "hybridkv: compression of %s failed, serving it dense: %r", self.request.rid, err
        )

    def stats(self) -> RequestStats:
        r = self.request
        return RequestStats(
            rid=r.rid,
            prompt_tokens=r.prompt_len,
            visual_tokens=r.visual_tokens,
            visual_spans=list(r.visual_spans),
            prefill_chunks=0,
            compressed=self.layout is not None,
            dense_reason=self.dense_reason,
            static_heads=self.plan_stats.get("static_heads", 0),
            dynamic_heads=self.plan_stats.get("dynamic_heads", 0),
            kept_entries=self.plan_stats.get("kept_entries", 0),
            prompt_entries=self.plan_stats.get("dense_entries", 0),
            read_fraction=1.0 if self.layout is None else self.layout.read_fraction,
            window_rows=self.window_rows,
            extra={"policy": self.plan_stats.get("policy"), "budget": self.policy.budget}
            if self.plan_stats
            else {},
        )

    def summary(self) -> str:
        r = self.request
        head = f"{r.rid} prefill end, {r.prompt_len} prompt tokens ({r.visual_tokens} visual)"
        if self.layout is None:
            return f"{head}, dense: {self.dense_reason}"
        s = self.plan_stats
        return (
            f"{head}, compressed by {s['policy']}: {s['static_heads']} static / "
            f"{s['dynamic_heads']} dynamic heads, {s['kept_entries']} of {s['dense_entries']} "
            f"entries resident, {self.layout.read_fraction:.1%} of the prompt KV read per step"
        )


class PrefillCompression:
    """Per-forward driver: observe every layer, then plan each eligible request."""

    def __init__(
        self,
        requests: Sequence[tuple[PrefillEnd, str | None, CompressionPolicy]],
        num_layers: int,
        window_tails: WindowQueryTails | None = None,
    ) -> None:
        """``requests``: each with why it stays dense (``None``: compress it) and its policy;
        ``window_tails``: earlier chunks' window queries (the last chunk may be short)."""
        self.num_layers = num_layers
        self.window_tails = window_tails
        self.outcomes = [PrefillOutcome(*request) for request in requests]

    def observe(
        self,
        layer: Any,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        req_to_token: torch.Tensor,
        v_buffer: torch.Tensor | None = None,
    ) -> None:
        """Reduce one layer for every eligible request.

        Args:
            layer: SGLang's ``RadixAttention`` (``layer_id``, ``scaling``).
            q: ``[T, H_q, D]`` this forward's queries (after RoPE), requests back to back.
            k_buffer: ``[slots, H_kv, D]`` the layer's key pool.
            req_to_token: ``[P, ctx]`` int32 request-to-slot map.
            v_buffer: ``[slots, H_kv, D]`` the layer's value pool; gathered only for a policy
                with ``needs_values`` (which fails its requests, served dense, without it).
        """
        for outcome in self.outcomes:
            if outcome.dense_reason is not None:
                continue
            r, policy = outcome.request, outcome.policy
            try:
                rows = q[r.query_start : r.query_start + r.extend_len]
                if self.window_tails is None:
                    q_window = rows[-policy.window :]
                else:
                    q_window = self.window_tails.window_queries(r, layer.layer_id, rows)
                slots = req_to_token[r.req_pool_idx, : r.prompt_len].to(torch.int64)
                values = {}
                if policy.needs_values:
                    if v_buffer is None:
                        raise ValueError(
                            f"policy {policy.name!r} needs the value pool at prefill end"
                        )
                    values["values"] = v_buffer[slots]
                outcome.window_rows = int(q_window.shape[0])
                outcome.observations.append(
                    policy.observe_layer(
                        layer.layer_id, q_window, k_buffer[slots], layer.scaling, **values
                    )
                )
            except Exception as err:  # contained: this request stays dense
                outcome.fail(err)

    def finish(self, device: torch.device) -> list[PrefillOutcome]:
        """Plan every request observed on all layers; returns one outcome per request."""
        for outcome in self.outcomes:
            if outcome.dense_reason is not None:
                continue
            try:
                if len(outcome.observations) != self.num_layers:
                    raise RuntimeError(
                        f"observed {len(outcome.observations)} of {self.num_layers} layers"
                    )
                is_text = _text_mask(outcome.request, device)
                plan = outcome.policy.finalize(outcome.observations, is_text)
                outcome.layout = CompressedLayout.from_plan(plan, device)
                outcome.plan_stats = plan.stats()
            except Exception as err:  # contained: this request stays dense
                outcome.fail(err)
            outcome.observations = []
        return self.outcomes


def _text_mask(request: PrefillEnd, device: torch.device) -> torch.Tensor:
    """``[N]`` bool, True for text tokens (not inside a visual span)."""
    is_text = torch.ones(request.prompt_len, dtype=torch.bool, device=device)
    for start, end in request.visual_spans:
        is_text[start:end] = False
    return is_text
