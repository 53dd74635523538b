"""Session-wide test setup: Triton kernels run under the interpreter when there is no GPU.

Set before any test module imports triton, so every ``@triton.jit`` kernel is interpretable.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
