"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing a test runs may reach a model hub, and a local Ray cluster needs no token on loopback.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Workers push metrics every 10 s by default; tests that scrape them should not wait that long.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny SFT and DPO demo checkpoints, built once per test session."""
    from amalia_serve.demo_model import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("demo-models"))
