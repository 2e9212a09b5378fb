"""The chart against a real kube-apiserver: `helm install --dry-run=server` on a cluster that has
never had the chart, then real installs and upgrades with helm 3 and helm 4, and
`helm template | kubectl apply --server-side`, in the order docs/kubernetes.md gives."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from k8s_harness import CHART, KUBERAY_CRDS, SHARED, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PRODUCTION = CHART / "ci" / "production-gpu-values.yaml"
MANIFESTS_VALUES = CHART / "ci" / "manifests-values.yaml"
GATEWAY_CRDS = SHARED / "mesh-crds" / "gateway-api-v1.6.1-standard-crds.yaml"
# No Prometheus Operator here: its PodMonitor CRD is absent, as on many clusters.
NO_PODMONITOR = ("--set", "monitoring.podMonitor.enabled=false")


@pytest.fixture(scope="module")
def prerequisites(cluster: Cluster) -> Cluster:
    """What the docs ask for before the chart: KubeRay's CRDs (and Gateway API for HTTPRoute)."""
    cluster.apply_crds(KUBERAY_CRDS, GATEWAY_CRDS)
    return cluster


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_dry_run_on_server_passes_before_the_charts_crds_exist(prerequisites: Cluster) -> None:
    crds = [c["metadata"]["name"] for c in prerequisites.get("crd")["items"]]
    assert "modelrollouts.serving.amalia.pt" not in crds and "kopfpeerings.kopf.dev" not in crds
    for helm in ("helm3", "helm4"):
        for values in (None, PRODUCTION):
            args = ["install", "amalia", str(CHART), "-n", "dry", "--create-namespace",
                    "--dry-run=server", *NO_PODMONITOR]  # fmt: skip
            if values is not None:
                args += ["-f", str(values)]
            result = prerequisites.helm(helm, *args, check=False)
            assert result.returncode == 0, f"{helm} {values}: {result.stderr}"
            assert "kind: RayService" in result.stdout
    # modelRollouts are objects of the chart's own CRD: the documented order applies it first.
    with_rollouts = ["install", "amalia", str(CHART), "-n", "dry", "--create-namespace",
                     "--dry-run=server", "-f", str(MANIFESTS_VALUES), *NO_PODMONITOR]  # fmt: skip
    refused = prerequisites.helm("helm3", *with_rollouts, check=False)
    assert refused.returncode != 0 and 'no matches for kind "ModelRollout"' in refused.stderr
    prerequisites.apply_crds(CHART / "crds")  # kubectl apply --server-side -f charts/amalia/crds/
    assert prerequisites.helm("helm3", *with_rollouts).returncode == 0
    assert not prerequisites.get("namespaces", "--field-selector=metadata.name=dry")["items"]


@pytest.mark.parametrize("helm", ["helm3", "helm4"])
def test_chart_installs_and_upgrades_when_prerequisites_are_met(
    prerequisites: Cluster, helm: str
) -> None:
    ns = f"prod-{helm}"
    install = ["install", "amalia", str(CHART), "-n", ns, "--create-namespace", "-f",
               str(PRODUCTION), *NO_PODMONITOR]  # fmt: skip
    prerequisites.helm(helm, *install)
    policy = prerequisites.get("networkpolicy", "amalia-ray", "-n", ns)
    assert [r.get("ports", [{}])[0].get("port") for r in policy["spec"]["ingress"]] == [
        None,
        "serve",
        "metrics",
        "dashboard",
    ]
    assert prerequisites.get("httproute", "amalia", "-n", ns)["spec"]["parentRefs"]
    upgrade = ["upgrade", "amalia", str(CHART), "-n", ns, "-f", str(PRODUCTION), *NO_PODMONITOR,
               "--set", "serve.weights.amalia-sft=80", "--set", "serve.weights.amalia-dpo=20"]  # fmt: skip
    prerequisites.helm(helm, *upgrade)
    rayservice = prerequisites.get("rayservice", "amalia", "-n", ns)
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    weights = config["applications"][0]["deployments"][0]["user_config"]["weights"]
    assert weights == {"amalia-sft": 80, "amalia-dpo": 20}


def test_template_output_applies_server_side_into_release_namespace(prerequisites: Cluster) -> None:
    """`helm template | kubectl apply --server-side -f -` (GitOps tools do this) with no `-n`:
    every object names its namespace itself."""
    prerequisites.create_namespace("gitops")
    rendered = prerequisites.helm(
        "helm4", "template", "amalia", str(CHART), "-n", "gitops", "-f", str(PRODUCTION),
        *NO_PODMONITOR, "--skip-tests",
    ).stdout  # fmt: skip
    applied = prerequisites.kubectl(
        "apply", "--server-side", "--field-manager=gitops", "-f", "-", input=rendered
    )
    assert "serverside-applied" in applied.stdout
    for obj in objects(rendered):
        meta = obj["metadata"]
        group = obj["apiVersion"].rpartition("/")[0]
        args = [f"{obj['kind'].lower()}.{group}".rstrip("."), meta["name"], "--show-managed-fields"]
        if "namespace" in meta:
            args += ["-n", meta["namespace"]]
        stored = prerequisites.get(*args)
        assert stored["metadata"].get("namespace") in (None, "gitops"), args
        managers = {m["manager"] for m in stored["metadata"]["managedFields"]}
        assert "gitops" in managers
