"""Triton kernels of hybridkv, each beside its torch twin (shipped as ``hybridkv_sglang.kernels``).

Kernels hold no policy: they score, index and copy what they are told to.

Convention, the same for every op (``kernels/<op>.py``):

- ``<op>_ref``: pure torch, the definition. Runs on any device; may read small values on the
  host (it is the reference, not the hot path).
- ``<op>``: the Triton version, same signature and result. Validates its inputs (``ValueError``
  reading "expected X, got Y"), never syncs with the host unless documented, and runs on CUDA
  tensors, or on CPU tensors when Triton is in interpreter mode (``TRITON_INTERPRET=1`` set
  *before* ``triton`` is first imported: Triton decorates its own ``tl.*`` helpers at import).
  Anything else raises a ``ValueError`` naming ``<op>_ref``.
- ``<op>_auto`` (``chunk_topk``, ``gather_entries``): what library code calls: ``<op>`` when the
  tensors are on CUDA, ``<op>_ref`` otherwise (CPU serving and CPU tests use the twin; kernel
  parity tests call ``<op>`` directly under the interpreter). The folded-table kernels have no
  ``_auto``: :class:`hybridkv_sglang.attention.folded_decode.FoldedDecode` picks the Triton
  versions or the twins once, with the attention kernel.

Ops:

- ``chunk_topk``: Quest chunk scores ``[R, C_max]`` for dynamic heads + top-k chunk ids.
- ``gather_entries``: copy kept KV entries into compact entries (folded view).
- ``folded_tables``: one decode step's folded tables built on the device from per-request row
  records: ``folded_lengths`` (every layer's split offsets: each row's KV splits, one launch)
  and ``chunk_retrieval`` (one launch per layer: each dynamic row's top chunks by the Quest
  bound and, given a ``host_staging.HostStaging``, the host-tier rows' chunks staged into their
  device slots; its twin is ``chunk_retrieval_ref`` then ``host_staging.stage_host_chunks_ref``).
- ``host_staging``: the staging rules, their per-row Triton body (called inside
  ``chunk_retrieval``) and their twin ``stage_host_chunks_ref``; no launch of its own.
- ``folded_attention``: one layer's decode attention over those rows, each row's entries derived
  from its record inside the kernel (no index buffer); ``folded_entries_ref`` lists them.
- ``sparse_decode``: ``sparse_decode_reference``, attention over explicit entry lists (the
  twin's attention).
"""

from .chunk_topk import chunk_topk, chunk_topk_auto, chunk_topk_ref
from .folded_attention import folded_attention, folded_attention_ref, folded_entries_ref
from .folded_tables import (
    chunk_retrieval,
    chunk_retrieval_ref,
    folded_lengths,
    folded_lengths_ref,
)
from .gather_entries import gather_entries, gather_entries_auto, gather_entries_ref
from .host_staging import HostStaging, stage_host_chunks_ref
from .sparse_decode import sparse_decode_reference

__all__ = [
    "HostStaging",
    "chunk_retrieval",
    "chunk_retrieval_ref",
    "chunk_topk",
    "chunk_topk_auto",
    "chunk_topk_ref",
    "folded_attention",
    "folded_attention_ref",
    "folded_entries_ref",
    "folded_lengths",
    "folded_lengths_ref",
    "gather_entries",
    "gather_entries_auto",
    "gather_entries_ref",
    "sparse_decode_reference",
    "stage_host_chunks_ref",
]
