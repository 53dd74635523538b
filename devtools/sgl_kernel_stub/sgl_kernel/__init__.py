"""CPU development stand-in for ``sgl_kernel`` (SGLang's CUDA kernel package has no CPU build).

SGLang imports ``sgl_kernel`` and resolves ``torch.ops.sgl_kernel.*`` names at import time even
when it will never call them on a CPU without AMX. This module makes those imports succeed and
makes every call fail loudly, so a silently wrong kernel can never run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
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


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any ``sgl_kernel.<sub>`` import as a stub module."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname.startswith("sgl_kernel.") and fullname != "sgl_kernel._op_names":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.append(_StubFinder())
sys.modules[__name__].__class__ = _StubModule
