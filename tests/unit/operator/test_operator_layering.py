"""Import boundaries: the operator ships without amalia_serve; pure modules stay pure."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_operator_never_imports_serve_package_when_fully_loaded() -> None:
    loaded = imported_after("amalia_operator.handlers, amalia_operator.cli, amalia_operator.crd")
    assert "kopf" in loaded
    assert "amalia_serve" not in loaded and "ray" not in loaded and "torch" not in loaded


@pytest.mark.parametrize(
    "module", ["amalia_operator.rollout", "amalia_operator.serveconfig", "amalia_operator.patches"]
)
def test_pure_modules_import_no_kubernetes_when_loaded(module: str) -> None:
    loaded = imported_after(module)
    assert not {"kopf", "kubernetes", "aiohttp", "amalia_serve"} & loaded
