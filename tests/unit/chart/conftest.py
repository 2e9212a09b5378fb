"""Fixtures of the chart tests; the helpers live in chart_helpers.py."""

from __future__ import annotations

import pytest
from chart_helpers import HELMS


@pytest.fixture(params=sorted(HELMS))
def helm(request: pytest.FixtureRequest) -> str:
    """Each chart test that takes `helm` runs with helm 3 and with helm 4."""
    name: str = request.param
    return name
