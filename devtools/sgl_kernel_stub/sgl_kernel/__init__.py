"""CPU development stand-in for ``sgl_kernel`` (SGLang's CUDA kernel package has no CPU build).

SGLang imports ``sgl_kernel`` and resolves ``torch.ops.sgl_kernel.*`` names at import time even
when it will never call them on a CPU without AMX. This module makes those imports succeed and
makes every call fail loudly, so a silently wrong kernel can never run. Submodules
(``sgl_kernel.scalar_type``, ...) deliberately do not exist: SGLang catches that ImportError and
takes its own fallbacks.
"""

from __future__ import annotations

import sys
import types
from typing import Any, NoReturn

import torch

from sgl_kernel._op_names import OP_NAMES

__version__ = "0.0.0+cpu-stub"


def _unavailable(name: str):
    def call(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is the CPU development stand-in; "
            "SGLang should have taken its plain-torch path here"
        )

    call.__name__ = name
    return call


_LIBRARY = torch.library.Library("sgl_kernel", "DEF")
for _op in OP_NAMES:
    _LIBRARY.define(f"{_op}(Tensor[] args) -> ()")
    _LIBRARY.impl(_op, _unavailable(_op), "CompositeExplicitAutograd")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(f"{self.__name__}.{name}")


sys.modules[__name__].__class__ = _StubModule
