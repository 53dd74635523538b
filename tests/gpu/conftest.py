"""GPU checks: skipped without CUDA, and when Triton runs in interpreter mode.

Run them in their own pytest process without ``TRITON_INTERPRET`` (``pytest tests/gpu``): the
interpreter mode is fixed when triton is first imported and would turn the compiled kernels into
the CPU interpreter. The FoldedDecode checks also need SGLang's Triton decode kernel: installed
sglang, or the copy ``python bench/device_sglang.py stage .device`` stages, with
``PYTHONPATH=.device``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    reason = None
    if not torch.cuda.is_available():
        reason = "needs CUDA"
    else:
        from hybridkv_sglang.kernels._common import interpret_enabled

        if interpret_enabled():
            reason = "TRITON_INTERPRET=1: run tests/gpu in its own pytest process without it"
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
