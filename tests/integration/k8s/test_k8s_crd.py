"""The ModelRollout CRD and the operator's writes, judged by a real kube-apiserver.

OpenAPI and CEL validation, the status subresource (the operator's whole memory must survive the
API server's pruning), resourceVersion conflicts on the RayService, and the peering object the
operator creates for itself.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest
import yaml
from k8s_harness import KUBERAY_CRDS, ROOT, Cluster
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from modelrollout_cases import BAD, GOOD, Case
from rollout_world import World, evaluated, measured

from amalia_operator import kube, serveconfig
from amalia_operator.constants import GROUP, PLURAL, VERSION
from amalia_operator.evaluation.attempts import EvaluationReport
from amalia_operator.models import CanaryVariant, RolloutSpec
from amalia_operator.rollout import ServeEdit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NS = "amalia"
EXAMPLE = ROOT / "examples" / "modelrollout-sft-to-dpo.yaml"


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    cluster.apply_crds(ROOT / "operators" / "crd", KUBERAY_CRDS)
    cluster.create_namespace(NS)
    return cluster


@pytest.fixture(scope="module")
def api(crds: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(str(crds.kubeconfig)))


def server_dry_run(cluster: Cluster, obj: dict[str, Any]) -> str:
    """What `kubectl create --dry-run=server` says: "" when the object is accepted."""
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(obj),
                             check=False)  # fmt: skip
    return "" if result.returncode == 0 else result.stderr


def test_crd_accepts_object_and_example_when_well_formed(crds: Cluster) -> None:
    assert server_dry_run(crds, GOOD) == ""
    assert server_dry_run(crds, yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))) == ""


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_crd_refuses_object_with_clear_message_when_invalid(crds: Cluster, case: Case) -> None:
    obj = copy.deepcopy(case.obj)
    obj["metadata"]["name"] = "bad"
    message = server_dry_run(crds, obj)
    assert 'The ModelRollout "bad" is invalid' in message and case.server in message, message


def write_status(api: client.CustomObjectsApi, name: str, body: dict[str, Any]) -> Any:
    """A merge patch to the ModelRollout's status subresource, as kopf sends them."""
    return api.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, name, body)


def statuses_of_a_rollout() -> list[dict[str, Any]]:
    """Every status a rollout writes on its way (pure state machine, simulated RayService):
    shadow traffic, evaluation attempts (running, inconclusive, passed), analysis progress, an
    outage, an inconclusive halt, the whole split, conditions."""
    spec = RolloutSpec.model_validate(
        {
            **GOOD["spec"],
            "steps": [
                {"setWeight": 10},
                {"shadow": {"percent": 2.5}},
                {
                    "evaluation": {
                        "goldenSet": {"configMapRef": {"name": "g", "key": "k.yaml"}},
                        "tolerance": 0.5,
                    }
                },
                {"analysis": {}},
                {"analysis": {}},
                {"setWeight": 100},
            ],
            "analysis": {"inconclusiveLimit": 0, "metrics": [{"name": "error-rate", "max": 0.01}]},
            "scaleDownDelaySeconds": 0,
        }
    )
    world = World(spec, {"amalia-sft": 90, "amalia-base": 10})
    out = []
    unreachable = evaluated([], [], errors=("ingress unreachable: refused",))
    stable, canary = [True, True, False], [True, False, False]
    for measurement, action, report in [
        (None, None, None),
        (None, None, None),
        (None, None, None),
        (None, None, None),  # shadow on
        (None, None, None),  # evaluation: attempt 1 starts
        (None, None, EvaluationReport(answered=3, planned=6)),
        (None, None, unreachable),  # inconclusive: attempt 2 later
        (None, None, None),  # attempt 2 starts
        (None, None, evaluated(stable, canary, errors=())),  # a regression, within tolerance
        (measured("Error", None), None, None),
        (measured("Successful"), None, None),
        (measured("Inconclusive", None), None, None),
        (None, "promote", None),
        *[(None, None, None)] * 5,  # setWeight 100, then the old stable's weight and application go
    ]:
        world.tick(measurement, action, after=timedelta(minutes=2), evaluation=report)
        out.append(world.status.model_copy(update={"weights": world.weights}).wire())
    assert world.status.phase == "Promoted", world.status.message
    return out


def test_status_subresource_keeps_every_status_field_the_operator_writes(
    api: client.CustomObjectsApi,
) -> None:
    """A field the CRD's status schema lacks is pruned without an error; a restarted operator
    would then resume from less than it wrote."""
    body = copy.deepcopy(GOOD)
    body["metadata"] = {"name": "status-roundtrip", "namespace": NS}
    api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    seen_keys: set[str] = set()
    for status in statuses_of_a_rollout():
        write_status(api, "status-roundtrip", {"status": None})
        write_status(api, "status-roundtrip", {"status": status})
        stored = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "status-roundtrip")
        assert stored["status"] == status
        for nested in ("analysis", "evaluation", "lastEvaluation"):
            seen_keys |= set(status) | set(status.get(nested) or {})
    assert {"weights", "weightChangedAt", "analysis", "outageSince", "halted", "shadow",
            "evaluation", "startedAt", "nextAttemptAt", "answered", "lastEvaluation",
            "goldenSet", "regressions", "regressionCount", "threshold"} <= seen_keys  # fmt: skip


def test_status_and_spec_are_written_only_through_their_own_endpoints(
    api: client.CustomObjectsApi,
) -> None:
    body = copy.deepcopy(GOOD)
    body["metadata"] = {"name": "subresource", "namespace": NS}
    api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    api.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "subresource", {"status": {"phase": "Promoted"}}
    )
    write_status(
        api, "subresource", {"spec": {"rayServiceName": "other"}, "status": {"phase": "Paused"}}
    )
    stored = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "subresource")
    assert stored["status"] == {"phase": "Paused"}  # the main endpoint's status was dropped
    assert stored["spec"]["rayServiceName"] == "amalia"  # /status does not write spec
    assert stored["metadata"]["generation"] == 1  # status writes do not bump the generation
    with pytest.raises(ApiException) as refused:
        write_status(
            api, "subresource", {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}}
        )
    assert refused.value.status == 422 and "Unsupported value" in str(refused.value.body)


HEAD = {
    "rayStartParams": {},
    "template": {"spec": {"containers": [{"name": "ray-head", "image": "ray:2.60.0"}]}},
}


SERVE_CONFIG = """\
applications:
- name: amalia
  route_prefix: /
  import_path: amalia_serve.app:build_app
  args: {model_alias: amalia}
  deployments:
  - name: AmaliaIngress
    user_config:
      weights: {amalia-sft: 90, amalia-base: 10}
- name: amalia-sft
  route_prefix: null
  import_path: amalia_serve.app:build_variant_app
  args: {name: amalia-sft, model_path: /models/sft}
- name: amalia-base
  route_prefix: null
  import_path: amalia_serve.app:build_variant_app
  args: {name: amalia-base, model_path: /models/base}
"""


def test_serve_config_edit_keeps_concurrent_write_when_api_server_answers_conflict(
    crds: Cluster, api: client.CustomObjectsApi
) -> None:
    """A real 409: another writer changes the RayService between our read and our patch."""
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "conflict", "namespace": NS},
        "spec": {"serveConfigV2": SERVE_CONFIG, "rayClusterConfig": {"headGroupSpec": HEAD}},
    }
    api.create_namespaced_custom_object("ray.io", "v1", NS, "rayservices", rayservice)
    canary = CanaryVariant(name="amalia-new", model_path="/models/new")
    change = ServeEdit("amalia-sft", "amalia-new", 50, add_canary=True)
    calls: list[str] = []

    def edit(text: str) -> str:
        calls.append(text)
        if len(calls) == 1:  # someone else retunes the base variant meanwhile
            concurrent = text.replace("model_path: /models/base}", "model_path: /models/base2}")
            api.patch_namespaced_custom_object(
                "ray.io", "v1", NS, "rayservices", "conflict",
                {"spec": {"serveConfigV2": concurrent}},
            )  # fmt: skip
        return serveconfig.apply_edit(text, "amalia", change, canary)

    rayservices = kube.RayServices(api, retry_delay_s=0.01)
    changed, text = rayservices.edit_serve_config(NS, "conflict", edit)
    assert changed and len(calls) == 2  # the first patch met a 409 and was recomputed
    stored = api.get_namespaced_custom_object("ray.io", "v1", NS, "rayservices", "conflict")
    assert stored["spec"]["serveConfigV2"] == text
    assert "model_path: /models/base2}" in text  # the other writer's change survived
    assert serveconfig.observe(text, "amalia").weights == {
        "amalia-sft": 45,
        "amalia-base": 10,
        "amalia-new": 45,
    }


@pytest.mark.parametrize("namespaces", [[NS], []], ids=["namespaced", "cluster"])
def test_operator_creates_its_peering_object_once_when_missing(
    api: client.CustomObjectsApi, namespaces: list[str]
) -> None:
    kube.ensure_peering(api, "amalia-operator", namespaces)
    kube.ensure_peering(api, "amalia-operator", namespaces)  # AlreadyExists is fine
    if namespaces:
        obj = api.get_namespaced_custom_object(
            "kopf.dev", "v1", NS, "kopfpeerings", "amalia-operator"
        )
    else:
        obj = api.get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "amalia-operator"
        )
    assert obj["metadata"]["name"] == "amalia-operator"
