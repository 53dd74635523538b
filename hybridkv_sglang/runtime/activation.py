"""Whether this process serves with the ``hybridkv`` backend.

SGLang loads every installed plugin in every process it starts, so the plugin's hooks are
registered in servers that never select ``--attention-backend hybridkv``. The backend factory
marks the process active; every hook returns SGLang's result untouched until then, so an
installed plugin costs a stock server nothing.
"""

from __future__ import annotations

from typing import Any

_active = False


def activate() -> None:
    """Called by the backend factory, in the scheduler process that runs the backend."""
    global _active
    _active = True


def is_active() -> bool:
    """True once this process has built a ``hybridkv`` attention backend."""
    return _active


_backend: Any = None


def set_active_backend(backend: Any) -> None:
    """The backend factory registers the process's ``hybridkv`` backend (and activates)."""
    global _backend
    _backend = backend
    activate()


def active_backend() -> Any:
    """This process's ``hybridkv`` backend, or ``None``."""
    return _backend
