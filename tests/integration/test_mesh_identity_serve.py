"""A forged caller-identity header: ignored without a mesh, honoured with one, on real Ray Serve.

One local Ray Serve runs two front applications over the same two demo variants (weights 50/50):
`amalia` on `/` with no mesh, and `amalia-mesh` on `/mesh` configured as behind Istio sidecars with
an allowlist. Requests carry `x-forwarded-client-cert` the way an Istio sidecar delivers it:
whatever the caller sent first, the element the sidecar appended last. No proxy runs here, so the
test writes the header in both cases: exactly the forgery the mesh-off ingress must ignore.
"""

from __future__ import annotations

import copy
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

from amalia_serve.caller_identity import XFCC_HEADER
from amalia_serve.metrics import CALLER_REQUESTS, EXPORT_PREFIX
from amalia_serve.routing import TrafficSplit

pytestmark = [pytest.mark.integration, pytest.mark.demo_variants, pytest.mark.timeout(900)]

WEIGHTS = {"amalia-sft": 50, "amalia-dpo": 50}
BODY = {"model": "amalia", "prompt": "Olá", "max_tokens": 1}
MESH_APP, MESH_PREFIX = "amalia-mesh", "/mesh"
ALLOWED = [{"namespace": "team-a", "service_account": "chat"}, {"namespace": "team-b"}]
CALLER_SERIES = EXPORT_PREFIX + CALLER_REQUESTS + "_total"


def spiffe(caller: str) -> str:
    namespace, account = caller.split("/")
    return f"spiffe://cluster.local/ns/{namespace}/sa/{account}"


def xfcc(caller: str, forged: str | None = None) -> dict[str, str]:
    """The header as a sidecar in `amalia` hands it on: the forged element first, its own last."""
    own = (
        f'By=spiffe://cluster.local/ns/amalia/sa/default;Hash=1f2e;Subject="";URI={spiffe(caller)}'
    )
    return {XFCC_HEADER: f"URI={spiffe(forged)},{own}" if forged else own}


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    config = demo_app_config(sft, dpo, free_port(), weights=WEIGHTS)
    meshed = copy.deepcopy(config["applications"][0])
    meshed.update(name=MESH_APP, route_prefix=MESH_PREFIX)
    meshed["args"]["ingress"] = {"mesh": {"provider": "istio", "allowed_callers": ALLOWED}}
    config["applications"].insert(1, meshed)
    with running_serve(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(served: RunningServe) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        yield client


def variants_of(http: httpx.Client, path: str, n: int, headers: dict[str, str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        response = http.post(path, json=BODY, headers=headers)
        assert response.status_code == 200, response.text
        counts[response.headers["x-amalia-variant"]] += 1
    return counts


def caller_counts(served: RunningServe) -> dict[tuple[str, str, str, str], float]:
    """ray_amalia_caller_requests_total by (application, caller, variant, status class)."""
    text = httpx.get(served.metrics_url, timeout=10).text
    counts: dict[tuple[str, str, str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == CALLER_SERIES:
                labels = sample.labels
                key = (labels["application"], labels["caller"], labels.get("variant", ""),
                       labels["status_class"])  # fmt: skip
                counts[key] += sample.value
    return counts


def test_forged_identity_is_ignored_when_mesh_is_off(
    http: httpx.Client, served: RunningServe
) -> None:
    # Sticky by caller would send all of these to one variant; 50/50 random sends both (all
    # 30 on one variant by chance: 2 in a billion).
    counts = variants_of(http, "/v1/completions", 30, xfcc("team-a/chat"))
    assert set(counts) == set(WEIGHTS), counts
    # No mesh, no allowlist: a caller the mesh app would refuse is served.
    refused_on_mesh = xfcc("team-x/evil")
    assert http.post("/v1/completions", json=BODY, headers=refused_on_mesh).status_code == 200
    assert http.get("/v1/models", headers=refused_on_mesh).status_code == 200


def test_identity_routes_sticky_when_mesh_is_on(http: httpx.Client) -> None:
    split = TrafficSplit(list(WEIGHTS), WEIGHTS)
    callers = ["team-a/chat", *(f"team-b/worker-{i}" for i in range(8))]
    by_variant = {split.sticky_variant(spiffe(c)): c for c in callers}
    assert set(by_variant) == set(WEIGHTS), "pick callers that land on both variants"
    for variant, caller in by_variant.items():
        # The forged first element names another workload; the sidecar's last element wins.
        counts = variants_of(
            http, f"{MESH_PREFIX}/v1/completions", 6, xfcc(caller, forged="team-x/evil")
        )
        assert counts == Counter({variant: 6}), (caller, counts)
    # A request's own sticky key still comes first.
    user = dict(BODY, user="u-81")
    response = http.post(f"{MESH_PREFIX}/v1/completions", json=user, headers=xfcc(callers[0]))
    assert response.headers["x-amalia-variant"] == split.sticky_variant("u-81")


@pytest.mark.parametrize(
    "headers",
    [
        xfcc("team-x/evil"),
        xfcc("team-x/evil", forged="team-a/chat"),  # an allowed id forged in front
        {},  # no mesh identity at all
    ],
    ids=["unlisted", "allowed-one-forged-in-front", "no-header"],
)
def test_unlisted_caller_gets_openai_403_when_mesh_is_on(
    http: httpx.Client, headers: dict[str, str]
) -> None:
    chat = {"model": "amalia", "messages": [{"role": "user", "content": "Olá"}]}
    response = http.post(f"{MESH_PREFIX}/v1/chat/completions", headers=headers, json=chat)
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error", "caller_not_allowed", None,
    )  # fmt: skip
    assert "team-a" not in error["message"]
    assert http.get(f"{MESH_PREFIX}/v1/models", headers=headers).status_code == 403
    listed = http.get(f"{MESH_PREFIX}/v1/models", headers=xfcc("team-b/anyone"))
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == "amalia"


def test_caller_metric_counts_mesh_callers_only_when_mesh_is_on(
    http: httpx.Client, served: RunningServe
) -> None:
    stream = dict(BODY, stream=True, max_tokens=2)
    with http.stream("POST", f"{MESH_PREFIX}/v1/completions", json=stream,
                     headers=xfcc("team-b/streamer")) as response:  # fmt: skip
        assert response.status_code == 200
        body = "".join(response.iter_text())
    assert body.rstrip().endswith("data: [DONE]")
    variant = response.headers["x-amalia-variant"]
    http.post(f"{MESH_PREFIX}/v1/completions", json=BODY, headers=xfcc("team-y/stranger"))
    http.post(f"{MESH_PREFIX}/v1/completions", json=BODY)
    for _ in range(3):
        http.post("/v1/completions", json=BODY, headers=xfcc("team-b/streamer"))

    want: dict[tuple[str, str, str, str], float] = {
        (MESH_APP, "team-b/streamer", variant, "2xx"): 1,  # counted when the stream ended
        (MESH_APP, "team-y/stranger", "", "4xx"): 1,  # refused before routing: no variant
    }
    deadline = time.monotonic() + 60
    while True:
        counts = caller_counts(served)
        if (
            all(counts.get(key) == value for key, value in want.items())
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert {key: counts.get(key) for key in want} == want
    assert not [key for key in counts if key[0] != MESH_APP], "the mesh-off app counted callers"
    assert counts[(MESH_APP, "unidentified", "", "4xx")] >= 1  # the request without a header
