"""Decode attention over folded per-head tables: the device-built decode step in
:mod:`hybridkv_sglang.attention.folded_decode` (imported from there: it brings in the Triton
kernels, whose torch twins are the CPU path)."""
