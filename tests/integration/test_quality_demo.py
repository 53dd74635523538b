"""examples/quality_demo.py as a user runs it: two real CPU servers with the committed tile-task
model, a printed side-by-side table whose full-cache answers are right, whose hybridkv answers
are right on most questions, and whose every hybridkv request was compressed to about its
budget."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "examples" / "quality_demo.py"
QUESTIONS = 4
BUDGET = 0.1


def _percent(cell: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?) %", cell)
    assert match, f"expected a percentage, got {cell!r}"
    return float(match.group(1)) / 100


def test_demo_answers_side_by_side(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--questions", str(QUESTIONS), "--budget", str(BUDGET),
         "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    out = done.stdout

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kind "))
    columns = re.split(r"\s{2,}", lines[header])
    assert columns == [
        "kind", "question", "expected", "full cache", "hybridkv@10%", "prompt", "kept", "read",
    ]  # fmt: skip
    assert set(lines[header + 1]) == {"-"}
    rows = [re.split(r"\s{2,}", line) for line in lines[header + 2 : header + 2 + QUESTIONS]]
    assert set(lines[header + 2 + QUESTIONS]) == {"-"}, "expected one row per question"
    assert {row[0].split()[0] for row in rows} == {"describe", "pair_name", "multi_turn"}

    full_right = hybridkv_right = 0
    for kind, question, expected, full, hybridkv, prompt, kept, read in rows:
        assert question.endswith(("?", ".")) and expected
        full_right += full == f"{expected} ✓"
        hybridkv_right += hybridkv == f"{expected} ✓"
        assert hybridkv.endswith(("✓", "✗"))
        # Every prompt (32 images of 16 tokens) is compressed; a decode step reads about the
        # budget, and fewer entries than that stay resident (dynamic heads keep only their window).
        assert int(prompt) > 512
        assert abs(_percent(read) - BUDGET) < 0.02, (kind, read)
        assert 0.5 * BUDGET < _percent(kept) <= _percent(read) + 0.01, (kind, kept)
    assert full_right == QUESTIONS, out
    assert hybridkv_right >= QUESTIONS - 1, out
    assert f"accuracy: full cache {QUESTIONS}/{QUESTIONS} (100%)" in out
    assert f"hybridkv@10% {hybridkv_right}/{QUESTIONS}" in out
    assert f"hybridkv compressed {QUESTIONS}/{QUESTIONS} requests" in out
    print(f"quality demo: {elapsed:.0f} s")
