"""Compression of the requests whose last prefill chunk runs in this forward.

Each layer, after its dense attention, hands the policy the request's window queries and the
prompt keys read from the pool (all of ``[0, N)`` is there at the last chunk, prefix hits and
earlier chunks included). After the last layer the policy plans, and the plan becomes the
request's decode layout. A failure is contained to its request: it stays dense and the reason
is logged and counted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridkv_sglang.policy import CompressionPolicy, LayerObservation
from hybridkv_sglang.policy.sharding import assemble_heads
from hybridkv_sglang.runtime.prefill.requests import PrefillEnd
from hybridkv_sglang.runtime.prefill.tensor_parallel import AttentionTP
from hybridkv_sglang.runtime.session.stats import RequestStats
from hybridkv_sglang.runtime.session.window_queries import WindowQueryTails
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
    """The plan's stats over every kv head of the model (all attention-TP ranks)."""
    window_rows: int = 0
    window_queries: list[torch.Tensor] = field(default_factory=list)
    """Replicated kv heads: each layer's window queries until the query group is gathered."""

    def fail(self, err: Exception) -> None:
        self.dense_reason = "compression_error"
        self.observations = []
        self.window_queries = []
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
            prompt_bytes=self.plan_stats.get("dense_bytes", 0),
            read_bytes_per_step=self.plan_stats.get("read_bytes_per_step", 0),
            index_bytes=self.plan_stats.get("index_bytes", 0),
            read_fraction=1.0 if self.layout is None else self.plan_stats["read_fraction"],
            read_entries_fraction=self.plan_stats.get("read_entries_fraction", 1.0),
            index_fraction=self.plan_stats.get("index_fraction", 0.0),
            device_fraction=self.plan_stats.get("device_fraction_in_place", 1.0),
            budget_fraction=1.0 if self.layout is None else self.plan_stats["budget_fraction"],
            over_budget=self.layout is not None and self.plan_stats["over_budget"],
            window_rows=self.window_rows,
            extra={
                "policy": self.plan_stats.get("policy"),
                "budget": self.policy.budget,
                "plan_digest": self.plan_stats.get("plan_digest"),
                "device_fraction_compact": self.plan_stats.get("device_fraction_compact"),
                "host_fraction_compact": self.plan_stats.get("host_fraction_compact"),
            }
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
            f"entries resident, {s['read_fraction']:.1%} of the prompt KV bytes read per step "
            f"({s['index_fraction']:.1%} chunk index)"
        )


class PrefillCompression:
    """Per-forward driver: observe every layer, then plan each eligible request."""

    def __init__(
        self,
        requests: Sequence[tuple[PrefillEnd, str | None, CompressionPolicy]],
        num_layers: int,
        window_tails: WindowQueryTails | None = None,
        tp: AttentionTP | None = None,
    ) -> None:
        """``requests``: each with why it stays dense (``None``: compress it) and its policy;
        ``window_tails``: earlier chunks' window queries (the last chunk may be short);
        ``tp``: the attention-TP group when there are several ranks."""
        self.num_layers = num_layers
        self.window_tails = window_tails
        self.tp = tp
        self.outcomes = [PrefillOutcome(*request) for request in requests]
        self.eligible = [o for o in self.outcomes if o.dense_reason is None]
        """The requests every rank tries to compress (rank-invariant: the collectives run over
        these, whatever failed on one rank)."""
        self._scaling: dict[int, float] = {}

    def observe(
        self,
        layer: Any,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        req_to_token: torch.Tensor,
        v_buffer: torch.Tensor | None = None,
    ) -> None:
        """Reduce one layer for every eligible request (with replicated kv heads: keep its
        window queries, observed at :meth:`finish` with the whole query group).

        Args:
            layer: SGLang's ``RadixAttention`` (``layer_id``, ``scaling``).
            q: ``[T, H_q, D]`` this forward's queries (after RoPE), requests back to back.
            k_buffer: ``[slots, H_kv, D]`` the layer's key pool.
            req_to_token: ``[P, ctx]`` int32 request-to-slot map.
            v_buffer: ``[slots, H_kv, D]`` the layer's value pool; gathered only for a policy
                with ``needs_values`` (which fails its requests, served dense, without it).
        """
        self._scaling[layer.layer_id] = layer.scaling
        deferred = self.tp is not None and self.tp.replicated
        for outcome in self.outcomes:
            if outcome.dense_reason is not None:
                continue
            r = outcome.request
            try:
                if self.tp is not None and self.tp.injects_fault(r.rid):
                    raise RuntimeError(f"fault injected on attention-TP rank {self.tp.rank}")
                rows = q[r.query_start : r.query_start + r.extend_len]
                if self.window_tails is None:
                    q_window = rows[-outcome.policy.window :]
                else:
                    q_window = self.window_tails.window_queries(r, layer.layer_id, rows)
                outcome.window_rows = int(q_window.shape[0])
                if deferred:
                    outcome.window_queries.append(q_window)
                else:
                    outcome.observations.append(
                        _observe(outcome, layer.layer_id, layer.scaling, q_window, k_buffer,
                                 req_to_token, v_buffer)
                    )  # fmt: skip
            except Exception as err:  # contained: this request stays dense
                outcome.fail(err)

    def finish(
        self, device: torch.device, kv_pool: Any = None, req_to_token: torch.Tensor | None = None
    ) -> list[PrefillOutcome]:
        """Plan every request observed on all layers; returns one outcome per request.

        ``kv_pool`` (SGLang's KV pool) and ``req_to_token`` are read again only to observe
        replicated kv heads.
        """
        shard = None
        if self.tp is not None and self.eligible:
            if self.tp.replicated:
                self._observe_replicated(device, kv_pool, req_to_token)
            self._gather_head_stats(device)
            shard = self.tp.shard
        for outcome in self.outcomes:
            if outcome.dense_reason is not None:
                continue
            try:
                if len(outcome.observations) != self.num_layers:
                    raise RuntimeError(
                        f"observed {len(outcome.observations)} of {self.num_layers} layers"
                    )
                is_text = _text_mask(outcome.request, device)
                plan = outcome.policy.finalize(outcome.observations, is_text, shard)
                outcome.layout = CompressedLayout.from_plan(plan, device)
                outcome.plan_stats = plan.reported_stats()
            except Exception as err:  # contained: this request stays dense
                outcome.fail(err)
            outcome.observations = []
        return self.outcomes

    def _observe_replicated(self, device: torch.device, kv_pool: Any, req_to_token: Any) -> None:
        """Replicated kv heads: gather each head's query group from its replicas, then observe
        every layer here (the pool holds every layer's keys at the last layer)."""
        tp = self.tp
        assert tp is not None
        header = torch.tensor(
            [[o.dense_reason is None, o.window_rows] for o in self.eligible],
            dtype=torch.int64,
            device=device,
        )
        headers = torch.stack(tp.all_gather(header)).cpu()  # [ranks, E, 2]
        pending = []
        for i, outcome in enumerate(self.eligible):
            rows = headers[:, i, 1]
            if bool(headers[:, i, 0].all()) and bool((rows == rows[0]).all()):
                pending.append(outcome)
            elif outcome.dense_reason is None:
                outcome.fail(RuntimeError("another attention-TP rank could not observe it"))
        if not pending:
            return
        payload = torch.cat([torch.stack(o.window_queries).flatten() for o in pending])
        parts = tp.all_gather(payload)
        offset = 0
        for outcome in pending:
            shape = torch.stack(outcome.window_queries).shape  # [L, w', H_q local, D]
            size = shape.numel()
            group = [parts[r][offset : offset + size].view(shape) for r in tp.replicas]
            offset += size
            outcome.window_queries = []
            try:
                queries = torch.cat(group, dim=2)  # the kv head's whole query group
                for layer_id in range(self.num_layers):
                    outcome.observations.append(
                        _observe(outcome, layer_id, self._scaling[layer_id], queries[layer_id],
                                 kv_pool.get_key_buffer(layer_id), req_to_token,
                                 kv_pool.get_value_buffer(layer_id))
                    )  # fmt: skip
            except Exception as err:  # contained: this request stays dense (on every rank)
                outcome.fail(err)

    def _gather_head_stats(self, device: torch.device) -> None:
        """Every rank's focus sizes, scores and focus sets of every eligible request (one
        all-gather), so each rank plans over the model's heads; a request any rank failed to
        observe is served dense by all."""
        tp = self.tp
        assert tp is not None
        local = tp.shard.count
        payloads = []
        for outcome in self.eligible:
            payload = torch.zeros(
                2 + self.num_layers * local * (1 + 2 * outcome.request.prompt_len),
                dtype=torch.float32,
                device=device,
            )
            if outcome.dense_reason is None:
                try:
                    _pack_head_stats(payload, outcome.observations)
                except Exception as err:  # contained: sent as "not observed"
                    payload.zero_()
                    outcome.fail(err)
            payloads.append(payload)
        parts = tp.all_gather(torch.cat(payloads))
        offset = 0
        for outcome, payload in zip(self.eligible, payloads, strict=True):
            mine = [part[offset : offset + payload.numel()] for part in parts]
            offset += payload.numel()
            failed = [r for r, p in enumerate(mine) if float(p[0]) == 0.0]
            if failed:
                if outcome.dense_reason is None:
                    outcome.fail(
                        RuntimeError(f"attention-TP rank(s) {failed} could not observe it")
                    )
                continue
            n, layers, entries = (
                outcome.request.prompt_len,
                self.num_layers,
                self.num_layers * local,
            )
            focus = _heads(mine, tp, slice(2, 2 + entries), (layers, local))
            scores = _heads(mine, tp, slice(2 + entries, 2 + entries * (1 + n)), (layers, local, n))
            sets = None
            if float(mine[0][1]) == 1.0:
                sets = _heads(mine, tp, slice(2 + entries * (1 + n), None), (layers, local, n))
            obs = sorted(outcome.observations, key=lambda o: o.layer_id)
            outcome.observations = [
                dataclasses.replace(
                    o,
                    focus_size=focus[i].to(torch.int64),
                    scores=scores[i],
                    focus_set=None if sets is None else sets[i].to(torch.bool),
                )
                for i, o in enumerate(obs)
            ]


def _pack_head_stats(payload: torch.Tensor, observations: list[LayerObservation]) -> None:
    """``payload``: observed flag, has-focus-sets flag, then ``[L, H]`` focus sizes, ``[L, H,
    N]`` scores and ``[L, H, N]`` focus sets (zeros when the policy keeps none), flattened."""
    obs = sorted(observations, key=lambda o: o.layer_id)
    focus = torch.stack([o.focus_size for o in obs]).flatten()
    scores = torch.stack([o.scores for o in obs]).flatten()
    if 2 + focus.numel() + 2 * scores.numel() != payload.numel():
        raise RuntimeError(f"observed {len(obs)} layers of an unexpected shape")
    payload[0] = 1.0
    payload[2 : 2 + focus.numel()] = focus
    payload[2 + focus.numel() : 2 + focus.numel() + scores.numel()] = scores
    if all(o.focus_set is not None for o in obs):
        payload[1] = 1.0
        payload[2 + focus.numel() + scores.numel() :] = torch.stack(
            [o.focus_set for o in obs]  # type: ignore[misc]
        ).flatten()


def _heads(
    parts: list[torch.Tensor], tp: AttentionTP, where: slice, shape: tuple[int, ...]
) -> torch.Tensor:
    """One field of every rank's payload, put together over the model's kv heads (dim 1)."""
    return assemble_heads([p[where].view(shape) for p in parts], tp.shards, dim=1)


def _observe(
    outcome: PrefillOutcome,
    layer_id: int,
    scaling: float,
    q_window: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    v_buffer: torch.Tensor | None,
) -> LayerObservation:
    """The policy's observation of one layer of one request, keys read from the pool."""
    r, policy = outcome.request, outcome.policy
    slots = req_to_token[r.req_pool_idx, : r.prompt_len].to(torch.int64)
    values = {}
    if policy.needs_values:
        if v_buffer is None:
            raise ValueError(f"policy {policy.name!r} needs the value pool at prefill end")
        values["values"] = v_buffer[slots]
    return policy.observe_layer(layer_id, q_window, k_buffer[slots], scaling, **values)


def _text_mask(request: PrefillEnd, device: torch.device) -> torch.Tensor:
    """``[N]`` bool, True for text tokens (not inside a visual span)."""
    is_text = torch.ones(request.prompt_len, dtype=torch.bool, device=device)
    for start, end in request.visual_spans:
        is_text[start:end] = False
    return is_text
