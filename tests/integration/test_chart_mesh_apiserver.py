"""Every mesh provider's release is accepted by a real kube-apiserver holding the real CRDs.

One control plane (../shared/k8s) for the module, with the CRDs of Istio 1.31, Linkerd edge-26.8,
Gateway API v1.6.1 (../shared/mesh-crds), KubeRay (../shared/kuberay-crds) and the chart's own
installed for real. Each rendered object then goes through a server-side apply dry run with strict
field validation: OpenAPI schema, CEL rules and admission, exactly as `kubectl apply --server-side`
would see it, nothing persisted. Rendered with helm 3 and helm 4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
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


def _add_selector(policy: dict[str, Any]) -> None:
    policy["spec"]["selector"] = {"matchLabels": {"app": "x"}}


def _add_identities(authn: dict[str, Any]) -> None:
    authn["spec"]["identities"] = ["*"]  # next to identityRefs


def _misspell_field(rule: dict[str, Any]) -> None:
    outlier = rule["spec"]["trafficPolicy"]["outlierDetection"]
    outlier["consecutiveLocalOriginFailure"] = outlier.pop("consecutiveLocalOriginFailures")


@pytest.mark.parametrize(
    ("provider", "kind", "name", "breaks", "message"),
    [
        pytest.param("istio-ambient", "AuthorizationPolicy", "amalia-api", _add_selector,
                     "only one of targetRefs or selector", id="istio-selector-and-targetRefs"),
        pytest.param("linkerd", "MeshTLSAuthentication", "amalia-api-callers", _add_identities,
                     "must validate one and only one schema", id="linkerd-identities-and-refs"),
        # Server-side apply types the object with the CRD schema first, and says so.
        pytest.param("istio", "DestinationRule", "amalia", _misspell_field,
                     "consecutiveLocalOriginFailure: field not declared", id="istio-misspelled"),
    ],
)  # fmt: skip
def test_api_server_refuses_mesh_object_when_it_breaks_its_crd(
    cluster: ControlPlane,
    provider: str,
    kind: str,
    name: str,
    breaks: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    obj = mesh_object(release("helm3", provider), kind, name)
    breaks(obj)
    with pytest.raises(ApiException, match=message):
        cluster.apply(obj, dry_run=True)
