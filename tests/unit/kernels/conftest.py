"""Kernel parity tests run the Triton kernels in the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (Triton decorates its own
``tl.*`` helpers at import), so it is set here, at the top, before anything imports triton. If an
earlier conftest or test module already imported triton without it, the kernels run compiled:
then the tests use CUDA when present and skip otherwise (see ``kernel_device``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from hybridkv_sglang.kernels._common import interpret_enabled


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton versions run in this session: CPU under the interpreter, else CUDA."""
    if interpret_enabled():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set and there is no CUDA: set "
        "TRITON_INTERPRET=1 in the environment (or in tests/conftest.py) to run the kernels on CPU"
    )
