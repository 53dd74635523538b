"""Name -> policy registry, the way SGLang registers attention backends.

A policy registers itself with :func:`register_policy` in its own module, and
:func:`discover_policies` (run when ``hybridkv_sglang.policy`` is imported) imports every module of
the package, so a new policy is one new file: the config, the CLI flags and the benchmarks read
the registry (``docs/policies.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, TypeVar

from hybridkv_sglang.policy.hyperparameters import Declared, declared_hyperparameters

if TYPE_CHECKING:
    from hybridkv_sglang.policy.compressor import CompressionPolicy

_Policy = TypeVar("_Policy", bound="type[CompressionPolicy]")

POLICIES: dict[str, type[CompressionPolicy]] = {}
"""Every registered policy by its ``name``, in registration order (``hybridkv`` first)."""


def register_policy(cls: _Policy) -> _Policy:
    """Class decorator: make the policy buildable by its ``name`` ClassVar (its own, not a
    base's)."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} must set its own `name: ClassVar[str]` to register")
    if POLICIES.get(name, cls) is not cls:
        raise ValueError(f"policy name {name!r} is taken by {POLICIES[name].__qualname__}")
    POLICIES[name] = cls
    return cls


def discover_policies() -> None:
    """Import every module of ``hybridkv_sglang.policy``, so that each registers its policies."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def build_policy(name: str, **values: Any) -> CompressionPolicy:
    """Build the policy ``name`` from plain hyper-parameter values (``budget=0.1, window=32, ...``).

    A policy accepts the hyper-parameters its class declares (every policy those of
    :class:`~hybridkv_sglang.policy.compressor.CompressionPolicy`); ``None`` values are passed
    through (``budget_tokens=None`` = use the ratio).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
    accepted = declared_hyperparameters(POLICIES[name])
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {unknown} for policy {name!r}; expected {sorted(accepted)}"
        )
    return POLICIES[name](**values)


def all_hyperparameters() -> dict[str, tuple[Declared, tuple[str, ...]]]:
    """Every registered policy's hyper-parameters with the policies that declare each.

    A name two policies declare must mean the same (type, default, doc and bounds): the config
    holds one field per name.
    """
    out: dict[str, tuple[Declared, tuple[str, ...]]] = {}
    for policy, cls in POLICIES.items():
        for name, declared in declared_hyperparameters(cls).items():
            known, owners = out.get(name, (declared, ()))
            if known != declared:
                raise ValueError(
                    f"hyper-parameter {name!r} of policy {policy!r} differs from the one of "
                    f"{owners}: {declared} vs {known}"
                )
            out[name] = (declared, (*owners, policy))
    return out
