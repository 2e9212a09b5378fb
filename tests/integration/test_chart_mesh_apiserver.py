"""Every mesh provider's release is accepted by a real kube-apiserver holding the real CRDs.

One control plane (../shared/k8s) for the module, with the CRDs of Istio 1.31, Linkerd edge-26.8,
Gateway API v1.6.1 (../shared/mesh-crds), KubeRay (../shared/kuberay-crds) and the chart's own
installed for real. Each rendered object then goes through a server-side apply dry run with strict
field validation: OpenAPI schema, CEL rules and admission, exactly as `kubectl apply --server-side`
would see it, nothing persisted. Rendered with helm 3 and helm 4.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_control_plane import ControlPlane, control_plane, unavailable_reason
from kubernetes.client.exceptions import ApiException
from unit.chart.chart_helpers import CHART, CI_VALUES, SHARED, render

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NAMESPACE = "amalia"
CRD_FILES = [
    *sorted((SHARED / "mesh-crds").glob("*.yaml")),
    *sorted((SHARED / "kuberay-crds").glob("*.yaml")),
    *sorted((CHART / "crds").glob("*.yaml")),
]
RELEASES: dict[str, Path | None] = {
    "none": None,
    "istio": CI_VALUES / "mesh-istio-values.yaml",
    "istio-ambient": CI_VALUES / "mesh-istio-ambient-values.yaml",
    "linkerd": CI_VALUES / "mesh-linkerd-values.yaml",
}
MESH_GROUPS = (
    "security.istio.io", "networking.istio.io", "policy.linkerd.io", "gateway.networking.k8s.io",
)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with control_plane(tmp_path_factory.mktemp("control-plane")) as plane:
        installed = plane.install_crds(CRD_FILES)
        assert len(installed) >= 30, installed
        plane.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        # No controller-manager here: the namespace's default ServiceAccount is ours to create.
        default = {"name": "default", "namespace": NAMESPACE}
        plane.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": default})
        yield plane


def release(helm: str, provider: str) -> list[dict[str, Any]]:
    objects = render(helm, RELEASES[provider])
    for obj in objects:
        obj["metadata"].setdefault("namespace", NAMESPACE)
    return objects


def dry_run_release(cluster: ControlPlane, objects: list[dict[str, Any]]) -> list[str]:
    """Apply ServiceAccounts for real (a Pod must name an existing one), dry-run everything else."""
    accepted = []
    for obj in sorted(objects, key=lambda o: o["kind"] != "ServiceAccount"):
        applied = cluster.apply(obj, dry_run=obj["kind"] != "ServiceAccount")
        accepted.append(f"{applied['kind']}/{applied['metadata']['name']}")
    return accepted


def mesh_object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return copy.deepcopy(found)


@pytest.mark.parametrize("helm", ["helm3", "helm4"])
@pytest.mark.parametrize("provider", sorted(RELEASES))
def test_release_passes_server_dry_run_when_mesh_provider_is_set(
    cluster: ControlPlane, helm: str, provider: str
) -> None:
    objects = release(helm, provider)
    accepted = dry_run_release(cluster, objects)
    assert len(accepted) == len(objects)
    mesh = [o for o in objects if o["apiVersion"].split("/")[0] in MESH_GROUPS]
    # HTTPRoute (Gateway API) is the only mesh-group object a release without a mesh may render.
    assert bool([o for o in mesh if o["kind"] != "HTTPRoute"]) == (provider != "none")


def test_api_server_refuses_authorization_policy_when_it_has_selector_and_target(
    cluster: ControlPlane,
) -> None:
    objects = release("helm3", "istio-ambient")
    waypoint_policy = mesh_object(objects, "AuthorizationPolicy", "amalia-api")
    waypoint_policy["spec"]["selector"] = {"matchLabels": {"app": "x"}}
    with pytest.raises(ApiException, match="only one of targetRefs or selector") as refused:
        cluster.apply(waypoint_policy, dry_run=True)
    assert refused.value.status == 422


def test_api_server_refuses_mesh_tls_authentication_when_identities_are_doubled(
    cluster: ControlPlane,
) -> None:
    authn = mesh_object(release("helm3", "linkerd"), "MeshTLSAuthentication", "amalia-api-callers")
    authn["spec"]["identities"] = ["*"]  # next to identityRefs: the CRD's oneOf refuses both
    with pytest.raises(ApiException) as refused:
        cluster.apply(authn, dry_run=True)
    assert refused.value.status == 422


def test_api_server_refuses_destination_rule_when_a_field_is_misspelled(
    cluster: ControlPlane,
) -> None:
    rule = mesh_object(release("helm3", "istio"), "DestinationRule", "amalia")
    outlier = rule["spec"]["trafficPolicy"]["outlierDetection"]
    outlier["consecutiveLocalOriginFailure"] = outlier.pop("consecutiveLocalOriginFailures")
    # Server-side apply builds a typed object from the CRD schema first, and says so.
    with pytest.raises(ApiException, match="consecutiveLocalOriginFailure: field not declared"):
        cluster.apply(rule, dry_run=True)
