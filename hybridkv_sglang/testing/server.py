"""Start and stop a real SGLang server on CPU, for tests, the demo and benchmarks.

Launches either ``hybridkv-serve`` (compression on) or stock ``sglang serve --attention-backend
torch_native``, waits until it answers, and always kills the whole process group on exit. A
stock server runs without this plugin (``stock_environment``): SGLang would otherwise load it,
as it loads every installed plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import requests

from hybridkv_sglang.cli import CPU_ENVIRONMENT
from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.report import merged_snapshot

STARTUP_TIMEOUT_S = 240.0
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "hybridkv"
"""This package's entry point in SGLang's general-plugin group (pyproject.toml)."""
NO_CUDA_GRAPHS = (
    "--cuda-graph-backend-decode",
    "disabled",
    "--cuda-graph-backend-prefill",
    "disabled",
)
"""SGLang's current spelling of the deprecated ``--disable-cuda-graph`` (a CPU has no graphs)."""


def sglang_serve() -> list[str]:
    """``sglang serve``: SGLang's console script beside this interpreter (the current entry
    point; ``python -m sglang.launch_server`` is deprecated)."""
    return [shutil.which("sglang", path=str(Path(sys.executable).parent)) or "sglang", "serve"]


def stock_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) for a stock SGLang server: no hybridkv
    config, and ``SGLANG_PLUGINS`` naming every plugin that would load except hybridkv.

    SGLang loads every installed plugin when ``SGLANG_PLUGINS`` is empty or unset; otherwise only
    the comma-separated names it lists. So stock keeps the other plugins (a stock row differs
    from a hybridkv row by hybridkv alone), and when none is left the value is ``","``: not empty,
    and naming no plugin.
    """
    env = dict(os.environ if base is None else base)
    env.pop(ENV_VAR, None)
    listed = env.get("SGLANG_PLUGINS", "")
    if listed:  # SGLang's own test: any non-empty value restricts
        names = {name.strip() for name in listed.split(",") if name.strip()}
    else:
        names = {ep.name for ep in entry_points(group=PLUGIN_GROUP)}
    env["SGLANG_PLUGINS"] = ",".join(sorted(names - {PLUGIN_NAME})) or ","
    return env


def cpu_server_args(
    model_path: str | Path,
    port: int,
    *,
    max_total_tokens: int = 8192,
    context_length: int = 4096,
    max_running_requests: int = 8,
    extra: Sequence[str] = (),
) -> list[str]:
    """SGLang flags that serve a small float32 model on a CPU.

    ``--sleep-on-idle`` keeps an idle scheduler from busy-polling a core, which matters when a
    test session keeps several servers up on a 2-core machine.
    """
    return [
        "--model-path", str(model_path),
        "--device", "cpu",
        *NO_CUDA_GRAPHS,
        "--dtype", "float32",
        "--max-total-tokens", str(max_total_tokens),
        "--context-length", str(context_length),
        "--max-running-requests", str(max_running_requests),
        "--skip-server-warmup",
        "--sleep-on-idle",
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra,
    ]  # fmt: skip


def cpu_rank_binding(ranks: int, cores: Sequence[int] | None = None) -> dict[str, str]:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` CPU ranks (``tp × dp × pp``)
    its own share of ``cores`` (default: the cores this process may run on), ``"0|1"`` for two
    ranks on two cores.

    SGLang binds a CPU rank's threads to a NUMA node and refuses more ranks than nodes unless
    this variable lists one core set per rank; with it set, SGLang cannot size the KV pool from
    free memory, so pass ``--max-total-tokens`` (``cpu_server_args`` does).
    """
    available = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    if not 1 <= ranks <= len(available):
        raise ValueError(f"expected 1 <= ranks <= {len(available)} cores, got {ranks}")
    per_rank = len(available) // ranks
    sets = [available[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    return {"SGLANG_CPU_OMP_THREADS_BIND": "|".join(_core_set(s) for s in sets)}


def _core_set(cores: list[int]) -> str:
    """``"4-7"`` for consecutive cores, else ``"1,3"``."""
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A live server: its base URL, its process and where its log goes."""

    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_info(self) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/server_info", timeout=60)
        response.raise_for_status()
        return response.json()

    def hybridkv_stats(self) -> dict[str, Any]:
        """The hybridkv snapshot of the server: every scheduler's (data parallel) added up."""
        return merged_snapshot(self.base_url)


def _wait_ready(server: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"SGLang server exited with {server.process.returncode} during start-up:\n"
                + server.log()[-6000:]
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"SGLang server not ready after {timeout_s:.0f} s:\n{server.log()[-6000:]}")


@contextlib.contextmanager
def launch_server(
    model_path: str | Path,
    *,
    hybridkv: HybridKVConfig | None,
    log_path: Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
    **server_kwargs: Any,
) -> Iterator[RunningServer]:
    """Run a CPU server; ``hybridkv=None`` starts stock SGLang with ``torch_native``."""
    port = port or free_port()
    args = cpu_server_args(model_path, port, extra=extra_args, **server_kwargs)
    process_env = {**os.environ, **CPU_ENVIRONMENT, **(env or {})}
    if hybridkv is None:
        command = [*sglang_serve(), *args]
        command += ["--attention-backend", "torch_native"]
        process_env = stock_environment(process_env)
    else:
        command = [sys.executable, "-m", "hybridkv_sglang.cli", *args]
        process_env[ENV_VAR] = hybridkv.to_env()
    with serve_command(command, port, log_path, process_env, timeout_s=timeout_s) as server:
        yield server


@contextlib.contextmanager
def serve_command(
    command: Sequence[str],
    port: int,
    log_path: Path,
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Run any server command line serving on ``port`` in a process group of its own, logging to
    ``log_path``; ready when ``/health`` answers, the whole group killed when the block ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            list(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, timeout_s)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
