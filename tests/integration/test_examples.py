"""Every example runs against a hybridkv server, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sgl_image_program(keep_all_server):
    out = _run("sgl_image_program.py", "--url", keep_all_server.base_url)
    assert "description:" in out and "colour:" in out


def test_openai_client(keep_all_server):
    out = _run("openai_client.py", "--url", keep_all_server.base_url)
    assert "answer:" in out and '"compressed": true' in out


def test_multi_turn_agent_reuses_the_image_prefix(keep_all_server):
    out = _run("multi_turn_agent.py", "--url", keep_all_server.base_url, "--max-new-tokens", "8")
    cached = [int(line.split(",")[1].split()[0]) for line in out.splitlines() if "cached" in line]
    assert len(cached) == 4 and all(c > 256 for c in cached[1:])
    assert "hybridkv compressed" in out
