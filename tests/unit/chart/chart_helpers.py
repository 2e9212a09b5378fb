"""Renders charts/amalia with the real helm 3 and helm 4 (scripts/install-test-tools.sh)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "amalia"
CI_VALUES = CHART / "ci"
SHARED = ROOT.parent / "shared"
HELMS = {"helm3": ROOT / ".tools" / "bin" / "helm3", "helm4": ROOT / ".tools" / "bin" / "helm4"}
VALUES_FILES = {
    "default": None,
    "production-gpu": CI_VALUES / "production-gpu-values.yaml",
    "minimal": CI_VALUES / "minimal-values.yaml",
    "manifests": CI_VALUES / "manifests-values.yaml",
}

Render = Callable[..., list[dict[str, Any]]]


def helm_binary(name: str) -> Path:
    path = HELMS[name]
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools` (scripts/install-test-tools.sh)")
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary(helm)), *args], capture_output=True, text=True, timeout=60, check=False
    )


def template_args(
    values: Path | None, sets: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> list[str]:
    args = ["template", "amalia", str(CHART), "--namespace", "amalia"]
    if values is not None:
        args += ["--values", str(values)]
    for item in sets:
        args += ["--set", item]
    return args + list(extra)


def render(
    helm: str = "helm3",
    values: Path | None = None,
    sets: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The objects `helm template` prints, failing the test with helm's stderr on error."""
    result = run_helm(helm, *template_args(values, sets, extra))
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
    return config


def ray_pod_specs(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def shared_file(relative: str, what: str) -> Path:
    """A file of the read-only data CI places beside the clone as ../shared.

    A fresh clone has no ../shared: the test skips and says what is missing. Where the CI
    variable is set (CI providers set CI=true) a missing file fails instead, so CI never
    passes by skipping.
    """
    path = SHARED / relative
    if not path.exists():
        message = f"needs {what}: {path} is missing (CI places shared/ beside the clone as ../shared)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{path.name} has no version {version}")
