"""Canary routing over HTTP on a real Ray Serve: splits, pins, stickiness, live weights, per-variant metrics."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

from amalia_serve.local_run import deploy_config, set_weights, with_ingress_weights
from amalia_serve.routing import TrafficSplit

pytestmark = [pytest.mark.integration, pytest.mark.demo_variants, pytest.mark.timeout(900)]

BODY = {"model": "amalia", "prompt": "Olá", "max_tokens": 1}


def five_sigma(n: int, p: float) -> float:
    """Half-width of a 5-sigma binomial interval: a correct router fails it about once in 1.7 million runs."""
    return 5 * (n * p * (1 - p)) ** 0.5


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path]) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    with running_serve(demo_app_config(sft, dpo, free_port(), weights={"amalia-sft": 90, "amalia-dpo": 10})) as s:
        yield s


@pytest.fixture(scope="module")
def http(served: RunningServe) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60, limits=httpx.Limits(max_connections=16)) as client:
        yield client


def send(http: httpx.Client, n: int, body: dict[str, Any] = BODY, **headers: str) -> Counter[str]:
    def one(_: int) -> str:
        response = http.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.headers["x-amalia-variant"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return Counter(pool.map(one, range(n)))


def apply_weights(http: httpx.Client, weights: dict[str, int]) -> None:
    set_weights("amalia", weights)
    wait_for_routing(http, lambda r: r["weights"] == weights and r["error"] is None)


def wait_for_routing(http: httpx.Client, condition: Any, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        routing = http.get("/routing").json()
        if condition(routing):
            return routing
        assert time.monotonic() < deadline, f"routing never reached the expected state: {routing}"
        time.sleep(0.2)


def ingress_replicas() -> set[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"]["amalia"]["deployments"]["AmaliaIngress"]["replicas"]
    return {r["replica_id"] for r in replicas}


def test_unpinned_split_matches_weights_within_binomial_bound(http: httpx.Client) -> None:
    counts = send(http, 400)
    assert set(counts) <= {"amalia-sft", "amalia-dpo"}
    assert abs(counts["amalia-dpo"] - 40) <= five_sigma(400, 0.1)  # 40 +- 30


def test_model_name_and_header_pin_a_variant(http: httpx.Client) -> None:
    assert send(http, 20, {**BODY, "model": "amalia-dpo"}) == Counter({"amalia-dpo": 20})
    assert send(http, 20, BODY, **{"x-amalia-variant": "amalia-dpo"}) == Counter({"amalia-dpo": 20})
    # The model name outranks the header.
    assert send(http, 5, {**BODY, "model": "amalia-sft"}, **{"x-amalia-variant": "amalia-dpo"}) == Counter(
        {"amalia-sft": 5}
    )


def test_sticky_user_stays_on_the_variant_its_key_hashes_to(http: httpx.Client) -> None:
    split = TrafficSplit(["amalia-sft", "amalia-dpo"], {"amalia-sft": 90, "amalia-dpo": 10})
    users = [f"utilizador-{i}" for i in range(40)]
    for user in users:
        expected = split.sticky_variant(user)
        assert send(http, 3, {**BODY, "user": user}) == Counter({expected: 3}), user
    sessions = send(http, 4, BODY, **{"x-session-id": users[0]})
    assert sessions == Counter({split.sticky_variant(users[0]): 4})


def test_weight_zero_variant_gets_no_unpinned_traffic_but_serves_pins(http: httpx.Client) -> None:
    apply_weights(http, {"amalia-sft": 100, "amalia-dpo": 0})
    try:
        assert send(http, 60) == Counter({"amalia-sft": 60})
        assert send(http, 5, {**BODY, "model": "amalia-dpo"}) == Counter({"amalia-dpo": 5})
    finally:
        apply_weights(http, {"amalia-sft": 90, "amalia-dpo": 10})


def test_weight_change_under_steady_load_drops_nothing_and_restarts_no_replica(http: httpx.Client) -> None:
    replicas_before = ingress_replicas()
    failures: list[str] = []
    served = Counter[str]()
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 120  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = http.post("/v1/completions", json=BODY)
                if response.status_code == 200:
                    served[response.headers["x-amalia-variant"]] += 1
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        apply_weights(http, {"amalia-sft": 50, "amalia-dpo": 50})
        time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:5]
    assert sum(served.values()) > 20
    assert ingress_replicas() == replicas_before
    after = send(http, 400)
    assert abs(after["amalia-dpo"] - 200) <= five_sigma(400, 0.5)  # 200 +- 50
    apply_weights(http, {"amalia-sft": 90, "amalia-dpo": 10})


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"amalia-sft": -5, "amalia-dpo": 10}, "must be >= 0"),
        ({"amalia-sft": 0, "amalia-dpo": 0}, "at least one weight"),
        ({"amalia-sft": 50, "amalia-xyz": 50}, "no deployed variant named ['amalia-xyz']"),
    ],
)
def test_bad_weights_are_refused_and_old_weights_keep_serving(
    http: httpx.Client, weights: dict[str, int], reason: str
) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    apps = [app["deployed_app_config"] for app in details["applications"].values()]
    apps = [with_ingress_weights(a, weights) if a["name"] == "amalia" else a for a in apps]
    deploy_config({"applications": apps, "http_options": details["http_options"],
                   "proxy_location": details["proxy_location"]})  # fmt: skip
    routing = wait_for_routing(http, lambda r: r["error"] is not None)
    assert reason in routing["error"]
    assert routing["weights"] == {"amalia-sft": 90, "amalia-dpo": 10}
    assert serve.status().applications["amalia"].status == "RUNNING"
    assert sum(send(http, 20).values()) == 20
    apply_weights(http, {"amalia-sft": 90, "amalia-dpo": 10})
    assert http.get("/routing").json()["error"] is None


def test_cli_weight_helper_refuses_bad_split_before_deploying() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        set_weights("amalia", {"amalia-sft": -1})


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("ray_amalia_"):
                labels = frozenset((k, v) for k, v in sample.labels.items() if k in ("variant", "status_class"))
                key = (sample.name, labels)
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def test_metrics_endpoint_counts_each_variants_traffic(served: RunningServe, http: httpx.Client) -> None:
    time.sleep(2.5)  # let earlier tests' samples reach the exporter (1 s report interval)
    before = scrape(served.metrics_url)
    usage: dict[str, Counter[str]] = {"amalia-sft": Counter(), "amalia-dpo": Counter()}
    for variant, n in (("amalia-sft", 7), ("amalia-dpo", 5)):
        for _ in range(n):
            reply = http.post("/v1/completions", json={**BODY, "model": variant, "max_tokens": 3}).json()
            usage[variant].update(reply["usage"])
    http.post("/v1/completions", json={**BODY, "model": "amalia-dpo", "max_tokens": 10**6})  # one 4xx

    def deltas() -> dict[str, float]:
        after = scrape(served.metrics_url)
        names = {
            "sft_2xx": ("ray_amalia_requests_total", {"variant": "amalia-sft", "status_class": "2xx"}),
            "dpo_2xx": ("ray_amalia_requests_total", {"variant": "amalia-dpo", "status_class": "2xx"}),
            "dpo_4xx": ("ray_amalia_requests_total", {"variant": "amalia-dpo", "status_class": "4xx"}),
            "sft_out": ("ray_amalia_output_tokens_total", {"variant": "amalia-sft"}),
            "dpo_out": ("ray_amalia_output_tokens_total", {"variant": "amalia-dpo"}),
            "dpo_prompt": ("ray_amalia_prompt_tokens_total", {"variant": "amalia-dpo"}),
            "sft_ttft": ("ray_amalia_time_to_first_token_seconds_count", {"variant": "amalia-sft"}),
            "sft_engine_ttft": ("ray_amalia_engine_time_to_first_token_seconds_count", {"variant": "amalia-sft"}),
            "dpo_prefix_lookups": ("ray_amalia_prefix_cache_queries_total", {"variant": "amalia-dpo"}),
        }
        return {k: metric(after, n, **l) - metric(before, n, **l) for k, (n, l) in names.items()}

    expected = {
        "sft_2xx": 7, "dpo_2xx": 5, "dpo_4xx": 1,
        "sft_out": usage["amalia-sft"]["completion_tokens"], "dpo_out": usage["amalia-dpo"]["completion_tokens"],
        "dpo_prompt": usage["amalia-dpo"]["prompt_tokens"], "sft_ttft": 7, "sft_engine_ttft": 7,
        # vLLM looks every prompt token up in its prefix cache (the 4xx request never reached the engine).
        "dpo_prefix_lookups": usage["amalia-dpo"]["prompt_tokens"],
    }  # fmt: skip
    deadline = time.monotonic() + 30
    while (got := deltas()) != expected:
        assert time.monotonic() < deadline, f"metrics {got} != traffic {expected}"
        time.sleep(1)
