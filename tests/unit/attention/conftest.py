"""Set TRITON_INTERPRET before anything imports triton (these tests import the kernels package
and are collected before tests/unit/kernels, whose parity tests need the interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
