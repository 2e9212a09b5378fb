"""What each template promises: GPU limits, security, env on every Ray container, weights volume."""

from __future__ import annotations

import json
from typing import Any

import yaml
from chart_helpers import (
    ROOT,
    VALUES_FILES,
    by_kind,
    one,
    ray_pod_specs,
    render,
    run_helm,
    template_args,
)

PRODUCTION = VALUES_FILES["production-gpu"]
DOWNWARD_ENV = {"POD_NAME", "POD_NAMESPACE", "NODE_NAME"}
OTEL_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
}


def yaml_to_json(text: str) -> str:
    return json.dumps(yaml.safe_load(text))


def env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def all_pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = ray_pod_specs(one(objects, "RayService"))
    specs += [d["spec"]["template"]["spec"] for d in by_kind(objects, "Deployment")]
    return specs + [p["spec"] for p in by_kind(objects, "Pod")]


def test_worker_groups_request_gpus_when_resource_is_mig() -> None:
    cluster = one(render("helm3", PRODUCTION), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    h100, mig = cluster["workerGroupSpecs"]
    assert h100["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        mig["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.40gb"]
        == "1"
    )
    # KubeRay cannot infer GPUs from a MIG resource name, so the chart states them.
    assert mig["rayStartParams"]["num-gpus"] == "1"
    assert (mig["minReplicas"], mig["maxReplicas"]) == (0, 4)
    assert h100["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in h100["template"]["spec"]["affinity"]


def test_ray_containers_carry_offline_and_tracing_env_when_tracing_enabled() -> None:
    for spec in ray_pod_specs(one(render("helm3", PRODUCTION), "RayService")):
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert DOWNWARD_ENV | OTEL_ENV <= set(env)
        assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
        assert env["HF_HOME"].startswith("/models/")
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]
        # KubeRay owns RAY_AUTH_MODE (authOptions); a second source would fight it.
        assert "RAY_AUTH_MODE" not in env
        assert {"metrics", "serve"} <= {p["name"] for p in container["ports"]}


def test_ray_containers_turn_off_usage_statistics_and_address_probes_when_rendered() -> None:
    for values in (None, PRODUCTION):
        for spec in ray_pod_specs(one(render("helm3", values), "RayService")):
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
            assert env["RAY_USAGE_STATS_REPORT_URL"]["value"].startswith("http://127.0.0.1:")
            assert env["VLLM_NO_USAGE_STATS"]["value"] == env["DO_NOT_TRACK"]["value"] == "1"
            assert env["VLLM_HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_ray_containers_omit_tracing_env_when_tracing_disabled() -> None:
    for spec in ray_pod_specs(one(render("helm3"), "RayService")):
        names = env_names(spec["containers"][0])
        assert DOWNWARD_ENV <= names and not OTEL_ENV & names


def test_every_pod_is_locked_down_when_rendered() -> None:
    objects = render("helm3", PRODUCTION)
    specs = all_pod_specs(objects)
    assert len(specs) == 5  # head, two worker groups, operator, helm test
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert ctx["readOnlyRootFilesystem"] is True


def test_ray_pods_get_writable_tmp_when_root_filesystem_is_read_only() -> None:
    for spec in ray_pod_specs(one(render("helm3"), "RayService")):
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounts


def test_workers_mount_weights_read_only_when_source_is_pvc() -> None:
    rayservice = one(render("helm3", PRODUCTION), "RayService")
    for spec in ray_pod_specs(rayservice)[1:]:
        (volume,) = [v for v in spec["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"] == {"claimName": "amalia-weights", "readOnly": True}


def test_workers_fill_weights_first_when_source_is_empty_dir() -> None:
    sets = (
        "models.source=emptyDir",
        "models.fill.image=registry.local/s5cmd:2.2",
        "models.fill.command={sh,-c,s5cmd sync s3://models/* /models/}",
    )
    rayservice = one(render("helm3", sets=sets), "RayService")
    worker = ray_pod_specs(rayservice)[1]
    (init,) = worker["initContainers"]
    assert init["command"][-1] == "s5cmd sync s3://models/* /models/"
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert "emptyDir" in next(v for v in worker["volumes"] if v["name"] == "models")


def test_service_targets_serve_port_named_http_when_enabled() -> None:
    service = one(render("helm3"), "Service")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 8000, "serve")
    assert service["spec"]["selector"]["ray.io/serve"] == "true"


def test_network_policy_is_on_and_limits_each_port_to_its_peers_by_default() -> None:
    policy = one(render("helm3"), "NetworkPolicy")
    ray_pods = {
        "app.kubernetes.io/name": "amalia",
        "app.kubernetes.io/instance": "amalia",
        "app.kubernetes.io/component": "ray",
    }
    assert policy["metadata"]["namespace"] == "amalia"
    assert policy["spec"]["podSelector"] == {"matchLabels": ray_pods}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ray_internal, api, metrics, kuberay = policy["spec"]["ingress"]
    # Ray's own ports: every port, but only from the release's Ray pods.
    assert ray_internal == {"from": [{"podSelector": {"matchLabels": ray_pods}}]}
    assert api["ports"] == [{"port": "serve", "protocol": "TCP"}]
    assert api["from"][2:] == [
        {"namespaceSelector": {"matchLabels": {"amalia.pt/api-access": "true"}}}
    ]
    components = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for f in api["from"][:2]]  # fmt: skip
    # The helm test pod, and the operator (its evaluation steps ask through the ingress).
    assert components == ["api-test", "operator"]
    operator_pod = one(render("helm3"), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert api["from"][1]["podSelector"]["matchLabels"].items() <= operator_pod.items()
    assert metrics == {
        "ports": [{"port": "metrics", "protocol": "TCP"}],
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }
    assert kuberay["ports"] == [{"port": "dashboard", "protocol": "TCP"}]
    # The named ports exist on the pods the policy selects.
    for spec in ray_pod_specs(one(render("helm3"), "RayService")):
        names = {p["name"] for p in spec["containers"][0]["ports"]}
        assert {"serve", "metrics"} <= names


def test_network_policy_takes_peer_lists_and_extra_rules_from_values() -> None:
    mesh = "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: istio-system}}}"
    objects = render(
        "helm3",
        sets=(
            "networkPolicy.apiCallers[0].podSelector.matchLabels.app=gateway",
            "networkPolicy.metricsScrapers=null",
            "networkPolicy.extraIngress[0].ports[0].port=15008",
        ),
        extra=("--set-json", f"networkPolicy.extraIngress[0].from=[{yaml_to_json(mesh)}]"),
    )
    rules = one(objects, "NetworkPolicy")["spec"]["ingress"]
    assert [r.get("ports", [{}])[0].get("port") for r in rules] == [
        None,
        "serve",
        "dashboard",
        15008,
    ]
    assert rules[1]["from"][2] == {"podSelector": {"matchLabels": {"app": "gateway"}}}
    assert rules[3]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}}
    ]
    assert not by_kind(render("helm3", sets=("networkPolicy.enabled=false",)), "NetworkPolicy")


def test_network_policy_refuses_renamed_value_naming_its_replacement(helm: str) -> None:
    result = run_helm(helm, *template_args(None, ("networkPolicy.monitoringNamespace=mon",)))
    assert result.returncode != 0
    assert "networkPolicy.monitoringNamespace was replaced by networkPolicy.metricsScrapers" in (
        result.stderr
    )


NAMESPACED_KINDS = {
    "ConfigMap",
    "Deployment",
    "HTTPRoute",
    "ModelRollout",
    "NetworkPolicy",
    "Pod",
    "PodDisruptionBudget",
    "PodMonitor",
    "RayService",
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
}


def test_every_namespaced_object_names_release_namespace_when_rendered() -> None:
    """`helm template | kubectl apply -f -` (and manifests/) must not land in `default`."""
    objects = render(
        "helm3",
        VALUES_FILES["manifests"],
        sets=("monitoring.podMonitor.enabled=true", "httpRoute.enabled=true"),
        extra=("--set", "httpRoute.parentRefs[0].name=gw"),
    )
    kinds = {o["kind"] for o in objects}
    assert NAMESPACED_KINDS - {"Pod"} <= kinds
    for obj in objects:
        if obj["kind"] in NAMESPACED_KINDS:
            assert obj["metadata"].get("namespace") == "amalia", obj["kind"]
        else:
            assert obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}, obj["kind"]
            assert "namespace" not in obj["metadata"]


def test_pod_monitor_follows_cluster_when_enabled_is_auto() -> None:
    assert not by_kind(render("helm3"), "PodMonitor")
    with_operator = render("helm3", extra=("--api-versions", "monitoring.coreos.com/v1"))
    assert one(with_operator, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_operator_is_absent_when_disabled() -> None:
    objects = render("helm3", VALUES_FILES["minimal"])
    assert not by_kind(objects, "Deployment") and not by_kind(objects, "ClusterRole")


def test_operator_runs_package_module_when_enabled() -> None:
    from amalia_operator.__main__ import build_parser

    deployment = one(render("helm3"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "amalia_operator"]
    args = build_parser().parse_args(container["args"])  # the operator's own parser accepts them
    assert args.command == "run" and args.liveness == "http://0.0.0.0:8080/healthz"


def test_operator_mounts_golden_set_config_maps_where_it_looks_when_listed() -> None:
    sets = ("operator.goldenSetConfigMaps={team-sets,finance}",)
    pod = one(render("helm3", sets=sets), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    dirs = env["AMALIA_GOLDEN_SET_DIRS"].split(":")
    assert dirs == ["/etc/amalia/goldensets/team-sets", "/etc/amalia/goldensets/finance"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for directory, config_map in zip(dirs, ("team-sets", "finance"), strict=True):
        mount = mounts[directory]
        # A whole volume, not a subPath: the kubelet refreshes it when the ConfigMap changes.
        assert mount["readOnly"] is True and "subPath" not in mount
        assert volumes[mount["name"]]["configMap"] == {"name": config_map}
    default = one(render("helm3"), "Deployment")["spec"]["template"]["spec"]
    assert "AMALIA_GOLDEN_SET_DIRS" not in {e["name"] for e in default["containers"][0]["env"]}
    assert [v["name"] for v in default["volumes"]] == ["tmp"]


def test_network_policy_leaves_operator_out_when_operator_disabled() -> None:
    objects = render("helm3", sets=("operator.enabled=false",))
    api = one(objects, "NetworkPolicy")["spec"]["ingress"][1]
    components = [f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                  for f in api["from"]]  # fmt: skip
    assert "operator" not in components and "api-test" in components


def test_dashboard_config_map_holds_each_dashboard_when_enabled() -> None:
    boards = sorted((ROOT / "serve" / "dashboards").glob("*.json"))
    maps = by_kind(render("helm3"), "ConfigMap")
    if not boards:
        assert not maps
        return
    (config_map,) = maps
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(config_map["data"]) == [b.name for b in boards]
    for board in boards:
        assert json.loads(config_map["data"][board.name]) == json.loads(
            board.read_text(encoding="utf-8")
        )
    assert not by_kind(
        render("helm3", sets=("monitoring.grafanaDashboard.enabled=false",)), "ConfigMap"
    )
