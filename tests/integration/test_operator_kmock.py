"""The real operator (kopf.testing.KopfRunner) against kmock's Kubernetes API emulator over HTTP.

kmock merges every PATCH into its stored object and keeps no resourceVersion, so it cannot produce a
conflict on its own. The test injects one: the first RayService PATCH is answered 409 while a
"concurrent writer" changes another application and bumps resourceVersion, exactly what a real API
server would have. The operator must re-read and send a second PATCH that keeps the other writer's
change. Every assertion is on the exact requests the operator sent, not on the mock's lenient state.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from amalia_operator import cli, constants, serveconfig
from amalia_operator.models import CanaryVariant
from amalia_operator.rbac import RULES
from amalia_operator.rollout import ServeEdit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NS, ROLLOUT, RAYSERVICE = "amalia", "sft-to-dpo", "amalia"
ROLLOUTS = kmock.resource("serving.amalia.pt", "v1alpha1", "modelrollouts")
RAYSERVICES = kmock.resource("ray.io", "v1", "rayservices")
EVENTS = kmock.resource("", "v1", "events")
SERVE_CONFIG = """\
applications:
- name: other
  import_path: other.app:build   # someone else's app
  args: {}
- name: amalia
  route_prefix: /
  import_path: amalia_serve.app:build_app
  args: {model_alias: amalia}
  deployments:
  - name: AmaliaIngress
    user_config:
      weights: {amalia-sft: 100}
- name: amalia-sft
  route_prefix: null
  import_path: amalia_serve.app:build_variant_app
  args:
    name: amalia-sft
    model_path: /models/sft
    engine: {dtype: auto}
"""
CONCURRENT = SERVE_CONFIG.replace("import_path: other.app:build ", "import_path: other.app:build2")
CANARY = CanaryVariant(name="amalia-dpo", model_path="/models/dpo")
STEPS = [{"setWeight": 20}, {"pause": {}}, {"setWeight": 100}]


def expected(text: str, percent: int, add: bool = False, remove: tuple[str, ...] = ()) -> str:
    change = ServeEdit("amalia-sft", CANARY.name, percent, add, remove)
    return serveconfig.apply_edit(text, "amalia", change, CANARY)


@pytest.fixture()
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> kopf.OperatorRegistry:
    """A fresh kopf registry and a fresh import of the handlers, with a 0.5 s timer interval."""
    monkeypatch.setattr(constants, "TICK_INTERVAL_S", 0.5)
    monkeypatch.delitem(sys.modules, "amalia_operator.handlers", raising=False)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)  # a fresh registry has no login yet
    return registry


@pytest.fixture()
def kubeconfig(
    kmock: kmock.KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "kmock", "user": {"token": "test"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "kmock", "namespace": NS},
                    }
                ],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubernetes.config reads $KUBECONFIG at import; kopf's default login uses that snapshot.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


def seed(kmock: kmock.KubernetesEmulator) -> None:
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", namespaced=False, verbs={"list", "watch"}
    )
    kmock.resources["v1/events"] = kmock.ResourceInfo(
        kind="Event", namespaced=True, verbs={"create"}
    )
    kmock.resources["serving.amalia.pt/v1alpha1/modelrollouts"] = kmock.ResourceInfo(
        kind="ModelRollout",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "patch"},
    )
    kmock.resources["ray.io/v1/rayservices"] = kmock.ResourceInfo(
        kind="RayService",
        namespaced=True,
        verbs={"get", "patch"},
    )
    kmock.objects[RAYSERVICES, NS, RAYSERVICE] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE, "namespace": NS, "resourceVersion": "1"},
        "spec": {"serveConfigV2": SERVE_CONFIG},
        "status": {
            "activeServiceStatus": {
                "applicationStatuses": {
                    "amalia": {
                        "status": "RUNNING",
                        "serveDeploymentStatuses": {"AmaliaIngress": {"status": "HEALTHY"}},
                    },
                    "amalia-sft": {
                        "status": "RUNNING",
                        "serveDeploymentStatuses": {"amalia-sft": {"status": "HEALTHY"}},
                    },
                }
            }
        },
    }
    kmock.objects[ROLLOUTS, NS, ROLLOUT] = {
        "apiVersion": "serving.amalia.pt/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {
            "name": ROLLOUT,
            "namespace": NS,
            "generation": 1,
            "uid": "uid-1",
            "resourceVersion": "1",
        },
        "spec": {
            "rayServiceName": RAYSERVICE,
            "stable": {"name": "amalia-sft", "modelPath": "/models/sft"},
            "canary": {"name": "amalia-dpo", "modelPath": "/models/dpo"},
            "steps": STEPS,
            "scaleDownDelaySeconds": 0,
        },
    }


def canary_app_status(app_state: str) -> dict[str, Any]:
    """RayService status of the canary's application, its deployment already HEALTHY."""
    deployments = {"amalia-dpo": {"status": "HEALTHY"}}
    app = {"status": app_state, "serveDeploymentStatuses": deployments}
    return {"status": {"activeServiceStatus": {"applicationStatuses": {"amalia-dpo": app}}}}


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_operator_patches_rayservice_retries_conflict_and_writes_status_when_rolling_out(
    kmock: kmock.KubernetesEmulator, kubeconfig: Path, fast_ticks: kopf.OperatorRegistry
) -> None:
    seed(kmock)
    rayservice = kmock.objects[RAYSERVICES, NS, RAYSERVICE]
    rollout = kmock.objects[ROLLOUTS, NS, ROLLOUT]

    def concurrent_writer(request: kmock.Request) -> dict[str, Any]:
        # Undo what the emulator merged from the refused request, then apply "someone else's" write.
        rayservice.patch(
            {"metadata": {"resourceVersion": "2"}, "spec": {"serveConfigV2": CONCURRENT}}
        )
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "Conflict",
            "code": 409,
            "message": "the object has been modified",
        }

    kmock["patch", RAYSERVICES][:1] << 409 << concurrent_writer

    # kopf names events by generateName; kmock would key them all by the same None name and answer
    # 409 from the second one on, so forget each stored event once it has been recorded.
    def forget_event(request: kmock.Request) -> dict[str, Any]:
        kmock.objects[EVENTS, NS, None].delete()
        return {"kind": "Event", **request.data}

    kmock["post", EVENTS] << 201 << forget_event
    ray_patches = kmock["patch", RAYSERVICES]

    with KopfRunner(
        ["run", "-m", "amalia_operator.handlers", "--all-namespaces", "--standalone"],
        timeout=60,
        registry=fast_ticks,
    ) as runner:
        await wait_for(lambda: len(ray_patches) >= 2, "the canary to be added after the conflict")
        # KubeRay reports the canary's own application: deploying first, then running.
        rayservice.patch(canary_app_status("DEPLOYING"))
        await asyncio.sleep(1.5)  # three ticks: a healthy deployment in a deploying app waits
        assert rollout.get("status", {}).get("stage") == "Deploying"
        rayservice.patch(canary_app_status("RUNNING"))
        await wait_for(lambda: rollout.get("status", {}).get("phase") == "Paused", "the pause")
        assert await asyncio.to_thread(cli.main, ["promote", ROLLOUT]) == 0
        await wait_for(lambda: rollout.get("status", {}).get("phase") == "Promoted", "promotion")
        await wait_for(
            lambda: any(r.data["reason"] == "Promoted" for r in kmock["post", EVENTS]),
            "the Promoted event",
        )
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None

    # --- the RayService: exact merge patches, each carrying the resourceVersion it was based on ---
    added = expected(SERVE_CONFIG, 0, add=True)
    retried = expected(CONCURRENT, 0, add=True)
    at_20 = expected(retried, 20)
    at_100 = expected(at_20, 100)
    # Cleanup: the old stable's weight goes first, its application in a later patch.
    unweighted = expected(at_100, 100, remove=("amalia-sft",))
    final = expected(unweighted, 100, remove=("amalia-sft",))
    assert serveconfig.observe(at_20, "amalia").weights == {"amalia-sft": 80, "amalia-dpo": 20}
    assert "- name: amalia-sft" in unweighted and "- name: amalia-sft" not in final
    bodies = [
        (r.data["metadata"]["resourceVersion"], r.data["spec"]["serveConfigV2"])
        for r in ray_patches
    ]
    assert bodies == [
        ("1", added),
        ("2", retried),
        ("2", at_20),
        ("2", at_100),
        ("2", unweighted),
        ("2", final),
    ]
    assert all(
        set(r.data) == {"metadata", "spec"}
        and set(r.data["metadata"]) == {"resourceVersion"}
        and set(r.data["spec"]) == {"serveConfigV2"}
        for r in ray_patches
    )
    assert {r.headers["Content-Type"] for r in ray_patches} == {"application/merge-patch+json"}
    assert "import_path: other.app:build2" in final  # the concurrent writer's change survived
    assert serveconfig.observe(final, "amalia").variants == ("amalia-dpo",)

    # --- the ModelRollout: status only through /status; the action annotation consumed ---
    rollout_patches = list(kmock["patch", ROLLOUTS])
    status_patches = [r for r in rollout_patches if r.subresource == "status"]
    assert status_patches and all(set(r.data) == {"status"} for r in status_patches)
    assert not any("status" in r.data for r in rollout_patches if r.subresource is None)
    merge_patches = [r.data for r in rollout_patches if isinstance(r.data, dict)]
    actions = [
        p["metadata"]["annotations"]
        for p in merge_patches
        if "serving.amalia.pt/action" in p.get("metadata", {}).get("annotations", {})
    ]
    # The CLI asks, the operator consumes the request by removing the annotation (merge: null).
    assert actions == [{"serving.amalia.pt/action": "promote"}, {"serving.amalia.pt/action": None}]
    status = rollout["status"]
    assert status["phase"] == "Promoted" and status["canaryWeight"] == 100
    assert status["observedGeneration"] == 1 and status["stepIndex"] == len(STEPS)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Promoted")

    # --- RBAC: every API call made during the rollout is allowed by rbac.RULES ---
    verbs = {
        "LIST": "list",
        "WATCH": "watch",
        "FETCH": "get",
        "CREATE": "create",
        "UPDATE": "patch",
    }
    allowed = {
        (g, res, v)
        for rule in RULES
        for g in rule["apiGroups"]
        for res in rule["resources"]
        for v in rule["verbs"]
    }
    used = {
        (
            r.resource.group,
            r.resource.plural + (f"/{r.subresource}" if r.subresource else ""),
            verbs[r.action.value],
        )
        for r in kmock
        if r.resource is not None and r.resource.plural and r.action is not None
    }
    assert used and used <= allowed, used - allowed

    # --- Events ---
    events = [r.data for r in kmock["post", EVENTS]]
    reasons = [e["reason"] for e in events]
    assert reasons[:1] == ["CanaryHealthy"] and "Promoting" in reasons and "Promoted" in reasons
    assert all(e["involvedObject"]["name"] == ROLLOUT for e in events)
