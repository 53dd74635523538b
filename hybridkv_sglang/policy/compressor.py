"""The per-request driver: observe each layer at the end of prefill, then make the plan.

The runtime calls :meth:`CompressionPolicy.observe_layer` inside the forward of the request's last
prefill chunk, once per layer, and :meth:`CompressionPolicy.finalize` after the last layer. A
layer is reduced at once to ``O(H_kv · N)`` numbers (focus sizes, pooled scores, chunk bounds),
so no layer's ``[H_kv, w, N]`` window attention outlives its observation.

Every policy (the method and its baselines) runs through the same machinery and differs only in
its hooks: classify (stage 1), allocate (stage 2), select (stage 3a), chunks_per_step (how many
chunks its dynamic heads retrieve) and, for a policy that scores keys without attention,
observe_layer itself. Policies are frozen dataclasses built from plain values, never from
``HybridKVConfig``: every policy accepts the hyper-parameters declared here, plus those its own
class declares, and the config holds them all (``docs/policies.md``).

HybridKV: Hybrid KV Cache Compression for Efficient Multimodal LLM Inference (Zeng et al., 2026,
arXiv:2604.05887): static heads pruned with a text prior, dynamic heads served by chunk retrieval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hybridkv_sglang.policy.allocate import BudgetAllocation, TopDownAllocator, uniform_head_budget
from hybridkv_sglang.policy.byte_cost import ByteCosts
from hybridkv_sglang.policy.chunk_index import BOUND_PRECISIONS, ChunkIndex, chunk_index
from hybridkv_sglang.policy.chunk_retrieval import (
    budget_top_k,
    chunk_bounds,
    dynamic_head_budget,
    resident_mask,
    retrievable_chunk_range,
)
from hybridkv_sglang.policy.classify import DYNAMIC_CAPS, FocusClassifier, dynamic_fraction_cap
from hybridkv_sglang.policy.head_stats import HeadStatsReducer
from hybridkv_sglang.policy.hyperparameters import check_hyperparameters, hyperparameter
from hybridkv_sglang.policy.plan import CompressionPlan
from hybridkv_sglang.policy.registry import register_policy
from hybridkv_sglang.policy.selection import mask_to_csr
from hybridkv_sglang.policy.sharding import HeadShard
from hybridkv_sglang.policy.text_prior import STATIC_PRIORITIES, TextPriorSelector
from hybridkv_sglang.policy.window_attention import window_attention

DYNAMIC_TOP_K = ("fixed", "budget")
_INDEX_PARTS = ("kmin", "kmax", "channels", "offset", "scale")


@dataclass(frozen=True)
class LayerObservation:
    """What one layer leaves behind after :meth:`CompressionPolicy.observe_layer`.

    Attributes:
        layer_id: the layer's index in ``[0, L)``.
        prompt_len: ``N``.
        focus_size: ``[H_kv]`` int64, ``|U|`` per kv head.
        scores: ``[H_kv, N]`` float32, pooled window-attention scores.
        costs: bytes of the layer's KV entries and of a dynamic head's chunk index.
        chunk_index: the heads' chunk index over ``ceil(N / C)`` chunks, or ``None`` when the
            policy never makes dynamic heads.
        focus_set: ``[H_kv, N]`` bool members of ``U``, kept only for
            ``static_priority="focus"``, else ``None``.
    """

    layer_id: int
    prompt_len: int
    focus_size: Tensor
    scores: Tensor
    costs: ByteCosts
    chunk_index: ChunkIndex | None = None
    focus_set: Tensor | None = None


@dataclass(frozen=True)
class Geometry:
    """Request-level sizes shared by every stage (all clamped to the prompt).

    Attributes:
        prompt_len: ``N``.
        window: ``min(window, b_mean)``: the window a static head keeps, never more than a
            head's budget.
        sink: ``min(sink, b_mean - window)``: the floors scale down to the budget, so no request
            reads more than it is entitled to (an observation window of ``window`` rows is
            still scored).
        dynamic_window: ``min(window, dynamic_window_share × b_mean)`` (at least 1): the window
            a dynamic head keeps resident; the rest of its budget retrieves chunks.
        head_budget: ``b_mean`` tokens (``<= N``).
        top_k_chunks: chunks a dynamic head retrieves per decode step in this request
            (:meth:`CompressionPolicy.chunks_per_step`; ``0`` = no head can be dynamic).
        dynamic_budget: ``b_dyn`` entries, read by a dynamic head retrieving ``top_k_chunks``.
        retrievable_chunks: full chunks inside ``[sink, N - dynamic_window)``.
        index_entries: a dynamic head's chunk index in entry-equivalents
            (:meth:`ByteCosts.index_entries`), charged on top of ``dynamic_budget``.
    """

    prompt_len: int
    window: int
    sink: int
    dynamic_window: int
    head_budget: int
    top_k_chunks: int
    dynamic_budget: int
    retrievable_chunks: int
    index_entries: int

    @property
    def floor(self) -> int:
        """``sink + window``: what every static head keeps."""
        return self.sink + self.window

    @property
    def dynamic_cost(self) -> int:
        """What a dynamic head costs the request in entry-equivalents: the entries it reads
        per step and its chunk index."""
        return self.dynamic_budget + self.index_entries


@dataclass(frozen=True)
class CompressionPolicy:
    """Shared machinery and the hyper-parameters every policy accepts (defaults: DESIGN §2 except
    ``static_priority``, ``dynamic_top_k``, ``dynamic_window_share`` and ``dynamic_cap``, see
    ``docs/architecture.md``). Subclasses set the hooks; a subclass's own hyper-parameters are
    fields declared with :func:`hyperparameter` (``docs/policies.md``).
    """

    name: ClassVar[str] = "base"
    needs_chunk_bounds: ClassVar[bool] = True
    merges_evicted: ClassVar[bool] = False
    """Plans ask the runtime to merge evicted KV into kept KV (compact storage only)."""
    demote_unaffordable: ClassVar[bool] = True
    """Stage 2 demotes the dynamic heads ``B`` cannot pay for (see :class:`TopDownAllocator`)."""
    needs_values: ClassVar[bool] = False
    """``observe_layer`` reads the prompt's values; the runtime gathers them only then."""
    benchmarked: ClassVar[bool] = True
    """The benchmarks (``bench/quality.py``, ``quality_diagnosis.py``, ``fidelity.py``) run it by
    default."""

    budget: float = hyperparameter(
        0.1,
        gt=0,
        le=1,
        per_request=True,
        doc="fraction of the prompt's dense KV bytes a request reads per decode step (kept "
        "entries and retrieval metadata, see policy/byte_cost.py); in compact storage also about "
        "what it holds on the device; 1.0 keeps every token",
    )
    budget_tokens: int | None = hyperparameter(
        None,
        ge=1,
        per_request=True,
        doc="absolute per-head budget in tokens; overrides `budget` when set",
    )
    theta: float = hyperparameter(
        0.9, gt=0, le=1, doc="attention mass a window row's focus set must reach"
    )
    window: int = hyperparameter(
        32,
        ge=1,
        doc="observation window: last prompt tokens, kept by every head (at most the per-head "
        "budget of the request: floors scale down with the budget; all `window` rows are "
        "observed)",
    )
    sink: int = hyperparameter(
        4, ge=0, doc="first prompt tokens, kept within what the window leaves of the head budget"
    )
    chunk_size: int = hyperparameter(16, ge=1, doc="tokens per retrieval chunk of dynamic heads")
    top_k_chunks: int = hyperparameter(
        8, ge=1, doc="chunks a dynamic head retrieves per decode step"
    )
    bound_channels: int | None = hyperparameter(
        16,
        ge=1,
        doc="key channels a dynamic head's chunk bounds cover (the r with the largest "
        "query-weighted key range in the observation window; None: all D). The bounds cost "
        "2 x r values per chunk of chunk_size tokens, read every step and held on the device: "
        "r / (D x chunk_size) of the head's KV at kv precision",
    )
    bound_precision: str = hyperparameter(
        "uint8",
        choices=BOUND_PRECISIONS,
        doc="chunk bounds in the KV dtype (kv) or as 8-bit codes rounded outward per "
        "(head, channel) (uint8: 1 byte a value, still a bound; plus 12 bytes of channel id, "
        "offset and scale per bounded channel and head)",
    )
    max_dynamic_fraction: float = hyperparameter(
        0.5,
        ge=0,
        le=1,
        doc="cap on the fraction of (layer, kv head) pairs classified dynamic (at budget 0.1 "
        "when dynamic_cap is budget)",
    )
    pool_kernel: int = hyperparameter(
        7, ge=1, doc="max-pool width smoothing static-head scores (odd)"
    )
    static_priority: str = hyperparameter(
        "focus",
        choices=STATIC_PRIORITIES,
        doc="static heads keep sink + window, then: focus (the head's own focus set first, then "
        "text, then visual tokens) or text (text tokens before visual, the design's text prior); "
        "focus is the default because the text prior spends the small budgets of heads that "
        "attend visual tokens on template text (docs/quality-diagnosis.md)",
    )
    dynamic_top_k: str = hyperparameter(
        "budget",
        choices=DYNAMIC_TOP_K,
        doc="chunks a dynamic head retrieves per step: budget (at most top_k_chunks, capped so a "
        "dynamic head reads no more than the mean per-head budget, at least one chunk) or fixed "
        "(top_k_chunks whatever the budget, the design); see CompressionPolicy.chunks_per_step",
    )
    dynamic_window_share: float = hyperparameter(
        0.25,
        gt=0,
        le=1,
        doc="share of the per-head budget a dynamic head's resident window may take (at most "
        "`window`); the rest retrieves chunks. 1.0: the static heads' window, which under tight "
        "budgets leaves dynamic heads nothing to retrieve",
    )
    dynamic_cap: str = hyperparameter(
        "budget",
        choices=DYNAMIC_CAPS,
        doc="budget: at most max_dynamic_fraction of the heads are dynamic at budget 0.1, more "
        "(up to all) as the budget tightens, in inverse proportion; fixed: max_dynamic_fraction "
        "at every budget (the design)",
    )

    def __post_init__(self) -> None:
        check_hyperparameters(self)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd (centred max-pool), got {self.pool_kernel}")

    @property
    def selection_priority(self) -> str:
        """The static-head priority stage 3a applies (a method may fix its own)."""
        return self.static_priority

    # ----------------------------------------------------------------- driver
    def costs(self, head_dim: int, kv_dtype: torch.dtype) -> ByteCosts:
        """The byte costs of this policy's plans over a KV cache of ``kv_dtype``."""
        return ByteCosts.of(head_dim, kv_dtype, self.bound_channels, self.bound_precision)

    def geometry(self, prompt_len: int, costs: ByteCosts) -> Geometry:
        """Window and sink clamped to the head budget, and the two per-head budgets, for a
        prompt of ``N`` tokens (a dynamic head's chunk index priced by ``costs``)."""
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        head_budget = uniform_head_budget(prompt_len, self.budget, self.budget_tokens)
        window = min(self.window, head_budget)
        sink = min(self.sink, head_budget - window)
        dynamic_window = min(
            window, uniform_head_budget(head_budget, self.dynamic_window_share, None)
        )
        first, end = retrievable_chunk_range(prompt_len, sink, dynamic_window, self.chunk_size)
        # The index's scratch grows with k: fit k to what the index leaves when it selects one
        # chunk, then to what it leaves when it selects that many (never more, so it still fits).
        chunks = end - first
        k = self.chunks_per_step(
            prompt_len, sink, dynamic_window, head_budget - costs.index_entries(chunks, 1)
        )
        k = min(
            k,
            self.chunks_per_step(
                prompt_len, sink, dynamic_window, head_budget - costs.index_entries(chunks, k)
            ),
        )
        index_entries = costs.index_entries(chunks, k)
        return Geometry(
            prompt_len=prompt_len,
            window=window,
            sink=sink,
            dynamic_window=dynamic_window,
            head_budget=head_budget,
            top_k_chunks=k,
            dynamic_budget=dynamic_head_budget(
                prompt_len, sink, dynamic_window, self.chunk_size, k
            ),
            retrievable_chunks=end - first,
            index_entries=index_entries,
        )

    def chunks_per_step(self, prompt_len: int, sink: int, window: int, head_budget: int) -> int:
        """Chunks each dynamic head of one request retrieves per decode step.

        ``head_budget`` is what a dynamic head may read in entries once its chunk index is paid
        (``b_mean`` less :attr:`Geometry.index_entries`). ``"fixed"``: ``top_k_chunks`` whatever
        the budget, so a dynamic head may cost more than ``b_mean`` and the static heads pay the
        difference. ``"budget"``: the same, capped at the most chunks that fit ``head_budget``
        (:func:`budget_top_k`), but at least one; stage 2 still demotes the dynamic heads the
        request cannot pay for.
        """
        if self.dynamic_top_k == "fixed":
            return self.top_k_chunks
        fits = budget_top_k(prompt_len, sink, window, self.chunk_size, head_budget)
        return max(1, min(self.top_k_chunks, fits))

    def observe_layer(
        self,
        layer_id: int,
        q_window: Tensor,
        keys: Tensor,
        sm_scale: float,
        values: Tensor | None = None,
    ) -> LayerObservation:
        """Reduce one layer at the end of prefill.

        Args:
            layer_id: index of the layer in ``[0, L)``.
            q_window: ``[w', H_q, D]`` float, queries of the last ``w'`` prompt tokens; the last
                ``min(w', window)`` rows are the observation window (a last prefill chunk
                shorter than the window gives fewer rows; the kept window is still ``window``).
            keys: ``[N, H_kv, D]`` float, the prompt's keys in position order.
            sm_scale: softmax scale of the layer.
            values: ``[N, H_kv, D]`` float, the prompt's values; read only by policies with
                ``needs_values`` (the runtime passes ``None`` to the others).
        """
        if layer_id < 0:
            raise ValueError(f"layer_id must be >= 0, got {layer_id}")
        if q_window.dim() != 3 or q_window.shape[0] < 1:
            raise ValueError(
                f"expected q_window [w, H_q, D] with w >= 1, got {tuple(q_window.shape)}"
            )
        rows = min(q_window.shape[0], self.window, keys.shape[0])
        attn = window_attention(q_window[-rows:], keys, sm_scale)
        stats = HeadStatsReducer(self.theta, self.pool_kernel).reduce(attn)
        index = None
        if self.needs_chunk_bounds:
            kmin, kmax = chunk_bounds(keys, self.chunk_size)
            index = chunk_index(
                kmin, kmax, q_window[-rows:], self.bound_channels, self.bound_precision
            )
        return LayerObservation(
            layer_id=layer_id,
            prompt_len=int(keys.shape[0]),
            focus_size=stats.focus_size,
            scores=stats.scores,
            costs=self.costs(int(keys.shape[2]), keys.dtype),
            chunk_index=index,
            focus_set=stats.focus_set if self.selection_priority == "focus" else None,
        )

    def finalize(
        self,
        observations: Sequence[LayerObservation],
        is_text: Tensor,
        shard: HeadShard | None = None,
    ) -> CompressionPlan:
        """Stages 1-3 over all layers of one request.

        Args:
            observations: one per layer, layer ids ``0..L-1`` (any order).
            is_text: ``[N]`` bool, ``True`` for text tokens (``False`` = visual).
            shard: under tensor parallelism, the kv heads this rank holds. The observations'
                focus sizes, scores and focus sets then cover all ``shard.total`` heads (the
                runtime gathered them from every rank), their chunk bounds only the shard's.
                The plan is made over every head, as a single rank would make it, and the
                returned plan covers the shard's heads, with the model-wide plan's stats in
                ``model_stats``.
        """
        if not observations:
            raise ValueError("expected at least one layer observation, got none")
        obs = sorted(observations, key=lambda o: o.layer_id)
        ids = [o.layer_id for o in obs]
        if ids != list(range(len(obs))):
            raise ValueError(f"expected one observation per layer 0..{len(obs) - 1}, got ids {ids}")
        n = obs[0].prompt_len
        if any(o.prompt_len != n for o in obs):
            raise ValueError(f"observations disagree on prompt_len: {[o.prompt_len for o in obs]}")
        if is_text.shape != (n,) or is_text.dtype != torch.bool:
            raise ValueError(
                f"expected is_text [{n}] bool, got {tuple(is_text.shape)} {is_text.dtype}"
            )
        focus = torch.stack([o.focus_size for o in obs])  # [L, H]
        scores = torch.stack([o.scores for o in obs])  # [L, H, N]
        num_layers, num_heads = focus.shape
        if shard is not None and shard.total != num_heads:
            raise ValueError(
                f"expected observations over all {shard.total} kv heads, got {num_heads}"
            )
        geo = self.geometry(n, obs[0].costs)
        is_dynamic = self.classify(focus, geo)
        alloc = self.allocate(focus, is_dynamic, geo, scores, is_text.to(scores.device))
        dynamic = alloc.is_dynamic.to(scores.device)
        budgets = alloc.budgets.to(scores.device)

        focus_sets = None
        if all(o.focus_set is not None for o in obs):
            focus_sets = torch.stack([o.focus_set for o in obs])  # type: ignore[misc]
        kept = self.select(scores, is_text.to(scores.device), budgets, geo, focus_sets)
        kept[dynamic.reshape(-1)] = resident_mask(
            n, geo.sink, geo.dynamic_window, self.chunk_size, scores.device
        )

        model_stats = None
        if shard is not None and not shard.is_whole:
            model_stats = self._plan(geo, obs[0].costs, dynamic, budgets, focus, kept).stats()
            heads = shard.heads
            dynamic, budgets, focus = dynamic[:, heads], budgets[:, heads], focus[:, heads]
            kept = kept.view(num_layers, num_heads, n)[:, heads].reshape(-1, n)

        index = None
        if bool(dynamic.any()):
            indexes = [o.chunk_index for o in obs]
            if any(i is None for i in indexes):
                raise ValueError(f"policy {self.name!r} made dynamic heads without chunk bounds")
            index = ChunkIndex(
                *(torch.stack([getattr(i, part) for i in indexes]) for part in _INDEX_PARTS)
            )
        return self._plan(geo, obs[0].costs, dynamic, budgets, focus, kept, index, model_stats)

    def _plan(
        self,
        geo: Geometry,
        costs: ByteCosts,
        dynamic: Tensor,
        budgets: Tensor,
        focus: Tensor,
        kept: Tensor,
        index: ChunkIndex | None = None,
        model_stats: dict[str, Any] | None = None,
    ) -> CompressionPlan:
        """The plan of the heads of ``dynamic [L, H]`` from their ``[L*H, N]`` kept mask."""
        indptr, positions = mask_to_csr(kept)
        return CompressionPlan(
            prompt_len=geo.prompt_len,
            is_dynamic=dynamic,
            budgets=budgets,
            focus_size=focus,
            kept_indptr=indptr,
            kept_positions=positions,
            chunk_kmin=None if index is None else index.kmin,
            chunk_kmax=None if index is None else index.kmax,
            bound_channels=None if index is None else index.channels,
            bound_offset=None if index is None else index.offset,
            bound_scale=None if index is None else index.scale,
            costs=costs,
            chunk_size=self.chunk_size,
            top_k_chunks=geo.top_k_chunks,
            sink=geo.sink,
            window=geo.dynamic_window if bool(dynamic.any()) else geo.window,
            policy=self.name,
            merge_evicted=self.merges_evicted,
            head_budget=geo.head_budget,
            model_stats=model_stats,
        )

    # ------------------------------------------------------------------ hooks
    def classify(self, focus: Tensor, geo: Geometry) -> Tensor:
        """Stage 1: ``focus [L, H_kv]`` int64 -> ``[L, H_kv]`` bool, ``True`` = dynamic."""
        raise NotImplementedError

    def allocate(
        self, focus: Tensor, is_dynamic: Tensor, geo: Geometry, scores: Tensor, is_text: Tensor
    ) -> BudgetAllocation:
        """Stage 2: budgets per head (and the final classification).

        ``scores [L, H_kv, N]`` float32 are the observed key scores and ``is_text [N]`` bool the
        modality of each position, for policies whose budgets follow them (the method sizes heads
        by ``|U|`` alone).

        A prompt with no full chunk between sink and window has nothing to retrieve (its
        dynamic heads would read the whole prompt), and a request that retrieves no chunk per
        step has no use for retrieval: in both cases every head is made static.
        """
        if geo.retrievable_chunks == 0 or geo.top_k_chunks == 0:
            is_dynamic = torch.zeros_like(is_dynamic)
        return TopDownAllocator(demote_unaffordable=self.demote_unaffordable).allocate(
            focus,
            is_dynamic,
            prompt_len=geo.prompt_len,
            head_budget=geo.head_budget,
            floor=geo.floor,
            dynamic_budget=geo.dynamic_budget,
            dynamic_cost=geo.dynamic_cost,
        )

    def select(
        self,
        scores: Tensor,
        is_text: Tensor,
        budgets: Tensor,
        geo: Geometry,
        focus_sets: Tensor | None = None,
    ) -> Tensor:
        """Stage 3a: ``[L*H_kv, N]`` bool kept mask of the static rows (dynamic rows ignored).

        ``scores [L, H_kv, N]`` float32, ``budgets [L, H_kv]`` int64, ``focus_sets`` ``[L, H_kv,
        N]`` bool or ``None``.
        """
        return TextPriorSelector(self.selection_priority).select_mask(
            scores, is_text, budgets, geo.sink, geo.window, focus_sets
        )


@register_policy
@dataclass(frozen=True)
class HybridKVPolicy(CompressionPolicy):
    """The method: focus-based head types, top-down budgets, text-prior pruning + retrieval."""

    name: ClassVar[str] = "hybridkv"

    def classify(self, focus: Tensor, geo: Geometry) -> Tensor:
        cap = dynamic_fraction_cap(
            self.max_dynamic_fraction, geo.head_budget / geo.prompt_len, self.dynamic_cap
        )
        return FocusClassifier(cap).classify(focus, geo.head_budget)
