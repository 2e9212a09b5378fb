"""The caller's mesh identity from real Istio XFCC and Linkerd l5d-client-id header shapes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers

from amalia_serve.caller_identity import (
    LINKERD_ID_HEADER,
    XFCC_HEADER,
    CallerGate,
    CallerIdentity,
    identity_from_linkerd,
    identity_from_xfcc,
    parse_spiffe_id,
    split_xfcc,
)
from amalia_serve.config import MeshConfig

HASH = "3a4c8b5e2f1d0c9b8a7f6e5d4c3b2a19081726354453627180918a7b6c5d4e3f"
# What an Istio sidecar in namespace `amalia` appends for a caller running as team-a/chat.
SIDECAR = (
    f'By=spiffe://cluster.local/ns/amalia/sa/amalia-ray;Hash={HASH};Subject="";'
    "URI=spiffe://cluster.local/ns/team-a/sa/chat"
)
CHAT = CallerIdentity("cluster.local", "team-a", "chat")


# === split_xfcc ===


def test_split_xfcc_reads_envoy_documented_element_when_subject_is_quoted() -> None:
    value = (
        f"By=http://frontend.lyft.com;Hash={HASH};"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com;'
        "DNS=lyft.com;DNS=www.lyft.com"
    )
    assert split_xfcc(value) == [
        [
            ("by", "http://frontend.lyft.com"),
            ("hash", HASH),
            ("subject", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"),
            ("uri", "http://testclient.lyft.com"),
            ("dns", "lyft.com"),
            ("dns", "www.lyft.com"),
        ]
    ]


def test_split_xfcc_keeps_separators_inside_quotes_when_escaped_quotes_appear() -> None:
    value = r'Subject="CN=\"a,b\";O=x",URI=spiffe://td/ns/n/sa/s'
    assert split_xfcc(value) == [[("subject", 'CN="a,b";O=x')], [("uri", "spiffe://td/ns/n/sa/s")]]


def test_split_xfcc_splits_elements_when_proxies_appended_in_turn() -> None:
    value = "By=spiffe://a;URI=spiffe://b, By=spiffe://c;URI=spiffe://d"
    assert [dict(e)["by"] for e in split_xfcc(value)] == ["spiffe://a", "spiffe://c"]


@pytest.mark.parametrize(
    "bad", ['Subject="unterminated;URI=spiffe://x', "URI=x;garbage", 'URI="x\\']
)
def test_split_xfcc_refuses_value_when_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="XFCC"):
        split_xfcc(bad)


# === identity_from_xfcc ===


def test_xfcc_identity_is_uri_san_when_sidecar_appended_one_element() -> None:
    assert identity_from_xfcc([SIDECAR]) == CHAT
    assert CHAT.label == "team-a/chat"
    assert CHAT.spiffe_id == "spiffe://cluster.local/ns/team-a/sa/chat"


def test_xfcc_identity_is_last_element_when_caller_sent_a_forged_one() -> None:
    forged = f"By=spiffe://cluster.local/ns/amalia/sa/amalia-ray;Hash={HASH};URI=spiffe://cluster.local/ns/admin/sa/root"
    assert identity_from_xfcc([f"{forged},{SIDECAR}"]) == CHAT
    # The same, sent as two header lines.
    assert identity_from_xfcc([forged, SIDECAR]) == CHAT


def test_xfcc_identity_ignores_uri_inside_quotes_when_forger_hides_one_there() -> None:
    forged = 'Subject="x,URI=spiffe://cluster.local/ns/admin/sa/root"'
    assert identity_from_xfcc([f"{forged},{SIDECAR}"]) == CHAT
    assert identity_from_xfcc([f"{SIDECAR};{forged}"]) == CHAT


@pytest.mark.parametrize(
    "value",
    [
        f'{SIDECAR},Subject="open',  # unterminated quote: nothing is trusted
        f"{SIDECAR};URI=spiffe://cluster.local/ns/admin/sa/root",  # two SPIFFE ids: ambiguous
        f"By=spiffe://cluster.local/ns/amalia/sa/amalia-ray;Hash={HASH}",  # no URI SAN
        "URI=spiffe://cluster.local/ns/team-a/sa/chat/extra",  # not the Kubernetes form
        "URI=spiffe://cluster.local/ns/Team_A/sa/chat",  # not a namespace name
        "URI=https://team-a.example",
        "",
    ],
)
def test_xfcc_identity_is_none_when_header_is_malformed_or_ambiguous(value: str) -> None:
    assert identity_from_xfcc([value]) is None


def test_xfcc_identity_is_none_when_no_header_was_sent() -> None:
    assert identity_from_xfcc([]) is None


def test_spiffe_id_keeps_dotted_service_account_when_parsed() -> None:
    assert parse_spiffe_id("spiffe://prod.example.org/ns/ml/sa/batch.runner") == CallerIdentity(
        "prod.example.org", "ml", "batch.runner"
    )


# === identity_from_linkerd ===


@pytest.mark.parametrize(
    ("value", "identity"),
    [
        ("chat.team-a.serviceaccount.identity.linkerd.cluster.local", CHAT),
        # A ServiceAccount name may hold dots; a namespace may not.
        ("batch.runner.ml.serviceaccount.identity.linkerd.cluster.local",
         CallerIdentity("cluster.local", "ml", "batch.runner")),
        ("web.shop.serviceaccount.identity.linkerd-cp.prod.example.org",
         CallerIdentity("prod.example.org", "shop", "web")),
    ],
)  # fmt: skip
def test_linkerd_identity_is_parsed_when_proxy_set_client_id(
    value: str, identity: CallerIdentity
) -> None:
    assert identity_from_linkerd([value]) == identity


@pytest.mark.parametrize(
    "values",
    [
        ["team-a.serviceaccount.identity.linkerd.cluster.local"],  # no ServiceAccount
        ["chat.team-a.identity.linkerd.cluster.local"],
        ["chat.team-a.serviceaccount.identity.linkerd"],  # no trust domain
        ["spiffe://cluster.local/ns/team-a/sa/chat"],
        ["chat.team-a.serviceaccount.identity.linkerd.cluster.local"]
        * 2,  # set twice: not the proxy
        [],
    ],
)
def test_linkerd_identity_is_none_when_value_is_not_one_linkerd_identity(values: list[str]) -> None:
    assert identity_from_linkerd(values) is None


# === CallerGate ===


def gate(**mesh: object) -> CallerGate:
    return CallerGate(MeshConfig.model_validate(mesh))


def test_gate_ignores_identity_headers_when_no_mesh() -> None:
    off = gate()
    headers = Headers(
        {
            XFCC_HEADER: SIDECAR,
            LINKERD_ID_HEADER: "chat.team-a.serviceaccount.identity.linkerd.cluster.local",
        }
    )
    assert not off.enabled
    assert off.identify(headers) is None
    assert off.sticky_key(off.identify(headers)) is None
    assert off.allows(None)


def test_gate_reads_only_its_providers_header_when_mesh_is_on() -> None:
    istio, linkerd = gate(provider="istio"), gate(provider="linkerd")
    xfcc_only = Headers({XFCC_HEADER: SIDECAR})
    assert istio.identify(xfcc_only) == CHAT
    assert linkerd.identify(xfcc_only) is None
    l5d = Headers({LINKERD_ID_HEADER: "chat.team-a.serviceaccount.identity.linkerd.cluster.local"})
    assert linkerd.identify(l5d) == CHAT
    assert istio.identify(l5d) is None


def test_gate_ignores_header_when_it_is_not_trusted() -> None:
    ambient_without_waypoint = gate(provider="istio-ambient", trust_identity_header=False)
    assert not ambient_without_waypoint.enabled
    assert ambient_without_waypoint.identify(Headers({XFCC_HEADER: SIDECAR})) is None


def test_gate_drops_identity_when_trust_domain_is_foreign() -> None:
    assert (
        gate(provider="istio", trust_domain="prod.example.org").identify(
            Headers({XFCC_HEADER: SIDECAR})
        )
        is None
    )


def test_gate_allows_listed_workloads_and_namespaces_only_when_allowlist_is_set() -> None:
    allowlist = gate(
        provider="istio",
        allowed_callers=[
            {"namespace": "team-a", "service_account": "chat"},
            {"namespace": "team-b"},
        ],
    )
    assert allowlist.allows(CHAT)
    assert allowlist.allows(CallerIdentity("cluster.local", "team-b", "anything"))
    assert not allowlist.allows(CallerIdentity("cluster.local", "team-a", "batch"))
    assert not allowlist.allows(None)
    assert gate(provider="istio").allows(None)


def test_gate_sticky_key_is_spiffe_id_when_sticky_by_caller() -> None:
    assert gate(provider="istio").sticky_key(CHAT) == CHAT.spiffe_id
    assert gate(provider="istio", sticky_by_caller=False).sticky_key(CHAT) is None
    assert gate(provider="istio").sticky_key(None) is None


# === MeshConfig ===


@pytest.mark.parametrize(
    "mesh",
    [
        {"allowed_callers": [{"namespace": "team-a"}]},
        {
            "provider": "istio-ambient",
            "trust_identity_header": False,
            "allowed_callers": [{"namespace": "team-a"}],
        },
    ],
)
def test_mesh_config_refuses_allowlist_when_identity_is_unknown(mesh: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="allowed_callers needs provider"):
        MeshConfig.model_validate(mesh)


@pytest.mark.parametrize(
    "mesh",
    [
        {"provider": "consul"},
        {"provider": "istio", "allowed_callers": [{"namespace": "Team_A"}]},
        {"provider": "istio", "allowed_callers": [{"namespace": "a", "serviceAccount": "b"}]},
    ],
)
def test_mesh_config_refuses_unknown_provider_or_keys_when_parsed(mesh: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MeshConfig.model_validate(mesh)
