"""When the dense step is faster: the batch sizes below which hybridkv decodes dense.

At small batches the sparse step's extra launches cost more than the bytes it saves (an H200
ran it at 0.60x the dense step at batch 1 / 32K, 1.95x at batch 8). An ``in_place`` request keeps
its dense prefix, so a batch of such requests below the device's crossover replays the wrapped
backend's ``dense`` graph instead: stock speed and full-cache answers. ``compact`` requests
have no dense prefix and always decode sparse.

The crossover per device kind comes from ``crossover.json`` beside this module, measured by the
device check (``bench/gpu_check.py`` writes its ``crossover`` rows; ``--update-crossover``
merges them here): per context, the smallest batch whose sparse step was faster. A device the
table does not know uses :data:`UNKNOWN_DEVICE` (conservative); the CPU path has no graphs and
decodes sparse at every batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("crossover.json")
UNKNOWN_DEVICE: tuple[tuple[int, int], ...] = ((0, 8),)
"""A GPU the table does not know: sparse from batch 8 at every context (every measured device
was slower than dense at batch 1 and faster at batch 8)."""


@dataclass(frozen=True)
class Crossover:
    """``(context, min_batch)`` points, by context: at contexts up to a point's, batches
    smaller than its ``min_batch`` decode dense (past the last point, the last one holds)."""

    points: tuple[tuple[int, int], ...] = ((0, 1),)

    @property
    def largest_min_batch(self) -> int:
        return max(batch for _, batch in self.points)

    def prefers_dense(self, batch_size: int, context: int) -> bool:
        """Host only: whether a batch of ``batch_size`` requests of at most ``context`` tokens
        decodes faster dense."""
        for point_context, min_batch in self.points:
            if context <= point_context:
                return batch_size < min_batch
        return batch_size < self.points[-1][1]

    @classmethod
    def for_device(cls, device_type: str, device_name: str | None) -> Crossover:
        """The crossover of a device: measured, the unknown-GPU default, or none on CPU."""
        if device_type != "cuda":
            return cls()
        table = json.loads(TABLE.read_text())
        points = table.get(device_name or "", UNKNOWN_DEVICE)
        return cls(tuple(sorted((int(c), int(b)) for c, b in points)))
