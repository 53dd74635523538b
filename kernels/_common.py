"""Shared plumbing for the kernels: input validation and device dispatch.

Nothing here holds policy. See ``kernels/__init__.py`` for the dispatch convention.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")


def interpret_enabled() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors).

    Triton decides once, when ``triton`` is first imported (its own ``tl.*`` helpers are
    decorated then), so ``TRITON_INTERPRET=1`` must be set before that import. This reads the
    mode Triton actually loaded with, not the current environment.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other Triton layouts
        return _env_interpret()
    return isinstance(tl.zeros, InterpretedFunction)


def triton_runnable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton version can run on these tensors: CUDA (compiled Triton), or CPU with
    Triton in interpreter mode."""
    if interpret_enabled():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def require_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the alternatives when ``op``'s Triton version cannot run."""
    if triton_runnable(*tensors):
        return
    devices = sorted({str(t.device) for t in tensors})
    if interpret_enabled():
        want = "CPU tensors (Triton is in interpreter mode, TRITON_INTERPRET=1)"
    elif _env_interpret():
        want = (
            "CUDA tensors (TRITON_INTERPRET=1 was set after triton was imported, so Triton "
            "compiles; set it before the first triton import to run on CPU)"
        )
    else:
        want = "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before importing triton)"
    raise ValueError(
        f"{op}: expected {want}, got devices {devices}; call {op}_ref (the torch definition) "
        f"or the caller that picks by device ({op}_auto where it exists) instead"
    )


def check_tensor(
    op: str,
    name: str,
    t: Any,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: tuple[int | None, ...] | None = None,
    layout: str = "",
) -> None:
    """FlashInfer-style validation: every message reads ``expected X, got Y``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    where = f" {layout}" if layout else ""
    if ndim is not None and t.dim() != ndim:
        raise ValueError(
            f"{op}: {name}: expected a {ndim}-D tensor{where}, got shape {tuple(t.shape)}"
        )
    if dtypes is not None:
        allowed = tuple(dtypes)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(
                f"{op}: {name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}"
            )
    if shape is not None:
        ok = len(shape) == t.dim() and all(
            s is None or s == n for s, n in zip(shape, t.shape, strict=True)
        )
        if not ok:
            dims = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
            raise ValueError(f"{op}: {name}: expected shape {want}{where}, got {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"{op}: expected all tensors on one device, got {first_name} on {first} "
                f"and {name} on {dev}"
            )


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name}: expected the last dimension contiguous (stride 1), got strides "
            f"{tuple(t.stride())}"
        )
