"""docs/capacity.md quotes `amalia-serve plan` as it prints today (scripts/capacity_docs.py refills it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_capacity_doc_examples_are_current_when_planner_changes() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "capacity_docs.py"), "--check"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (ROOT / "docs" / "capacity.md").read_text(encoding="utf-8").count("$ amalia-serve plan ") == 6
