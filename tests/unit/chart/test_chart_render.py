"""helm lint and helm template succeed with helm 3 and helm 4 for every CI values file."""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_helpers import CHART, VALUES_FILES, one, render, run_helm, serve_config, template_args


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_chart_lints_cleanly_when_values_are_valid(helm: str, values: str) -> None:
    path: Path | None = VALUES_FILES[values]
    args = ["lint", str(CHART), "--strict"] + (["--values", str(path)] if path else [])
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_chart_renders_same_objects_when_helm3_or_helm4(values: str) -> None:
    path = VALUES_FILES[values]
    three, four = render("helm3", path), render("helm4", path)
    assert three == four
    assert one(three, "RayService")["apiVersion"] == "ray.io/v1"


def test_serve_config_is_deterministic_when_rendered_twice() -> None:
    path = VALUES_FILES["production-gpu"]
    first = run_helm("helm3", *template_args(path)).stdout
    assert first == run_helm("helm3", *template_args(path)).stdout
    assert serve_config(render("helm3", path))["applications"][0]["name"] == "amalia"
