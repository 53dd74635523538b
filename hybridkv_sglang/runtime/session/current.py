"""The one accessor hooks reach this process's hybridkv state through.

SGLang loads every installed plugin in every process it starts, so hooks run in servers that never
select ``--attention-backend hybridkv``. A scheduler process that builds the backend opens its
:class:`~hybridkv_sglang.runtime.session.scheduler_session.SchedulerSession`; a launching process
(HTTP server, tokenizer manager, ``Engine``) whose resolved arguments select ``hybridkv`` records
its config. Everywhere else both are ``None`` and every hook passes SGLang's result through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridkv_sglang.config import HybridKVConfig
    from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession

BACKEND_NAME = "hybridkv"
"""``--attention-backend hybridkv``."""


@dataclass
class ProcessState:
    """What this process serves with hybridkv: a scheduler's session, a launcher's config."""

    session: SchedulerSession | None = None
    launch_config: HybridKVConfig | None = None


_process = ProcessState()


def current_session() -> SchedulerSession | None:
    """This scheduler process's session, or ``None`` (no ``hybridkv`` backend here)."""
    return _process.session


def open_session(session: SchedulerSession) -> None:
    """The backend factory: this scheduler process serves with ``session`` from now on."""
    _process.session = session


def launch_config() -> HybridKVConfig | None:
    """The config of a launching process that serves hybridkv, else ``None``."""
    return _process.launch_config


def set_launch_config(config: HybridKVConfig) -> None:
    """The launching process serves hybridkv with ``config``; its request hooks act from here."""
    _process.launch_config = config


def reset() -> None:
    """Forget everything this process served (tests, and a process reused for another server)."""
    global _process
    _process = ProcessState()
