"""hybridkv's series on SGLang's Prometheus endpoint (``--enable-metrics``).

SGLang runs ``prometheus_client`` in multiprocess mode: the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts the scheduler, every process writes its samples
there, and the HTTP server's ``GET /metrics`` merges them. Metrics created in the scheduler
process (where the backend runs) therefore appear beside SGLang's own, and carry the labels of
SGLang's scheduler series (``model_name``, ``engine_type``, ``tp_rank``, ...) so they join.

The backend factory creates them (:func:`scheduler_metrics`), so a server without the
``hybridkv`` backend exports none; ``HybridKVStats`` feeds them from the calls that update its
totals, so ``/metrics`` and ``/server_info`` agree: requests count when SGLang releases their KV,
decode steps and graph fallbacks as they happen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

READ_FRACTION_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
"""Fractions of the dense prompt KV read per decode step (budgets are usually 5-30 %)."""


class HybridKVMetrics:
    """The Prometheus series of one scheduler, bound to its labels."""

    def __init__(
        self, labels: Mapping[str, Any], registry: CollectorRegistry | None = None
    ) -> None:
        """``registry``: where the series register in-process (``None``: prometheus_client's
        default, as SGLang's collectors; tests pass a fresh one)."""
        # Imported here, as SGLang does: prometheus_client picks multiprocess mode at import,
        # from PROMETHEUS_MULTIPROC_DIR, which the launcher sets after loading plugins.
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.labels = dict(labels)
        names = list(self.labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(
                f"sglang:hybridkv_{name}_total", doc, [*names, *extra], registry=registry
            )

        self.compressed_requests = counter(
            "compressed_requests", "Requests served from a compressed prompt KV."
        ).labels(**self.labels)
        self.dense_requests = counter(
            "dense_requests", "Requests served with their dense prompt KV, by reason.", ("reason",)
        )
        self.kept_kv_bytes = counter(
            "kept_kv_bytes",
            "Prompt KV bytes (K and V) compressed requests kept, by where they are stored.",
            ("storage",),
        )
        self.saved_kv_bytes = counter(
            "saved_kv_bytes",
            "Prompt KV bytes (K and V) compressed requests dropped: freed to the radix cache "
            "with storage=compact, left in the pool unread with storage=in_place.",
            ("storage",),
        )
        self.index_bytes = counter(
            "index_bytes",
            "Chunk-index bytes (bounds, retrieval scratch, channel parameters) compressed "
            "requests held on the device and read every decode step, by storage.",
            ("storage",),
        )
        self.read_fraction = Histogram(
            "sglang:hybridkv_read_fraction",
            "Fraction of the dense prompt KV bytes a compressed request reads per decode step "
            "(KV entries and chunk index).",
            names,
            buckets=READ_FRACTION_BUCKETS,
            registry=registry,
        ).labels(**self.labels)
        decode_steps = counter(
            "decode_steps",
            "Decode forward passes, over the compressed tables (sparse) or the dense backend.",
            ("path",),
        )
        crossover_steps = counter(
            "dense_crossover_steps",
            "Decode batches holding compressed in-place requests that ran dense: below the "
            "device's crossover the dense step is faster (also counted in decode_steps).",
        )
        graph_fallbacks = counter(
            "graph_fallbacks",
            "Decode batches with compressed requests that ran eagerly: the graph buffers were "
            "too small.",
        )
        self.compression_failures = counter(
            "compression_failures",
            "Compression that failed, by reason: compression_error and decode_metadata_full "
            "serve the request dense; compaction_error and no_free_slots keep it in_place.",
            ("reason",),
        )
        self._counted = {
            "sparse_decode_steps": decode_steps.labels(**self.labels, path="sparse"),
            "dense_decode_steps": decode_steps.labels(**self.labels, path="dense"),
            "graph_fallbacks": graph_fallbacks.labels(**self.labels),
            "dense_crossover_steps": crossover_steps.labels(**self.labels),
        }

    def count(self, name: str, n: int) -> None:
        """``HybridKVStats.count``'s running totals that have a series (others are ignored)."""
        series = self._counted.get(name)
        if series is not None:
            series.inc(n)

    def compressed(
        self, storage: str, kept_bytes: int, saved_bytes: int, index_bytes: int, read: float
    ) -> None:
        """A released compressed request: its kept and dropped prompt KV, its chunk index, its
        read fraction in bytes."""
        self.compressed_requests.inc()
        self.kept_kv_bytes.labels(**self.labels, storage=storage).inc(kept_bytes)
        self.saved_kv_bytes.labels(**self.labels, storage=storage).inc(saved_bytes)
        self.index_bytes.labels(**self.labels, storage=storage).inc(index_bytes)
        self.read_fraction.observe(read)

    def dense(self, reason: str) -> None:
        """A released request served dense (``RequestStats.dense_reason``)."""
        self.dense_requests.labels(**self.labels, reason=reason).inc()

    def failure(self, reason: str) -> None:
        """Compression or compaction tried and failed; the request was served all the same."""
        self.compression_failures.labels(**self.labels, reason=reason).inc()


def scheduler_metric_labels(enable_priority_scheduling: bool = False) -> dict[str, Any]:
    """The labels SGLang puts on this scheduler's series, built as
    ``SchedulerMetricsCollector.init_new`` builds them."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.runtime_context import (
        get_disagg,
        get_observability,
        get_parallel,
        get_serving,
    )

    parallel = get_parallel()
    disagg = get_disagg()
    labels: dict[str, Any] = {
        "model_name": get_serving().served_model_name,
        "engine_type": "dynamic"
        if disagg.enable_pd_role_switch
        else DisaggregationMode.to_engine_type(disagg.disaggregation_mode),
        "tp_rank": parallel.tp_rank,
        "pp_rank": parallel.pp_rank,
        "moe_ep_rank": parallel.moe_ep_rank,
    }
    if enable_priority_scheduling:
        labels["priority"] = ""
    if parallel.dp_rank is not None:
        labels["dp_rank"] = parallel.dp_rank
    labels.update(get_observability().extra_metric_labels or {})
    return labels


def scheduler_metrics() -> HybridKVMetrics | None:
    """This scheduler's series, when it exports SGLang's: ``--enable-metrics`` on, and a
    stats-logging rank (attention TP/CP rank 0) unless ``--enable-metrics-for-all-schedulers``."""
    from sglang.srt.runtime_context import get_observability, get_parallel, get_schedule

    observability = get_observability()
    if not observability.enable_metrics:
        return None
    parallel = get_parallel()
    logging_rank = parallel.attn_tp_rank == 0 and parallel.attn_cp_rank == 0
    if not (logging_rank or observability.enable_metrics_for_all_schedulers):
        return None
    return HybridKVMetrics(scheduler_metric_labels(get_schedule().enable_priority_scheduling))
