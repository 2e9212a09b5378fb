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


def _uses_shared_serve(module: object) -> bool:
    return getattr(module, "running_serve", None) is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules on the shared local Serve (serve_harness.running_serve) run one after another, those on the plain
    demo variants (marker `demo_variants`) first: each such module then finds vLLM already serving them."""

    def order(item: pytest.Item) -> int:
        if "integration" not in item.path.parts:
            return 0
        if not _uses_shared_serve(getattr(item, "module", None)):
            return 3
        return 1 if item.get_closest_marker("demo_variants") else 2

    items.sort(key=order)  # stable: files and tests keep their order within each group


@pytest.fixture(autouse=True, scope="module")
def _own_ray_stops_shared_serve(request: pytest.FixtureRequest) -> None:
    """A module that does not use the shared Serve may start a Ray of its own (`make run`, a bare
    `ray.init`): the shared one must be gone by then."""
    if not _uses_shared_serve(request.module):
        import sys

        harness = sys.modules.get("serve_harness")
        if harness is not None:
            harness.stop_shared_serve()


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    harness = sys.modules.get("serve_harness")
    if harness is not None:
        harness.stop_shared_serve()
