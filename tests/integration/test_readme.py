"""The README's CPU commands, run as a new user runs them, from the repository root.

The "Serve on this CPU" section is read from README.md itself, so the test follows the text: its
setup commands run first, then each server command in the background (port 30000 swapped for a
free one) with the section's requests against it, every request's output checked for what the
README promises (compression, a request's own budget). ``make demo`` runs too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkv_sglang.report import request_record
from hybridkv_sglang.testing.server import RunningServer, free_port, serve_command

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Serve on this CPU, step by step"
README_PORT = "30000"


def section_commands() -> list[str]:
    """The shell commands of the section's ``bash`` blocks, in order, one string each (lines
    continued by ``\\`` or by an open quote are joined)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.DOTALL):
        pending = ""
        for line in block.splitlines():
            pending += line + "\n"
            if pending.rstrip().endswith("\\") or not _complete(pending):
                continue
            commands.append(pending.strip())
            pending = ""
        assert not pending.strip(), f"unfinished command in the README: {pending!r}"
    return commands


def _complete(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def _is_server(command: str) -> bool:
    return "hybridkv-serve " in command or "sglang serve " in command


def _shell_env() -> dict[str, str]:
    """This interpreter's environment first on PATH, as ``source .venv/bin/activate`` gives."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _run(command: str, port: int) -> str:
    done = subprocess.run(
        ["bash", "-c", command.replace(README_PORT, str(port))],
        cwd=ROOT,
        env=_shell_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def _check_request(command: str, output: str, server: RunningServer) -> None:
    """What the README says each request shows."""
    if "/generate" in command:
        reply = json.loads(output)
        record, _ = request_record(server.base_url, reply["meta_info"]["id"])
        assert record["compressed"] and record["extra"]["budget"] == 0.05, record
    elif "/server_info" in command:
        assert "'compressed_requests': " in output, output
    else:
        assert "hybridkv compressed" in output and "served dense" not in output, output
        budget = "5.0%" if "--budget 0.05" in command else "10.0%"
        assert f"at a budget of {budget}" in output, output
    if "multi_turn_agent" in command:  # turns 2-4 hit the cached image prefix
        cached = [int(n) for n in re.findall(r"tokens, (\d+) cached", output)]
        assert len(cached) == 4 and all(c > 256 for c in cached[1:]), output


def test_readme_cpu_section_runs_as_written(tmp_path: Path) -> None:
    commands = section_commands()
    servers = [c for c in commands if _is_server(c)]
    setup = commands[: commands.index(servers[0])]
    requests_ = [c for c in commands[commands.index(servers[-1]) + 1 :]]
    assert len(servers) == 2 and setup and requests_, commands
    for command in setup:
        _run(command, port=0)
    for index, command in enumerate(servers):
        port = free_port()
        argv = ["bash", "-c", command.replace(README_PORT, str(port))]
        log = tmp_path / f"server-{index}.log"
        with serve_command(argv, port, log, _shell_env(), cwd=ROOT, timeout_s=300) as server:
            # Every request against the first server; the launcher's alternative gets the first
            # two (the same config reaches it through HYBRIDKV_CONFIG).
            for request in requests_ if index == 0 else requests_[:2]:
                _check_request(request, _run(request, port), server)


def test_make_demo() -> None:
    done = subprocess.run(
        ["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("hybridkv compressed") == 2, done.stdout
