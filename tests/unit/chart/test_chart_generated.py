"""The chart's copied files and manifests/ are what `make manifests` would write now."""

from __future__ import annotations

import subprocess
import sys

from chart_helpers import ROOT


def test_generated_chart_files_and_manifests_are_current_when_checked() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
