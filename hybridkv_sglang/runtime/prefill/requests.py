"""The requests of an extend forward whose prompt KV is complete, and whether to compress them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.session.extend_batches import ScheduledExtend

HEALTH_CHECK_PREFIX = "HEALTH_CHECK"


@dataclass(frozen=True)
class PrefillEnd:
    """A request whose last prefill chunk runs in this forward: where compression hooks in.

    Positions are token indices of the request's row (``req_to_token[req_pool_idx]``);
    ``visual_spans`` are half-open ``[start, end)`` ranges, absolute in the full prompt.
    """

    batch_index: int
    rid: str
    req_pool_idx: int
    prompt_len: int
    extend_start: int
    query_start: int
    visual_spans: tuple[tuple[int, int], ...]
    custom_params: Any = None
    """The request's ``sampling_params.custom_params`` (see ``HybridKVConfig.for_request``)."""

    @property
    def visual_tokens(self) -> int:
        return span_tokens(self.visual_spans)

    @property
    def extend_len(self) -> int:
        return self.prompt_len - self.extend_start


@dataclass(frozen=True)
class PrefillChunk:
    """A request whose prefill continues after this forward (its window queries may start here)."""

    rid: str
    req_pool_idx: int
    extend_start: int
    extend_end: int
    query_start: int


def span_tokens(spans: tuple[tuple[int, int], ...]) -> int:
    """Tokens covered by half-open, non-overlapping spans."""
    return sum(end - start for start, end in spans)


def visual_spans_of(mm_input: Any, prompt_len: int) -> tuple[tuple[int, int], ...]:
    """Half-open visual spans from SGLang's inclusive ``mm_items[j].offsets``, clipped and merged.

    Read from offsets, never from ``input_ids``: the multimodal embedding clamps those in place.
    """
    if mm_input is None:
        return ()
    spans = sorted(
        (max(0, int(start)), min(prompt_len, int(end) + 1))
        for item in mm_input.mm_items
        for start, end in (item.offsets or ())
    )
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def find_prefill_ends(
    forward_batch: Any, scheduled: ScheduledExtend | None
) -> tuple[list[PrefillEnd], list[PrefillChunk], list[str]]:
    """Requests finishing prefill in this extend forward, those whose prefill goes on, and the
    rids of every extended request (``scheduled``: the scheduler's record of this batch).

    Reads ``mm_inputs`` here, in metadata init: the model clears it before attention runs.
    """
    rids = forward_batch.rids or []
    prefix_lens = forward_batch.extend_prefix_lens_cpu
    extend_lens = forward_batch.extend_seq_lens_cpu
    seq_lens = forward_batch.seq_lens_cpu.tolist()
    custom_params: tuple[Any, ...] = (None,) * len(rids)
    if scheduled is not None:
        finishes = scheduled.finishes_prefill
        custom_params = scheduled.custom_params
    else:
        orig = forward_batch.orig_seq_lens
        assert orig is not None, "extend batch without orig_seq_lens or a scheduler record"
        finishes = tuple(s >= o for s, o in zip(seq_lens, orig.tolist(), strict=True))
    req_pool_indices = forward_batch.req_pool_indices.tolist()
    mm_inputs = forward_batch.mm_inputs or [None] * len(rids)

    ends: list[PrefillEnd] = []
    middles: list[PrefillChunk] = []
    query_start = 0
    for i, rid in enumerate(rids):
        if rid.startswith(HEALTH_CHECK_PREFIX):
            pass
        elif not finishes[i]:
            middles.append(
                PrefillChunk(
                    rid=rid,
                    req_pool_idx=int(req_pool_indices[i]),
                    extend_start=int(prefix_lens[i]),
                    extend_end=int(seq_lens[i]),
                    query_start=query_start,
                )
            )
        else:
            prompt_len = int(seq_lens[i])
            ends.append(
                PrefillEnd(
                    batch_index=i,
                    rid=rid,
                    req_pool_idx=int(req_pool_indices[i]),
                    prompt_len=prompt_len,
                    extend_start=int(prefix_lens[i]),
                    query_start=query_start,
                    visual_spans=visual_spans_of(mm_inputs[i], prompt_len),
                    custom_params=custom_params[i],
                )
            )
        query_start += int(extend_lens[i])
    extended = [r for r in rids if not r.startswith(HEALTH_CHECK_PREFIX)]
    return ends, middles, extended


def dense_reason(request: PrefillEnd, config: HybridKVConfig) -> str | None:
    """Why this request is served uncompressed, or None when the method applies."""
    return dense_reason_of(request.prompt_len, request.visual_tokens, config)


def dense_reason_of(prompt_len: int, visual_tokens: int, config: HybridKVConfig) -> str | None:
    """``dense_reason`` from the counts alone (the scheduler knows them before any forward)."""
    if not config.enabled:
        return "disabled"
    if config.visual_only and visual_tokens == 0:
        return "no_visual_tokens"
    if prompt_len < max(config.min_prompt_tokens, config.sink + config.window + 1):
        return "short_prompt"
    return None


def window_prefix_cap(prompt_len: int, visual_tokens: int, config: HybridKVConfig) -> int | None:
    """The longest prefix a request may take from the radix cache, or ``None`` when it stays
    dense.

    Tokens served from the cache have no queries, so a turn whose new text is shorter than the
    window (a follow-up question about the same images, a repeated prompt) would be planned from
    fewer than ``w`` window rows. Capping the match at ``N - w`` serves everything before the
    window from the tree and prefills the last ``w`` tokens again; SGLang's checkpoint frees
    their duplicate slots. SGLang caps sliding-window models the same way
    (``swa_reprefill_tail_tokens``).
    """
    if dense_reason_of(prompt_len, visual_tokens, config) is not None:
        return None
    return max(prompt_len - config.window, 0)
