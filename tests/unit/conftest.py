"""Each unit test starts in a process that serves nothing, and leaves nothing behind.

Hooks act only where a scheduler opened its session (or a launcher recorded its config);
a test that needs one opens it (``session`` fixture), and the process state is reset after every
test, so nothing leaks into the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.session import current
from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
from hybridkv_sglang.runtime.session.stats import HybridKVStats


@pytest.fixture(autouse=True)
def fresh_process() -> Iterator[None]:
    current.reset()
    yield
    current.reset()


@pytest.fixture
def session() -> SchedulerSession:
    """An open session without decode metadata or storage (what the hooks reach)."""
    opened = SchedulerSession(HybridKVConfig(window=32, min_prompt_tokens=128), HybridKVStats())
    current.open_session(opened)
    return opened
