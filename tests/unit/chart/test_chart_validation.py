"""Every rendered object is valid: core kinds against Kubernetes 1.33 (strict), the RayService
against KubeRay's CRD (../shared/kuberay-crds), the ModelRollout against the project's own CRD."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from chart_helpers import CHART, VALUES_FILES, by_kind, crd_schema, render, shared_file

KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"RayService", "ModelRollout", "PodMonitor", "HTTPRoute"}
ALL_FEATURES = (
    "monitoring.podMonitor.enabled=true",
    "httpRoute.enabled=true",
    "httpRoute.parentRefs[0].name=gw",
    "networkPolicy.enabled=true",
)


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with fieldValidation=Strict: unknown fields
    are errors, not silently pruned."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_custom(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    # The API server always accepts the type and object metadata at the root, schema or not.
    envelope = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    root = {**schema, "properties": {**envelope, **schema.get("properties", {})}}
    errors = sorted(jsonschema.Draft7Validator(strict(root)).iter_errors(obj), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    path = shared_file("kuberay-crds/ray.io_rayservices.yaml", "KubeRay v1.7.0's RayService CRD")
    return crd_schema(path, "v1")


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_core_objects_validate_strictly_when_rendered(values: str) -> None:
    objects = render("helm3", VALUES_FILES[values], sets=ALL_FEATURES)
    core = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    assert {"Service", "PodDisruptionBudget", "NetworkPolicy"} <= {o["kind"] for o in core}
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_rayservice_matches_kuberay_crd_when_rendered(
    values: str, rayservice_schema: dict[str, Any]
) -> None:
    (rayservice,) = by_kind(render("helm3", VALUES_FILES[values]), "RayService")
    validate_custom(rayservice, rayservice_schema)


def test_strict_crd_check_refuses_unknown_field_when_misspelt(
    rayservice_schema: dict[str, Any],
) -> None:
    (rayservice,) = by_kind(render("helm3"), "RayService")
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(AssertionError, match="enableInTreeAutoscalling"):
        validate_custom(rayservice, rayservice_schema)


def test_modelrollout_example_matches_project_crd_when_rendered() -> None:
    schema = crd_schema(CHART / "crds" / "modelrollouts.serving.amalia.pt.yaml", "v1alpha1")
    rollouts = by_kind(render("helm3", VALUES_FILES["manifests"]), "ModelRollout")
    assert rollouts
    for rollout in rollouts:
        validate_custom(rollout, schema)


@pytest.mark.parametrize("namespaced", [True, False])
def test_chart_renders_no_object_of_its_own_crds_when_operator_enabled(namespaced: bool) -> None:
    """`helm install --dry-run=server` skips crds/, so an object of those CRDs in the templates
    fails the dry run on a fresh cluster; the operator creates its peering object itself."""
    objects = render("helm3", sets=(f"operator.namespaced={str(namespaced).lower()}",))
    own_groups = ("kopf.dev/", "serving.amalia.pt/")
    assert not [o["kind"] for o in objects if o["apiVersion"].startswith(own_groups)]
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--peering=amalia-operator" in container["args"]
    assert ("--namespace=amalia" in container["args"]) == namespaced
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's peer identity
