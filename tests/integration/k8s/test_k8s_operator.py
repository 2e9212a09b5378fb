"""The operator on a real kube-apiserver, installed by the chart and running under the chart's
ServiceAccount token: rollouts with three variants, pause/promote/abort/retry, deletion, a renamed
canary aborted mid-removal, an evaluation step reading its golden set from a ConfigMap, shadow
traffic set and cleared, and restarts after SIGTERM and SIGKILL.

KubeRay does not run here: `KubeRayPlayer` writes the RayService status KubeRay would write.
Every call the operator makes goes through the chart's RBAC; a 403 would show in its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_harness import CHART, KUBERAY_CRDS, Cluster, KubeRayPlayer, OperatorProcess, wait_until
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from serve_harness import free_port

from amalia_operator import serveconfig
from amalia_operator.constants import FINALIZER, GROUP, KIND, PEERING_LIFETIME_S, PLURAL, VERSION

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NS, RELEASE, RAYSERVICE = "amalia", "amalia", "amalia"
OTHERS = {"amalia-dpo": 10, "amalia-base": 0}  # what no rollout of amalia-sft may touch
TICK_S = 0.5


def variant(name: str) -> dict[str, Any]:
    return {"name": name, "modelPath": f"/models/{name}", "gpus": 1, "replicas": 1}


VALUES = {
    "serve": {"weights": {"amalia-sft": 90, **OTHERS}},
    "variants": [variant("amalia-sft"), variant("amalia-dpo"), variant("amalia-base")],
}


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """KubeRay's CRDs, then the chart (its CRDs, the RayService, the operator's RBAC)."""
    cluster.apply_crds(KUBERAY_CRDS)
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    cluster.helm("helm4", "install", RELEASE, str(CHART), "-n", NS, "--create-namespace",
                 "-f", str(values))  # fmt: skip
    return cluster


@pytest.fixture(scope="module")
def api(installed: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(str(installed.kubeconfig)))


@pytest.fixture(scope="module")
def operator_kubeconfig(installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the operator's pod gets: a token of the chart's ServiceAccount."""
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    return installed.token_kubeconfig(NS, "amalia-operator", path)


@pytest.fixture(scope="module")
def kuberay(api: client.CustomObjectsApi) -> Iterator[KubeRayPlayer]:
    with KubeRayPlayer(api, NS, RAYSERVICE) as player:
        yield player


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operator-logs")


@pytest.fixture(scope="module")
def chart_config(api: client.CustomObjectsApi) -> str:
    """The serveConfigV2 the chart installed: amalia-sft 90, amalia-dpo 10, amalia-base 0."""
    obj = api.get_namespaced_custom_object("ray.io", "v1", NS, "rayservices", RAYSERVICE)
    text: str = obj["spec"]["serveConfigV2"]
    return text


@pytest.fixture()
def operator(
    api: client.CustomObjectsApi,
    chart_config: str,
    operator_kubeconfig: Path,
    logs: Path,
    kuberay: KubeRayPlayer,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    """The operator as its pod runs it, on the RayService as the chart made it (what an earlier
    test promoted is put back, as a `helm upgrade` would)."""
    api.patch_namespaced_custom_object(
        "ray.io", "v1", NS, "rayservices", RAYSERVICE, {"spec": {"serveConfigV2": chart_config}}
    )
    proc = OperatorProcess(
        operator_kubeconfig, NS, logs / f"{request.node.name}.log", "amalia-operator-0", TICK_S
    ).start()
    yield proc
    if proc.running():
        proc.signal(signal.SIGTERM)
    assert "Forbidden" not in proc.output() and " 403" not in proc.output(), proc.output()[-3000:]


def rollout(name: str, stable: str, canary: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "rayServiceName": RAYSERVICE,
            "stable": {"name": stable, "modelPath": f"/models/{stable}"},
            "canary": {"name": canary, "modelPath": f"/models/{canary}"},
            "steps": steps,
            "scaleDownDelaySeconds": 1,
        },
    }


def get_rollout(api: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    return obj


def status_of(api: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    return get_rollout(api, name).get("status") or {}


def wait_stage(api: client.CustomObjectsApi, name: str, stage: str, timeout_s: float = 60) -> Any:
    return wait_until(
        lambda: status_of(api, name).get("stage") == stage and status_of(api, name),
        f"{name} to reach stage {stage}",
        timeout_s,
    )


def wait_phase(api: client.CustomObjectsApi, name: str, phase: str, timeout_s: float = 60) -> Any:
    return wait_until(
        lambda: status_of(api, name).get("phase") == phase and status_of(api, name),
        f"{name} to reach phase {phase}",
        timeout_s,
    )


def live_config(api: client.CustomObjectsApi) -> serveconfig.AppView:
    obj = api.get_namespaced_custom_object("ray.io", "v1", NS, "rayservices", RAYSERVICE)
    return serveconfig.observe(obj["spec"]["serveConfigV2"], "amalia")


def rollout_cli(cluster: Cluster, *args: str) -> str:
    """`amalia-serve rollout ...` as a person runs it, with the admin's kubeconfig."""
    result = subprocess.run(
        [sys.executable, "-m", "amalia_operator.cli", *args, "-n", NS],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_rollout_moves_only_stable_share_and_promotes_under_chart_rbac(
    installed: Cluster,
    api: client.CustomObjectsApi,
    kuberay: KubeRayPlayer,
    operator: OperatorProcess,
) -> None:
    steps = [{"setWeight": 20}, {"pause": {}}, {"setWeight": 50}, {"pause": {"duration": "1s"}},
             {"setWeight": 100}]  # fmt: skip
    wait_until(
        lambda: live_config(api).weights == {"amalia-sft": 90, **OTHERS}, "the chart's split"
    )
    seen_before = len(kuberay.seen)
    api.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, rollout("sft-to-new", "amalia-sft", "amalia-new", steps)
    )
    paused = wait_phase(api, "sft-to-new", "Paused")
    assert paused["weights"] == {"amalia-sft": 72, **OTHERS, "amalia-new": 18}  # 20% of 90
    text = rollout_cli(installed, "status", "sft-to-new")
    assert "Step:       1/5 (pause until promoted)" in text
    split = "amalia-base 0 (0%), amalia-dpo 10 (10%), amalia-new 18 (18%), amalia-sft 72 (72%)"
    assert f"Traffic:    {split}" in text, text

    assert "promote requested" in rollout_cli(installed, "promote", "sft-to-new")
    done = wait_phase(api, "sft-to-new", "Promoted")
    assert done["weights"] == {**OTHERS, "amalia-new": 90}
    assert live_config(api) == serveconfig.AppView(
        ("amalia-dpo", "amalia-base", "amalia-new"), {**OTHERS, "amalia-new": 90}
    )
    # Every serveConfigV2 the operator wrote kept the other variants' weights.
    weights = [serveconfig.observe(t, "amalia").weights for t in kuberay.seen[seen_before:]]
    assert len(weights) >= 6 and all({n: w[n] for n in OTHERS} == OTHERS for w in weights)
    assert [w.get("amalia-new") for w in weights if "amalia-new" in w][:4] == [0, 18, 45, 90]

    obj = get_rollout(api, "sft-to-new")
    assert obj["metadata"]["finalizers"] == [FINALIZER]
    kopf_keys = [k for k in obj["metadata"].get("annotations", {}) if "kopf" in k]
    assert not kopf_keys, kopf_keys  # kopf's bookkeeping is under serving.amalia.pt/ too
    events = installed.get("events", "-n", NS, "--field-selector",
                           "involvedObject.name=sft-to-new")["items"]  # fmt: skip
    reasons = [e["reason"] for e in events]
    assert {"CanaryHealthy", "Promoting", "Promoted"} <= set(reasons), reasons

    # Deleting a rollout: the operator stops its timer and lets the object go.
    api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "sft-to-new")
    wait_until(lambda: not rollout_exists(api, "sft-to-new"), "the rollout to be deleted", 30)
    assert live_config(api).weights == {**OTHERS, "amalia-new": 90}  # the RayService stays


GOLDEN_SET = """\
apiVersion: evaluation.amalia.pt/v1
kind: GoldenSet
name: equipa-v1
maxTokens: 8
items:
  - id: capital
    category: factos
    prompt: "Qual é a capital de Portugal? Responde com uma palavra."
    check: {type: contains, expected: Lisboa}
    goodAnswers: ["Lisboa."]
    badAnswers: ["Porto."]
"""


def test_evaluation_reads_configmap_and_shadow_is_set_then_cleared_under_chart_rbac(
    installed: Cluster, api: client.CustomObjectsApi, kuberay: KubeRayPlayer,
    operator: OperatorProcess,
) -> None:  # fmt: skip
    """The evaluation step in the real operator process: its golden set read from a ConfigMap
    with the chart's RBAC, its run in the background (the ingress here is a port nothing listens
    on: an evaluator error), inconclusive, paused for a person; then shadow traffic written into
    the ingress's user_config and gone after an abort."""
    installed.kubectl("create", "configmap", "goldensets", "-n", NS,
                      "--from-literal", f"equipa-v1.yaml={GOLDEN_SET}")  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    steps = [
        {"evaluation": {"goldenSet": {"configMapRef": {"name": "goldensets", "key":
                                                       "equipa-v1.yaml"}},
                        "ingressURL": dead, "inconclusiveLimit": 0}},
        {"shadow": {"percent": 12.5, "maxInFlight": 3}},
        {"pause": {}},
    ]  # fmt: skip
    api.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, rollout("evaluated", "amalia-sft", "amalia-e", steps)
    )
    halted = wait_phase(api, "evaluated", "Paused")
    assert halted.get("stepIndex", 0) == 0 and halted["evaluation"]["halted"] is True
    last = halted["lastEvaluation"]
    assert last["verdict"] == "Inconclusive" and "ingress unreachable" in last["reason"]
    assert last["goldenSet"]["name"] == "equipa-v1" and last["goldenSet"]["items"] == 1
    assert last["goldenSet"]["source"] == "ConfigMap amalia/goldensets key equipa-v1.yaml"
    conditions = {c["type"]: c for c in halted["conditions"]}
    assert conditions["Progressing"]["reason"] == "EvaluationInconclusive"
    events = installed.get("events", "-n", NS, "--field-selector",
                           "involvedObject.name=evaluated")["items"]  # fmt: skip
    assert "EvaluationInconclusive" in [e["reason"] for e in events]
    text = rollout_cli(installed, "status", "evaluated")
    assert "Evaluation: Inconclusive" in text and "golden set equipa-v1 (1 items" in text, text

    rollout_cli(installed, "promote", "evaluated")  # accept the inconclusive step
    paused = wait_until(
        lambda: (s := status_of(api, "evaluated")).get("stepIndex") == 2 and s, "the shadow step"
    )
    assert paused["shadow"] == {"percent": 12.5, "maxInFlight": 3}
    assert live_config(api).shadow == {"variant": "amalia-e", "percent": 12.5, "max_in_flight": 3}
    assert "Shadow:     12.5% of the requests copied to amalia-e" in rollout_cli(
        installed, "status", "evaluated"
    )

    rollout_cli(installed, "abort", "evaluated")
    done = wait_stage(api, "evaluated", "RolledBack")
    assert "shadow" not in done
    assert live_config(api) == serveconfig.AppView(
        ("amalia-sft", "amalia-dpo", "amalia-base"), {**OTHERS, "amalia-sft": 90}
    )
    # Every serveConfigV2 after the abort was free of the shadow: it went with the weight.
    after_shadow = [t for t in kuberay.seen if "amalia-e" in t]
    assert serveconfig.observe(after_shadow[-1], "amalia").shadow is None
    api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "evaluated")
    wait_until(lambda: not rollout_exists(api, "evaluated"), "the rollout to be deleted", 30)


def rollout_exists(api: client.CustomObjectsApi, name: str) -> bool:
    items = api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]
    return any(i["metadata"]["name"] == name for i in items)


def test_abort_restores_split_and_shows_step_stopped_then_retry_starts_over(
    installed: Cluster, api: client.CustomObjectsApi, operator: OperatorProcess
) -> None:
    api.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL,
        rollout("new-to-next", "amalia-sft", "amalia-next", [{"setWeight": 30}, {"pause": {}}]),
    )  # fmt: skip
    assert wait_phase(api, "new-to-next", "Paused")["weights"] == {
        **OTHERS,
        "amalia-sft": 63,
        "amalia-next": 27,
    }
    rollout_cli(installed, "abort", "new-to-next")
    rolled_back = wait_stage(api, "new-to-next", "RolledBack")
    assert rolled_back["weights"] == {**OTHERS, "amalia-sft": 90}
    assert "amalia-next" not in live_config(api).variants
    text = rollout_cli(installed, "status", "new-to-next")
    assert "Step:       stopped at 1/2 (pause until promoted): aborted" in text
    assert "Phase:      RolledBack" in text and "Progressing=False" in text

    rollout_cli(installed, "retry", "new-to-next")
    again = wait_phase(api, "new-to-next", "Paused")
    assert again["stepIndex"] == 1 and "amalia-next" in live_config(api).variants
    rollout_cli(installed, "abort", "new-to-next")
    wait_stage(api, "new-to-next", "RolledBack")
    api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "new-to-next")
    wait_until(lambda: not rollout_exists(api, "new-to-next"), "the rollout to be deleted", 30)


def test_abort_while_renamed_canary_is_removed_leaves_no_application_behind(
    api: client.CustomObjectsApi, operator: OperatorProcess
) -> None:
    api.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL,
        rollout("renamed", "amalia-sft", "amalia-x", [{"setWeight": 50}, {"pause": {}}]),
    )  # fmt: skip
    wait_phase(api, "renamed", "Paused")
    # One write renames the canary and asks for an abort: the next tick starts over (the old
    # canary still to be removed), the one after aborts.
    api.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "renamed",
        {
            "metadata": {"annotations": {f"{GROUP}/action": "abort"}},
            "spec": {"canary": {"name": "amalia-y", "modelPath": "/models/amalia-y"}},
        },
    )  # fmt: skip
    done = wait_stage(api, "renamed", "RolledBack")
    assert done["abortedAt"] and done["canaryName"] == "amalia-y"
    assert live_config(api) == serveconfig.AppView(
        ("amalia-sft", "amalia-dpo", "amalia-base"), {**OTHERS, "amalia-sft": 90}
    )
    api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "renamed")
    wait_until(lambda: not rollout_exists(api, "renamed"), "the rollout to be deleted", 30)


def acted_after(api: client.CustomObjectsApi, name: str, stage: str, since: float) -> float:
    wait_stage(api, name, stage, timeout_s=PEERING_LIFETIME_S + 60)
    return time.monotonic() - since


@pytest.mark.parametrize(
    ("sig", "same_pod", "bound_s"),
    [
        # A container restarted in its pod keeps the pod's name (kopf's identity): no wait.
        (signal.SIGKILL, True, 15.0),
        # A graceful stop removes the replica's peering record: a new pod starts at once.
        (signal.SIGTERM, False, 15.0),
        # A new pod after a hard kill waits for the dead record to expire.
        (signal.SIGKILL, False, 15.0 + PEERING_LIFETIME_S),
    ],
    ids=["sigkill-same-pod", "sigterm-new-pod", "sigkill-new-pod"],
)
def test_operator_resumes_after_restart_within_bound(
    api: client.CustomObjectsApi,
    operator: OperatorProcess,
    operator_kubeconfig: Path,
    sig: signal.Signals,
    same_pod: bool,
    bound_s: float,
    record_property: Any,
) -> None:
    """An abort requested while the operator is down is carried out soon after it restarts."""
    name = f"restart-{sig.name.lower()}-{'same' if same_pod else 'new'}"
    api.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL,
        rollout(name, "amalia-sft", "amalia-r", [{"setWeight": 10}, {"pause": {}}]),
    )  # fmt: skip
    wait_phase(api, name, "Paused")
    assert operator.signal(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    api.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        name,
        {"metadata": {"annotations": {f"{GROUP}/action": "abort"}}},
    )
    restarted = OperatorProcess(
        operator_kubeconfig,
        NS,
        operator.log,
        operator.pod_id if same_pod else f"amalia-operator-{name}",
        TICK_S,
    ).start()
    try:
        took = acted_after(api, name, "RolledBack", restarted.started_at)
        record_property("resume_s", round(took, 1))
        print(f"{name}: abort carried out {took:.1f}s after the restart")
        assert took < bound_s, restarted.output()[-3000:]
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        wait_until(lambda: not rollout_exists(api, name), "the rollout to be deleted", 30)
    finally:
        restarted.signal(signal.SIGTERM)


def test_standby_takes_over_within_peering_lifetime_when_active_replica_is_killed(
    api: client.CustomObjectsApi,
    operator: OperatorProcess,
    operator_kubeconfig: Path,
    logs: Path,
    record_property: Any,
) -> None:
    """Two replicas: one works, the other stands by; SIGKILL the working one mid-rollout."""
    standby = OperatorProcess(operator_kubeconfig, NS, logs / "standby.log", "amalia-operator-1",
                              TICK_S).start()  # fmt: skip
    try:
        peers = wait_until(lambda: peering_records(api, 2), "both replicas in the peering object")
        active_id = max(peers, key=lambda p: peers[p]["priority"])
        active, waiting = (
            (operator, standby) if active_id == operator.pod_id else (standby, operator)
        )
        wait_until(
            lambda: not paused(active) and paused(waiting), "one active, one standing by", 30
        )
        api.create_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL,
            rollout("ha", "amalia-sft", "amalia-h", [{"setWeight": 10}, {"pause": {}}]),
        )  # fmt: skip
        wait_phase(api, "ha", "Paused")
        assert "RayService amalia: patched" not in waiting.output()  # only one replica works
        active.signal(signal.SIGKILL)
        killed = time.monotonic()
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "ha",
            {"metadata": {"annotations": {f"{GROUP}/action": "abort"}}},
        )
        took = acted_after(api, "ha", "RolledBack", killed)
        record_property("takeover_s", round(took, 1))
        print(f"standby carried out the abort {took:.1f}s after the active replica died")
        assert took <= PEERING_LIFETIME_S + 5, waiting.output()[-3000:]
        assert "Resuming operations after the pause" in waiting.output()
    finally:
        for proc in (operator, standby):
            if proc.running():
                proc.signal(signal.SIGTERM)
    survivor = OperatorProcess(operator_kubeconfig, NS, logs / "cleanup.log", "amalia-operator-0",
                               TICK_S).start()  # fmt: skip
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ha")
        wait_until(lambda: not rollout_exists(api, "ha"), "the rollout to be deleted", 60)
    finally:
        survivor.signal(signal.SIGTERM)


def paused(proc: OperatorProcess) -> bool:
    """kopf's own word: a replica with peering starts paused, resumes when no peer outranks it,
    and pauses again "in favour of" a peer with a higher priority."""
    log = proc.output()
    return log.rfind("Pausing operations") >= log.rfind("Resuming operations")


def peering_records(api: client.CustomObjectsApi, count: int) -> dict[str, Any] | None:
    try:
        obj = api.get_namespaced_custom_object(
            "kopf.dev", "v1", NS, "kopfpeerings", "amalia-operator"
        )
    except ApiException as exc:
        if exc.status == 404:  # the first replica has not created it yet
            return None
        raise
    records: dict[str, Any] = obj.get("status") or {}
    return records if len(records) == count else None


def test_operator_used_only_what_chart_rbac_grants(installed: Cluster) -> None:
    """The chart's Role/ClusterRole as the API server evaluates them for the ServiceAccount."""
    account = f"system:serviceaccount:{NS}:amalia-operator"
    allowed = [
        ("patch", "rayservices.ray.io", ""),
        ("patch", "modelrollouts.serving.amalia.pt", "status"),
        ("create", "kopfpeerings.kopf.dev", ""),
        ("create", "events", ""),
        ("watch", "modelrollouts.serving.amalia.pt", ""),
        ("get", "configmaps", ""),  # an evaluation step's golden set
    ]
    denied = [
        ("list", "configmaps", ""),  # read by name only
        ("delete", "rayservices.ray.io", ""),
        ("get", "secrets", ""),
        ("create", "pods", ""),
        ("patch", "rayservices.ray.io", "status"),  # KubeRay's to write, not the operator's
    ]
    for verb, resource, subresource in allowed + denied:
        args = ["auth", "can-i", verb, resource, "-n", NS, "--as", account]
        result = installed.kubectl(*args, f"--subresource={subresource}", check=False)
        expected = "yes" if (verb, resource, subresource) in allowed else "no"
        assert result.stdout.strip() == expected, (verb, resource, subresource, result.stdout)
