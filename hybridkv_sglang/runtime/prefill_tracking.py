"""Which requests of an extend batch finish their prefill, seen from the scheduler side.

The attention backend only sees a ``ForwardBatch`` copy, where a request's last prefill chunk is
not marked (``contains_last_prefill_chunk`` is batch-level, and ``seq_lens >= orig_seq_lens``
misfires after a retraction). ``ForwardBatch.init_new`` still holds the ``ScheduleBatch`` with
its ``Req`` objects, so an AFTER hook there records exact per-request flags, keyed by the
identity of the batch's ``rids`` list, which every copy of that ``ForwardBatch`` shares.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from hybridkv_sglang.runtime.activation import is_active

_MAX_PENDING = 32


@dataclass(frozen=True)
class ScheduledExtend:
    """Scheduler-side facts about one extend batch, in batch order."""

    rids: list[str]
    finishes_prefill: tuple[bool, ...]
    prompt_lens: tuple[int, ...]
    custom_params: tuple[Any, ...]
    """Each request's ``sampling_params.custom_params`` (its own hybridkv settings live there)."""


_pending: OrderedDict[int, ScheduledExtend] = OrderedDict()


def schedule_batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``ScheduleBatch`` among ``ForwardBatch.init_new``'s arguments (``None``: absent)."""
    candidates = [*args, kwargs.get("batch")]
    return next((a for a in candidates if hasattr(a, "reqs") and hasattr(a, "forward_mode")), None)


def record_extend_batch(forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``ForwardBatch.init_new``: remember last-chunk flags for this batch."""
    if not is_active():
        return forward_batch
    if forward_batch is None or not forward_batch.forward_mode.is_extend():
        return forward_batch
    batch = schedule_batch_of(args, kwargs)
    rids = forward_batch.rids
    if batch is None or rids is None:
        return forward_batch
    reqs = batch.reqs
    _pending[id(rids)] = ScheduledExtend(
        rids=rids,
        finishes_prefill=tuple(
            r.extend_end is not None and r.extend_end >= len(r.full_untruncated_fill_ids)
            for r in reqs
        ),
        prompt_lens=tuple(len(r.full_untruncated_fill_ids) for r in reqs),
        custom_params=tuple(r.sampling_params.custom_params for r in reqs),
    )
    while len(_pending) > _MAX_PENDING:
        _pending.popitem(last=False)
    return forward_batch


def find_extend_batch(rids: list[str] | None) -> ScheduledExtend | None:
    """The record for this forward's batch, matched by list identity.

    The table holds each ``rids`` list, so its id cannot be reused while the record lives.
    """
    if rids is None:
        return None
    record = _pending.get(id(rids))
    if record is None or record.rids is not rids:
        return None
    return record
