"""Unit tests run as in a process that serves the ``hybridkv`` backend.

Every hook returns SGLang's result untouched until the backend factory activates the process
(``runtime.activation``); unit tests exercise the hooks themselves, so each starts active. The
flag is restored after every test, so a test that switches it (or builds a backend, which
activates) leaks nothing into the next.
"""

from __future__ import annotations

import pytest

from hybridkv_sglang.runtime import activation


@pytest.fixture(autouse=True)
def hybridkv_active(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activation, "_active", True)
