"""Triton kernels of hybridkv, each beside its torch twin (shipped as ``hybridkv_sglang.kernels``).

Kernels hold no policy: they score, index and copy what they are told to.

Convention, the same for every op (``kernels/<op>.py``):

- ``<op>_ref``: pure torch, the definition. Runs on any device; may read small values on the
  host (it is the reference, not the hot path).
- ``<op>``: the Triton version, same signature and result. Validates its inputs (``ValueError``
  reading "expected X, got Y"), never syncs with the host unless documented, and runs on CUDA
  tensors, or on CPU tensors when Triton is in interpreter mode (``TRITON_INTERPRET=1`` set
  *before* ``triton`` is first imported: Triton decorates its own ``tl.*`` helpers at import).
  Anything else raises a ``ValueError`` naming ``<op>_ref`` and ``<op>_auto``.
- ``<op>_auto``: what library code calls: ``<op>`` when the tensors are on CUDA, ``<op>_ref``
  otherwise (CPU serving and CPU tests use the twin; kernel parity tests call ``<op>``
  directly under the interpreter).

Ops:

- ``chunk_topk``: Quest chunk scores ``[R, C_max]`` for dynamic heads + top-k chunk ids.
- ``page_table_indices``: folded per-head FlashInfer page-table indices from positions.
- ``gather_entries``: copy kept KV entries into compact entries (folded view).
- ``ragged_chunk_scores``: Quest chunk scores over a flat list of chunks tagged by row (the
  fixed-shape form CUDA-graph decode captures).
"""

from .chunk_topk import chunk_topk, chunk_topk_auto, chunk_topk_ref
from .gather_entries import gather_entries, gather_entries_auto, gather_entries_ref
from .page_table_indices import (
    build_page_table_indices,
    build_page_table_indices_auto,
    build_page_table_indices_ref,
    kv_indptr_from_lengths,
)
from .ragged_chunk_scores import (
    ragged_chunk_scores,
    ragged_chunk_scores_auto,
    ragged_chunk_scores_ref,
)

__all__ = [
    "build_page_table_indices",
    "build_page_table_indices_auto",
    "build_page_table_indices_ref",
    "chunk_topk",
    "chunk_topk_auto",
    "chunk_topk_ref",
    "gather_entries",
    "gather_entries_auto",
    "gather_entries_ref",
    "kv_indptr_from_lengths",
    "ragged_chunk_scores",
    "ragged_chunk_scores_auto",
    "ragged_chunk_scores_ref",
]
