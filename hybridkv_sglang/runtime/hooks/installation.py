"""Installing the plugin's SGLang hooks, and proving at start-up that they took.

SGLang applies registered hooks after every plugin has loaded, and when a target is missing it
logs the failure and carries on. For hybridkv that would be silent harm: without the
``ForwardBatch.init_new`` hook, compressed requests would decode dense without a word. So the
plugin verifies its own hooks wherever it serves (the launching process, before any scheduler
starts; each scheduler, before its backend is built): every target must resolve, be patched
with the plugin's hook, and keep the leading parameters the hook reads. Anything else stops the
launch with the target and the SGLang version named.
"""

from __future__ import annotations

import inspect
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

SUPPORTED_SGLANG = "0.5.23"
"""The SGLang release whose internals the hooks were written against."""


class HookInstallError(RuntimeError):
    """A patched SGLang target is missing, unpatched or changed: the plugin cannot serve."""


@dataclass(frozen=True)
class Hook:
    """One function the plugin attaches to one SGLang target."""

    target: str
    """Dotted path (``module.Class.method`` or ``module.function``)."""
    function: Callable[..., Any]
    when: Literal["before", "after"]
    parameters: tuple[str, ...]
    """The target's leading parameters, as the hook reads them (``self``/``cls`` included)."""


_installed: list[Hook] = []
"""The hooks this process registered (verified once SGLang has applied them)."""


def install(hooks: Iterable[Hook]) -> None:
    """Register ``hooks`` with SGLang's hook registry (applied after every plugin loads)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for hook in hooks:
        kind = HookType.BEFORE if hook.when == "before" else HookType.AFTER
        HookRegistry.register(hook.target, hook.function, kind)
        _installed.append(hook)


def verify_hooks(hooks: Iterable[Hook] | None = None) -> None:
    """Raise :class:`HookInstallError` naming every installed hook that did not take.

    ``hooks``: those to check (default: every hook this process installed).
    """
    problems = [p for hook in (_installed if hooks is None else hooks) if (p := _problem(hook))]
    if problems:
        raise HookInstallError(
            f"--attention-backend hybridkv cannot run on SGLang {_sglang_version()} (its hooks "
            f"are written for SGLang {SUPPORTED_SGLANG}): " + "; ".join(problems)
        )


def _problem(hook: Hook) -> str | None:
    """Why ``hook`` is not in force (``None``: it is)."""
    owner_path, name = hook.target.rsplit(".", 1)
    try:
        owner = pkgutil.resolve_name(owner_path)
        current = inspect.getattr_static(owner, name)
    except (ImportError, AttributeError, ValueError):
        return f"target {hook.target} no longer exists"
    current = getattr(current, "__func__", current)  # classmethod / staticmethod
    if not _calls(current, hook.function):
        return f"target {hook.target} was not patched"
    found = tuple(inspect.signature(inspect.unwrap(current)).parameters)
    if found[: len(hook.parameters)] != hook.parameters:
        return (
            f"target {hook.target} takes ({', '.join(found)}), the hook reads "
            f"({', '.join(hook.parameters)})"
        )
    return None


def _calls(wrapper: Any, function: Callable[..., Any]) -> bool:
    """Whether ``function`` is one of the hooks wrapped around a target (SGLang's wrappers
    hold their hook in their closure and the function they wrap in ``__wrapped__``)."""
    while wrapper is not None:
        cells = getattr(wrapper, "__closure__", None) or ()
        if any(_contents(cell) is function for cell in cells):
            return True
        wrapper = getattr(wrapper, "__wrapped__", None)
    return False


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _sglang_version() -> str:
    from importlib.metadata import version

    return version("sglang")
