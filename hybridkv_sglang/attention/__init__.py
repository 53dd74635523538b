"""Decode attention over folded per-head tables: the pure-torch reference here, the device-built
decode step in :mod:`hybridkv_sglang.attention.folded_decode` (imported from there: it brings in
the Triton table kernels)."""

from hybridkv_sglang.attention.sparse_decode import sparse_decode_reference

__all__ = ["sparse_decode_reference"]
