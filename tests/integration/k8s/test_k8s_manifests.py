"""manifests/ applied exactly as docs/kubernetes.md says, on a real kube-apiserver: every object
lands in namespace `amalia`, none in `default`, the PodMonitor only where its CRD exists, and the
operator's ServiceAccount gets the permissions its bindings promise."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_harness import KUBERAY_CRDS, ROOT, TOOLS, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOC = ROOT / "docs" / "kubernetes.md"
MARKER = "test_k8s_manifests.py"
NS = "amalia"


def documented_commands() -> str:
    """The shell block that follows this module's marker in docs/kubernetes.md."""
    text = DOC.read_text(encoding="utf-8")
    after = text[text.index(MARKER) :]
    block = after[after.index("```sh\n") + len("```sh\n") :]
    return block[: block.index("```")]


def objects_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.fixture(scope="module")
def applied(cluster: Cluster) -> Cluster:
    cluster.apply_crds(KUBERAY_CRDS)  # a prerequisite, like the KubeRay operator itself
    script = documented_commands()
    assert "manifests/operator.yaml" in script and "podmonitor.yaml" in script
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env={**cluster.env, "PATH": f"{TOOLS}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return cluster


@pytest.mark.parametrize("name", ["namespace", "operator", "rayservice", "dashboards"])
def test_manifests_land_in_their_namespace_when_applied_as_documented(
    applied: Cluster, name: str
) -> None:
    for obj in objects_in(ROOT / "manifests" / f"{name}.yaml"):
        meta = obj["metadata"]
        args = [obj["kind"].lower(), meta["name"]]
        if "namespace" in meta:
            assert meta["namespace"] == NS
            args += ["-n", NS]
        assert applied.get(*args)["metadata"]["name"] == meta["name"]


def test_manifests_put_nothing_in_default_namespace_when_applied(applied: Cluster) -> None:
    kinds = "rayservices,deployments,serviceaccounts,roles,rolebindings,services,configmaps"
    items = applied.get(kinds, "-n", "default")["items"]
    ours = [f"{i['kind']}/{i['metadata']['name']}" for i in items]
    # The API server makes the `kubernetes` Service itself; everything else would be ours.
    assert ours == ["Service/kubernetes"], ours


def test_podmonitor_is_left_out_when_prometheus_operator_is_absent(applied: Cluster) -> None:
    crds = [c["metadata"]["name"] for c in applied.get("crd")["items"]]
    assert "podmonitors.monitoring.coreos.com" not in crds
    refused = applied.kubectl("apply", "--dry-run=server", "-f", "manifests/podmonitor.yaml",
                              check=False)  # fmt: skip
    assert refused.returncode != 0 and "PodMonitor" in refused.stderr  # why it is conditional


def test_manifests_bind_the_operator_account_in_its_namespace_when_applied(
    applied: Cluster,
) -> None:
    account = f"system:serviceaccount:{NS}:amalia-operator"
    for verb, resource in [
        ("patch", "rayservices.ray.io"),
        ("watch", "modelrollouts.serving.amalia.pt"),
        ("create", "kopfpeerings.kopf.dev"),
    ]:
        result = applied.kubectl("auth", "can-i", verb, resource, "-n", NS, "--as", account,
                                 check=False)  # fmt: skip
        assert result.stdout.strip() == "yes", (verb, resource, result.stderr)
    example = ROOT / "manifests" / "modelrollout-example.yaml"
    applied.kubectl("apply", "-f", str(example))
    (rollout,) = objects_in(example)
    assert applied.get("modelrollout", rollout["metadata"]["name"], "-n", NS)
