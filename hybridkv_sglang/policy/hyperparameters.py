"""A policy's hyper-parameters, declared once: dataclass fields carrying their doc and bounds.

A policy is a frozen dataclass whose fields are its hyper-parameters (STYLE §2). Declaring a field
with :func:`hyperparameter` attaches a :class:`Hyperparameter` to it, and everything else reads it
from there: the policy validates its values with it, and ``HybridKVConfig`` derives one config
field per declared name (type, default, description, range, whether a request may set it).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

METADATA_KEY = "hybridkv"
"""Key of the :class:`Hyperparameter` in a dataclass field's ``metadata``."""


@dataclass(frozen=True)
class Hyperparameter:
    """What a field's value may be and what it means.

    Attributes:
        doc: one sentence for users (the config field's description, the ``--hybridkv-*`` help).
        ge, gt, le, lt: bounds of a number (``None``: unbounded on that side); a ``None``
            value of an optional field is not checked.
        choices: the allowed strings, for a field chosen from a few names.
        per_request: a request may set it for itself (``custom_params["hybridkv"]``).
    """

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    per_request: bool = False

    def range_text(self) -> str:
        """The allowed values in words: ``in (0, 1]``, ``>= 1``, ``one of ('a', 'b')`` or ``""``."""
        if self.choices is not None:
            return f"one of {self.choices}"
        low = (">=", "[", self.ge) if self.gt is None else (">", "(", self.gt)
        high = ("<=", "]", self.le) if self.lt is None else ("<", ")", self.lt)
        if low[2] is not None and high[2] is not None:
            return f"in {low[1]}{low[2]:g}, {high[2]:g}{high[1]}"
        for word, _, bound in (low, high):
            if bound is not None:
                return f"{word} {bound:g}"
        return ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def check(self, name: str, value: Any) -> None:
        """``ValueError`` reading ``"<name> must be <range>, got <value>"`` unless accepted."""
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.range_text()}, got {value!r}")


def hyperparameter(
    default: Any,
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    per_request: bool = False,
) -> Any:
    """A dataclass field declaring a hyper-parameter (see :class:`Hyperparameter`)."""
    spec = Hyperparameter(doc, ge, gt, le, lt, choices, per_request)
    return dataclasses.field(default=default, metadata={METADATA_KEY: spec})


@dataclass(frozen=True)
class Declared:
    """One declared hyper-parameter of a policy class, as the config builds its field from it.

    Attributes:
        annotation: the field's type (``Literal`` of the choices for a chosen name).
        default: the field's default.
        spec: its :class:`Hyperparameter`.
    """

    name: str
    annotation: Any
    default: Any
    spec: Hyperparameter


def declared_hyperparameters(cls: type) -> dict[str, Declared]:
    """Every hyper-parameter a policy dataclass declares (own and inherited), in field order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(METADATA_KEY)
        if spec is None:
            continue
        annotation = hints[f.name] if spec.choices is None else Literal[spec.choices]  # type: ignore[valid-type]
        out[f.name] = Declared(f.name, annotation, f.default, spec)
    return out


def check_hyperparameters(policy: Any) -> None:
    """Check every declared field of a policy instance against its bounds."""
    for f in dataclasses.fields(policy):
        spec = f.metadata.get(METADATA_KEY)
        if spec is not None:
            spec.check(f.name, getattr(policy, f.name))
