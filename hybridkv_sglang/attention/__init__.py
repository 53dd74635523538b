"""Decode attention over folded per-head page tables (reference + FlashInfer path)."""

from hybridkv_sglang.attention.sparse_decode import FlashInferFoldedDecode, sparse_decode_reference

__all__ = ["FlashInferFoldedDecode", "sparse_decode_reference"]
