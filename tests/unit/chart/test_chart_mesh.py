"""mesh.provider: what each service mesh gets from the chart, rendered with helm 3 and helm 4.

The objects themselves are checked against the meshes' real CRDs on a real API server in
tests/integration/test_chart_mesh_apiserver.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from chart_helpers import CHART, CI_VALUES, by_kind, one, render, run_helm

from amalia_serve.config import AmaliaServingArgs

MESH_VALUES = {
    "istio": CI_VALUES / "mesh-istio-values.yaml",
    "istio-ambient": CI_VALUES / "mesh-istio-ambient-values.yaml",
    "linkerd": CI_VALUES / "mesh-linkerd-values.yaml",
}
MESH_KINDS = {
    "none": set(),
    "istio": {"PeerAuthentication", "AuthorizationPolicy", "DestinationRule", "VirtualService"},
    "istio-ambient": {
        "PeerAuthentication", "AuthorizationPolicy", "DestinationRule", "VirtualService", "Gateway",
    },
    "linkerd": {"Server", "MeshTLSAuthentication", "AuthorizationPolicy"},
}  # fmt: skip
ALL_PORTS = set(range(1, 65536))


def mesh_render(helm: str, provider: str, *sets: str) -> list[dict[str, Any]]:
    """The provider's CI values file with `sets` on top; `none` is the chart's defaults."""
    return render(helm, MESH_VALUES.get(provider), sets=sets)


def bare_render(provider: str, *sets: str) -> list[dict[str, Any]]:
    """The chart's defaults with only the provider (and `sets`) changed."""
    return render("helm3", sets=(f"mesh.provider={provider}", *sets))


def pod_metas(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod template metadata by workload: head, each worker group, operator, test pod."""
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    metas = {"head": cluster["headGroupSpec"]["template"]["metadata"]}
    for group in cluster["workerGroupSpecs"]:
        metas[group["groupName"]] = group["template"]["metadata"]
    metas["operator"] = one(objects, "Deployment")["spec"]["template"]["metadata"]
    metas["test"] = one(objects, "Pod")["metadata"]
    return metas


def ray_metas(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [meta for name, meta in pod_metas(objects).items() if name not in ("operator", "test")]


def front_mesh(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`args.ingress.mesh` of the front Serve application, after amalia_serve validated the args."""
    config = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
    args = AmaliaServingArgs.model_validate(config["applications"][0]["args"])
    raw: dict[str, Any] | None = config["applications"][0]["args"]["ingress"].get("mesh")
    assert raw is None or args.ingress.mesh.provider == raw["provider"]
    return raw


def ports_of(ranges: str) -> set[int]:
    """'1-7999,8001-65535' -> the set of ports it names."""
    ports: set[int] = set()
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        ports |= set(range(int(low), int(high or low) + 1))
    return ports


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


# === every provider ===


@pytest.mark.parametrize("provider", sorted(MESH_KINDS))
def test_chart_renders_mesh_objects_of_its_provider_only_when_provider_is_set(
    helm: str, provider: str
) -> None:
    objects = mesh_render(helm, provider)
    mesh_kinds = set().union(*MESH_KINDS.values())
    assert {o["kind"] for o in objects} & mesh_kinds == MESH_KINDS[provider]
    mesh = front_mesh(objects)
    assert (mesh is None) == (provider == "none")


@pytest.mark.parametrize("provider", sorted(MESH_KINDS))
def test_head_pod_leaves_serve_services_when_meshed(provider: str) -> None:
    # KubeRay's plaintext probe of the head's Serve port cannot pass the mesh's mTLS and allowlist.
    spec = one(mesh_render("helm3", provider), "RayService")["spec"]
    assert spec.get("excludeHeadPodFromServeSvc", False) is (provider != "none")


@pytest.mark.parametrize("provider", sorted(MESH_VALUES))
def test_chart_lints_cleanly_when_mesh_values_are_valid(helm: str, provider: str) -> None:
    result = run_helm(helm, "lint", str(CHART), "--strict", "--values", str(MESH_VALUES[provider]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("provider", sorted(MESH_VALUES))
def test_chart_renders_same_mesh_objects_when_helm3_or_helm4(provider: str) -> None:
    assert mesh_render("helm3", provider) == mesh_render("helm4", provider)


def test_pods_carry_no_mesh_metadata_when_provider_is_none(helm: str) -> None:
    for meta in pod_metas(render(helm)).values():
        keys = set(meta.get("labels", {})) | set(meta.get("annotations", {}))
        assert not {k for k in keys if "istio" in k or "linkerd" in k}, meta


@pytest.mark.parametrize(
    ("provider", "label"),
    [("istio", ("sidecar.istio.io/inject", "true")),
     ("istio-ambient", ("istio.io/dataplane-mode", "ambient"))],
)  # fmt: skip
def test_every_pod_joins_istio_when_provider_is_istio(
    helm: str, provider: str, label: tuple[str, str]
) -> None:
    for workload, meta in pod_metas(mesh_render(helm, provider)).items():
        assert meta["labels"][label[0]] == label[1], workload


def test_every_pod_joins_linkerd_when_provider_is_linkerd(helm: str) -> None:
    for workload, meta in pod_metas(mesh_render(helm, "linkerd")).items():
        assert meta["annotations"]["linkerd.io/inject"] == "enabled", workload


# === Ray's own traffic stays out of the proxies ===


def test_istio_sidecars_carry_only_api_and_metrics_ports_when_ray_pods_are_injected() -> None:
    objects = mesh_render("helm3", "istio")
    for meta in ray_metas(objects):
        notes = meta["annotations"]
        assert notes["traffic.sidecar.istio.io/includeInboundPorts"] == "8000,8080"
        # No outbound redirection by address: only the OTLP collector (tracing on) goes through.
        assert notes["traffic.sidecar.istio.io/includeOutboundIPRanges"] == ""
        assert notes["traffic.sidecar.istio.io/includeOutboundPorts"] == "4317"
    for workload in ("operator", "test"):
        assert not any(
            "traffic.sidecar" in k for k in pod_metas(objects)[workload].get("annotations", {})
        )


def test_istio_sidecars_leave_metrics_out_when_metrics_are_plaintext() -> None:
    objects = bare_render("istio", "mesh.metrics.plaintext=true")
    for meta in ray_metas(objects):
        assert meta["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] == "8000"
        assert "traffic.sidecar.istio.io/includeOutboundPorts" not in meta["annotations"]
    assert one(objects, "PeerAuthentication")["spec"]["portLevelMtls"] == {
        "8000": {"mode": "STRICT"}
    }


def test_linkerd_skips_every_port_but_api_and_metrics_when_ray_pods_are_injected() -> None:
    for meta in ray_metas(mesh_render("helm3", "linkerd")):
        notes = meta["annotations"]
        assert ALL_PORTS - ports_of(notes["config.linkerd.io/skip-inbound-ports"]) == {8000, 8080}
        # mesh.outboundPorts [9000] is all that leaves through the proxy.
        assert ALL_PORTS - ports_of(notes["config.linkerd.io/skip-outbound-ports"]) == {9000}


@pytest.mark.parametrize(
    ("sets", "kept"),
    [
        ((), set()),
        (("mesh.outboundPorts={1,65535,9000,9000}",), {1, 9000, 65535}),
        (("tracing.enabled=true", "tracing.endpoint=https://otel.example"), {443}),
        (("tracing.enabled=true", "tracing.endpoint=http://otel.obs:4318/v1/traces"), {4318}),
    ],
)
def test_linkerd_outbound_ranges_spare_exactly_the_mesh_ports_when_rendered(
    sets: tuple[str, ...], kept: set[int]
) -> None:
    objects = bare_render("linkerd", *sets)
    for meta in ray_metas(objects):
        skipped = ports_of(meta["annotations"]["config.linkerd.io/skip-outbound-ports"])
        assert ALL_PORTS - skipped == kept


def test_helm_test_pod_uses_native_sidecar_and_own_identity_when_meshed() -> None:
    for provider, note in (
        ("istio", "sidecar.istio.io/nativeSidecar"),
        ("linkerd", "config.alpha.linkerd.io/proxy-enable-native-sidecar"),
    ):
        objects = mesh_render("helm3", provider)
        pod = one(objects, "Pod")
        assert pod["metadata"]["annotations"][note] == "true"
        account = pod["spec"]["serviceAccountName"]
        assert named(objects, "ServiceAccount", account)["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in one(render("helm3"), "Pod")["spec"]


# === authorization by mesh identity ===


def test_istio_policy_admits_listed_callers_and_scrapers_when_sidecars() -> None:
    policy = named(mesh_render("helm3", "istio"), "AuthorizationPolicy", "amalia-ray")["spec"]
    api, metrics, ray_own = policy["rules"]
    assert api["to"] == [{"operation": {"ports": ["8000"]}}]
    assert api["from"] == [
        {"source": {"principals": [
            "cluster.local/ns/team-chat/sa/chat-backend",
            "cluster.local/ns/gateway-system/sa/internal-istio",
            "cluster.local/ns/amalia/sa/amalia-api-test",
            "cluster.local/ns/amalia/sa/amalia-operator",  # its evaluation steps call the API
        ]}},
        {"source": {"namespaces": ["team-search"]}},
    ]  # fmt: skip
    assert metrics == {
        "from": [{"source": {"principals": ["cluster.local/ns/monitoring/sa/prometheus-k8s"]}}],
        "to": [{"operation": {"ports": ["8080"]}}],
    }
    assert ray_own == {"to": [{"operation": {"notPorts": ["8000", "8080"]}}]}
    modes = one(mesh_render("helm3", "istio"), "PeerAuthentication")["spec"]
    assert modes["portLevelMtls"] == {"8000": {"mode": "STRICT"}, "8080": {"mode": "STRICT"}}


def test_istio_policy_admits_any_mesh_identity_when_no_callers_are_listed() -> None:
    policy = one(bare_render("istio"), "AuthorizationPolicy")
    assert policy["spec"]["rules"][0]["from"] == [{"source": {"principals": ["*"]}}]


def test_ambient_api_port_takes_only_the_waypoint_when_waypoint_is_enabled() -> None:
    objects = mesh_render("helm3", "istio-ambient")
    ztunnel = named(objects, "AuthorizationPolicy", "amalia-ray")["spec"]
    assert ztunnel["rules"][0]["from"] == [
        {"source": {"principals": ["cluster.local/ns/amalia/sa/amalia-waypoint"]}}
    ]
    waypoint = named(objects, "AuthorizationPolicy", "amalia-api")["spec"]
    assert waypoint["targetRefs"] == [{"kind": "Service", "group": "", "name": "amalia"}]
    assert waypoint["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/team-chat/sa/chat-backend",
        "cluster.local/ns/amalia/sa/amalia-api-test",
        "cluster.local/ns/amalia/sa/amalia-operator",
    ]
    gateway = one(objects, "Gateway")
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"
    assert (
        gateway["metadata"]["annotations"]["ambient.istio.io/xfcc-include-client-identity"]
        == "true"
    )
    assert (
        named(objects, "Service", "amalia")["metadata"]["labels"]["istio.io/use-waypoint"]
        == (gateway["metadata"]["name"])
    )


def test_linkerd_servers_admit_listed_callers_and_scrapers_when_rendered() -> None:
    objects = mesh_render("helm3", "linkerd")
    servers = {s["metadata"]["name"]: s["spec"]["port"] for s in by_kind(objects, "Server")}
    assert servers == {"amalia-api": "serve", "amalia-metrics": "metrics"}
    api = named(objects, "MeshTLSAuthentication", "amalia-api-callers")["spec"]
    assert api == {"identityRefs": [
        {"kind": "ServiceAccount", "namespace": "team-chat", "name": "chat-backend"},
        {"kind": "ServiceAccount", "namespace": "team-search"},
        {"kind": "ServiceAccount", "namespace": "amalia", "name": "amalia-api-test"},
        {"kind": "ServiceAccount", "namespace": "amalia", "name": "amalia-operator"},
    ]}  # fmt: skip
    for policy in by_kind(objects, "AuthorizationPolicy"):
        name = policy["metadata"]["name"]
        assert policy["spec"]["targetRef"] == {
            "group": "policy.linkerd.io",
            "kind": "Server",
            "name": name,
        }
        (auth,) = policy["spec"]["requiredAuthenticationRefs"]
        assert auth["name"] == f"{name}-callers"
    bare = bare_render("linkerd", "mesh.metrics.scrapers=null")
    assert named(bare, "MeshTLSAuthentication", "amalia-api-callers")["spec"] == {
        "identities": ["*"]
    }


# === the ingress reads the identity the mesh vouches for ===


@pytest.mark.parametrize(
    ("provider", "sets", "trusted"),
    [
        ("istio", (), True),
        ("linkerd", (), True),
        ("istio-ambient", (), True),  # with the waypoint of mesh-istio-ambient-values.yaml
        ("istio-ambient", ("mesh.waypoint.enabled=false",), False),
    ],
)
def test_ingress_trusts_identity_header_only_when_a_proxy_writes_it(
    provider: str, sets: tuple[str, ...], trusted: bool
) -> None:
    mesh = front_mesh(mesh_render("helm3", provider, *sets))
    assert mesh is not None
    assert mesh["trust_identity_header"] is trusted
    allowed = {(r["namespace"], r.get("service_account")) for r in mesh["allowed_callers"]}
    # Without a trusted header the allowlist is the mesh's alone (ztunnel, at L4).
    assert (("team-chat", "chat-backend") in allowed) is trusted


def test_ingress_allowlist_matches_mesh_policy_when_callers_are_listed() -> None:
    mesh = front_mesh(mesh_render("helm3", "istio"))
    assert mesh is not None
    assert mesh["allowed_callers"] == [
        {"namespace": "team-chat", "service_account": "chat-backend"},
        {"namespace": "team-search"},
        {"namespace": "gateway-system", "service_account": "internal-istio"},
        {"namespace": "amalia", "service_account": "amalia-api-test"},
        {"namespace": "amalia", "service_account": "amalia-operator"},
    ]


# === the mesh does not fight the app ===


def test_istio_never_retries_and_outlasts_generations_when_routing_the_api() -> None:
    objects = mesh_render("helm3", "istio")
    (route,) = one(objects, "VirtualService")["spec"]["http"]
    assert route["retries"] == {"attempts": 0}
    assert route["timeout"] == "3600s"
    assert route["route"][0]["destination"] == {"host": "amalia", "port": {"number": 8000}}
    outlier = one(objects, "DestinationRule")["spec"]["trafficPolicy"]["outlierDetection"]
    # No HTTP status (429 from a full variant, 503 from a missing one) ever ejects a pod.
    assert outlier["consecutive5xxErrors"] == 0 and outlier["consecutiveGatewayErrors"] == 0
    assert outlier["splitExternalLocalOriginErrors"] is True
    assert outlier["consecutiveLocalOriginFailures"] == 5


def test_istio_routes_target_kuberay_service_when_chart_service_is_disabled() -> None:
    objects = bare_render("istio", "service.enabled=false")
    assert one(objects, "DestinationRule")["spec"]["host"] == "amalia-serve-svc"
    assert one(objects, "VirtualService")["spec"]["hosts"] == ["amalia-serve-svc"]


def test_linkerd_service_declares_generation_timeout_when_rendered() -> None:
    service = named(mesh_render("helm3", "linkerd"), "Service", "amalia")
    assert service["metadata"]["annotations"] == {"timeout.linkerd.io/request": "3600s"}


def test_http_route_outlasts_generations_when_enabled(helm: str) -> None:
    (rule,) = one(mesh_render(helm, "istio"), "HTTPRoute")["spec"]["rules"]
    assert rule["timeouts"] == {"request": "3600s"}


def test_network_policy_admits_hbone_next_to_each_port_when_ambient() -> None:
    policy = one(mesh_render("helm3", "istio-ambient"), "NetworkPolicy")
    port_rules = [rule for rule in policy["spec"]["ingress"] if "ports" in rule]
    assert port_rules
    for rule in port_rules:
        assert {"port": 15008, "protocol": "TCP"} in rule["ports"]
    sidecars = one(mesh_render("helm3", "istio"), "NetworkPolicy")
    assert all(
        {"port": 15008, "protocol": "TCP"} not in rule.get("ports", [])
        for rule in sidecars["spec"]["ingress"]
    )


# === refusals ===


def test_chart_refuses_waypoint_when_service_is_disabled(helm: str) -> None:
    sets = ("mesh.provider=istio-ambient", "mesh.waypoint.enabled=true", "service.enabled=false")
    result = run_helm(
        helm, "template", "amalia", str(CHART), *[a for s in sets for a in ("--set", s)]
    )
    assert result.returncode != 0
    assert "mesh.waypoint.enabled needs service.enabled" in result.stderr
