"""Whether this process serves with the ``hybridkv`` backend.

SGLang loads every installed plugin in every process it starts, so the plugin's hooks are
registered in servers that never select ``--attention-backend hybridkv``. The backend factory
marks the process active; every hook returns SGLang's result untouched until then, so an
installed plugin costs a stock server nothing. The launching process never builds a backend: it
is marked when its resolved server arguments select ``hybridkv`` (``frontend.check_at_launch``).
"""

from __future__ import annotations

from typing import Any

BACKEND_NAME = "hybridkv"
"""``--attention-backend hybridkv``."""

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


_launch_config: Any = None


def set_launch_config(config: Any) -> None:
    """The launching process (HTTP server, tokenizer manager, ``Engine``) serves hybridkv with
    ``config``; its request-path hooks act from here on."""
    global _launch_config
    _launch_config = config


def launch_config() -> Any:
    """The ``HybridKVConfig`` of a launching process that serves hybridkv, else ``None``."""
    return _launch_config
