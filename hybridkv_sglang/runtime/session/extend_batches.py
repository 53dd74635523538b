"""Which requests of an extend batch finish their prefill, seen from the scheduler side.

The attention backend only sees a ``ForwardBatch`` copy, where a request's last prefill chunk is
not marked (``contains_last_prefill_chunk`` is batch-level, and ``seq_lens >= orig_seq_lens``
misfires after a retraction). ``ForwardBatch.init_new`` still holds the ``ScheduleBatch`` with
its ``Req`` objects, so its hook records exact per-request flags here, keyed by the identity of
the batch's ``rids`` list, which every copy of that ``ForwardBatch`` shares.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_PENDING = 32
"""Batches remembered: the forward thread reads a record within a batch or two of its hook."""


@dataclass(frozen=True)
class ScheduledExtend:
    """Scheduler-side facts about one extend batch, in batch order."""

    rids: list[str]
    finishes_prefill: tuple[bool, ...]
    prompt_lens: tuple[int, ...]
    custom_params: tuple[Any, ...]
    """Each request's ``sampling_params.custom_params`` (its own hybridkv settings live there)."""

    @classmethod
    def of(cls, rids: list[str], reqs: Sequence[Any]) -> ScheduledExtend:
        """The record of a batch of SGLang ``Req`` objects (``rids``: the batch's own list)."""
        return cls(
            rids=rids,
            finishes_prefill=tuple(
                r.extend_end is not None and r.extend_end >= len(r.full_untruncated_fill_ids)
                for r in reqs
            ),
            prompt_lens=tuple(len(r.full_untruncated_fill_ids) for r in reqs),
            custom_params=tuple(r.sampling_params.custom_params for r in reqs),
        )


class ExtendBatches:
    """The last :data:`MAX_PENDING` extend batches' records, by ``rids`` list identity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, ScheduledExtend] = OrderedDict()

    def record(self, scheduled: ScheduledExtend) -> None:
        with self._lock:
            self._pending[id(scheduled.rids)] = scheduled
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def find(self, rids: list[str] | None) -> ScheduledExtend | None:
        """The record for this forward's batch, matched by list identity.

        The table holds each ``rids`` list, so its id cannot be reused while the record lives.
        """
        if rids is None:
            return None
        with self._lock:
            record = self._pending.get(id(rids))
        if record is None or record.rids is not rids:
            return None
        return record

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
