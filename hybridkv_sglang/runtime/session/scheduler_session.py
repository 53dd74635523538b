"""One scheduler process's hybridkv requests, from prefill end to release, in one owner.

The backend factory opens the session; SGLang's hooks reach it through
:func:`~hybridkv_sglang.runtime.session.current.current_session` and the attention backend holds
it. A request enters at :meth:`SchedulerSession.register` (its prefill ended in this forward) and
leaves at :meth:`SchedulerSession.release`, the one path that finish, abort and retraction all
take (SGLang's ``release_kv_cache``): its window tails, stats record, compressed entry, decode
metadata and compact storage go together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.prefill.compression import PrefillOutcome
from hybridkv_sglang.runtime.prefill.tensor_parallel import AttentionTP
from hybridkv_sglang.runtime.session.compact_storage import CompactStorage
from hybridkv_sglang.runtime.session.compressed_requests import (
    CompressedRequest,
    CompressedRequests,
)
from hybridkv_sglang.runtime.session.extend_batches import ExtendBatches
from hybridkv_sglang.runtime.session.stats import HybridKVStats
from hybridkv_sglang.runtime.session.window_queries import WindowQueryTails
from hybridkv_sglang.storage.decode_metadata import DecodeMetadata, PendingMoves, request_rows

logger = logging.getLogger(__name__)

_FAILURE_REASONS = {1: "decode_metadata_full", 2: "compression_error"}
_FAILURE_CODES = {reason: code for code, reason in _FAILURE_REASONS.items()}
"""Why a rank served a compressible request dense, as a code whose max over ranks wins."""


class SchedulerSession:
    """Everything one scheduler process knows about its hybridkv requests."""

    def __init__(
        self,
        config: HybridKVConfig,
        stats: HybridKVStats,
        decode_meta: DecodeMetadata | None = None,
        compact_storage: CompactStorage | None = None,
        tp: AttentionTP | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.decode_meta = decode_meta
        """Per-request decode rows on the device (``None``: ``enabled=false``, all dense)."""
        self.compact_storage = compact_storage
        """``storage='compact'``: compact entries and the host tier."""
        self.tp = tp
        self.requests = CompressedRequests()
        self.window_tails = WindowQueryTails(config.window)
        self.extend_batches = ExtendBatches()
        self._pending_moves: list[tuple[str, PendingMoves]] = []
        """Released host-tier requests whose move counters are still on their way to the host
        (read without waiting, so a release never stalls the overlap scheduler)."""
        self.backend: Any = None
        """The process's ``hybridkv`` attention backend (the decode-graph hooks ask it)."""

    # A request's prefill ends ---------------------------------------------------------------

    def register(
        self,
        outcomes: Sequence[PrefillOutcome],
        planned: Sequence[PrefillOutcome],
        device: torch.device,
    ) -> None:
        """The requests whose prefill ended in this forward: write each compressed request's
        decode metadata, agree with the other attention-TP ranks, then record every request.

        ``planned``: the outcomes the policy planned (the same requests on every rank, whether
        or not planning succeeded here). A request whose metadata cannot be written is served
        dense; the others are not affected.
        """
        for outcome in outcomes:
            if outcome.layout is not None:
                self._write_decode_metadata(outcome)
        if self.tp is not None and planned:
            self._agree_on_records(list(planned), device)
        for outcome in outcomes:
            request = outcome.request
            self.window_tails.drop(request.rid)
            if outcome.layout is not None:
                self.requests.add(
                    CompressedRequest(request.rid, request.req_pool_idx, outcome.layout)
                )
            self.stats.record_prefill_end(outcome.stats())
            logger.info("hybridkv: %s", outcome.summary())

    def _write_decode_metadata(self, outcome: PrefillOutcome) -> None:
        assert self.decode_meta is not None and outcome.layout is not None
        try:
            added = self.decode_meta.add(outcome.request.req_pool_idx, request_rows(outcome.layout))
        except Exception as err:
            outcome.fail(err)
            return
        if not added:
            outcome.layout = None
            outcome.dense_reason = "decode_metadata_full"

    def _agree_on_records(self, outcomes: list[PrefillOutcome], device: torch.device) -> None:
        """Tensor parallelism: a request any rank could not register is served dense by all,
        and every rank keeps the largest table bounds of any rank (one all-reduce)."""
        assert self.tp is not None and self.decode_meta is not None
        local = torch.tensor(
            [(_FAILURE_CODES.get(o.dense_reason, 0), *self._bounds_of(o)) for o in outcomes],
            dtype=torch.int64,
        )
        agreed = self.tp.all_reduce_max(local.to(device)).cpu().tolist()
        for outcome, (code, *bounds) in zip(outcomes, agreed, strict=True):
            row = outcome.request.req_pool_idx
            if outcome.layout is None:
                continue
            if code:
                self.decode_meta.release(row)
                outcome.layout = None
                outcome.dense_reason = _FAILURE_REASONS[code]
                logger.warning(
                    "hybridkv: %s served dense: another attention-TP rank could not compress it",
                    outcome.request.rid,
                )
                continue
            self.decode_meta.set_table_bounds(row, *bounds)

    def _bounds_of(self, outcome: PrefillOutcome) -> tuple[int, int]:
        if outcome.layout is None:
            return 0, 0
        assert self.decode_meta is not None
        return self.decode_meta.table_bounds(outcome.request.req_pool_idx)

    # After the prefill checkpoint: compact storage -------------------------------------------

    def compact(self, req: Any, tree_cache: Any) -> None:
        """Move a just-planned request's kept KV into compact entries; any failure leaves it
        ``in_place`` (counted)."""
        storage = self.compact_storage
        entry = self.requests.entry(req.rid)
        if storage is None or entry is None or entry.placement != "in_place":
            return
        kv = req.kv
        eligible = (
            kv.holds_kv
            and kv.req_pool_idx == entry.req_pool_idx
            and not req.finished()
            and req.lock is not None
            and not req.skip_radix_cache_insert
            and kv.cache_protected_len >= entry.layout.prompt_len
            and not getattr(tree_cache, "disable", False)
        )
        done = None
        if eligible:
            try:
                done = storage.compact(req, tree_cache, entry.layout)
            except Exception as err:  # contained: the request stays in_place
                logger.warning("hybridkv: compaction of %s failed, kept in_place: %r", req.rid, err)
                self.stats.record_compaction(req.rid, None, "compaction_error")
            else:
                self.stats.record_compaction(req.rid, done, None if done else "no_free_slots")
        if done is not None:
            self.requests.add(
                CompressedRequest(
                    req.rid, entry.req_pool_idx, entry.layout, done.layout, done.saved_skip_insert
                )
            )
        elif entry.layout.merge_evicted:
            self.stats.count("unmerged_requests")  # served in_place: evicted KV dropped

    # Release: finish, abort, retraction -------------------------------------------------------

    def release(self, req: Any, tree_cache: Any) -> None:
        """Forget the request and give back everything it took (the one release path)."""
        self.window_tails.drop(req.rid)
        # SGLang's ``Req.is_prefill_only`` less its speculative-decoding test (hybridkv refuses
        # speculative decoding), which reads a config namespace a unit test does not publish.
        prefill_only = req.sampling_params.max_new_tokens == 0
        entry = self.requests.pop(req.rid)
        self.stats.record_release(req.rid, max(len(req.output_ids) - 1, 0), prefill_only)
        if entry is None:
            return
        if self.decode_meta is not None:
            pending = self.decode_meta.host_tier_moves(entry.req_pool_idx)  # None: no host tier
            if pending is not None:
                self._pending_moves.append((req.rid, pending))
            self.decode_meta.release(entry.req_pool_idx)
        self._count_host_tier_moves(wait=False)
        if entry.compact is not None:
            assert self.compact_storage is not None
            self.compact_storage.release(entry.compact, tree_cache)
            req.skip_radix_cache_insert = entry.saved_skip_insert

    # What the session holds ------------------------------------------------------------------

    @property
    def decodes_compressed(self) -> bool:
        """Whether any request's decode rows are live (decode batches then need their rows)."""
        return self.decode_meta is not None and self.decode_meta.live_requests > 0

    @property
    def live_compact_slots(self) -> int:
        """KV slots compact entries hold now (SGLang's memory check counts them as owned)."""
        return 0 if self.compact_storage is None else self.compact_storage.live_slots

    def _count_host_tier_moves(self, wait: bool) -> None:
        """Count the released requests' host-tier moves whose copies arrived (all: ``wait``)."""
        waiting = []
        for rid, pending in self._pending_moves:
            if pending.ready(wait):
                moved, selected = pending.counts.tolist()
                self.stats.record_host_tier_moves(rid, moved, selected)
            else:
                waiting.append((rid, pending))
        self._pending_moves = waiting

    def snapshot(self, scheduler: Any = None) -> dict[str, Any]:
        """The stats snapshot ``/server_info`` shows, with SGLang's pool counts beside ours."""
        self._count_host_tier_moves(wait=True)
        return self.stats.snapshot(
            live_compressed=len(self.requests), memory=self.memory(scheduler)
        )

    def memory(self, scheduler: Any) -> dict[str, Any]:
        """SGLang's own KV pool counts (tokens) plus what the decode metadata and compact
        storage hold."""
        memory: dict[str, Any] = {}
        tree = getattr(scheduler, "tree_cache", None)
        if tree is not None:
            memory["pool_tokens"] = int(scheduler.max_total_num_tokens)
            memory["available_tokens"] = int(tree.token_to_kv_pool_allocator.available_size())
            memory["evictable_tokens"] = int(tree.evictable_size())
            memory["protected_tokens"] = int(tree.protected_size())
            memory["running_requests"] = len(scheduler.running_batch.reqs)
            memory["waiting_requests"] = len(scheduler.waiting_queue)
        if self.decode_meta is not None:
            memory["decode_metadata"] = self.decode_meta.usage()
        storage = self.compact_storage
        if storage is not None:
            memory["compact_slots"] = storage.live_slots
            if storage.host_tier is not None:
                tier = storage.host_tier
                memory["host_chunks_capacity"] = tier.capacity
                memory["host_chunks_used"] = tier.capacity - tier.free_chunks
        return memory
