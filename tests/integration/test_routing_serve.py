"""Canary routing over HTTP on a real Ray Serve: splits, pins, stickiness, live weights, shadow traffic,
per-variant metrics."""

from __future__ import annotations

import itertools
import json
import statistics
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
from serve_harness import RunningServe, demo_app_config, engine_paused, free_port, running_serve

from amalia_serve.local_run import deploy_config, set_routing, set_weights, with_ingress_routing
from amalia_serve.routing import TrafficSplit
from amalia_variety import count_markers

pytestmark = [pytest.mark.integration, pytest.mark.demo_variants, pytest.mark.timeout(900)]

BODY = {"model": "amalia", "prompt": "Olá", "max_tokens": 1}
SFT, DPO = "amalia-sft", "amalia-dpo"
WEIGHTS = {SFT: 90, DPO: 10}


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


def wait_for_app_status(app: str, settled: set[str], timeout_s: float = 30) -> str:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while (status := serve.status().applications[app].status.value) not in settled:
        assert time.monotonic() < deadline, f"application {app} still {status} after {timeout_s:.0f} s"
        time.sleep(0.2)
    return status


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
    ("changes", "reason"),
    [
        ({"weights": {"amalia-sft": -5, "amalia-dpo": 10}}, "must be >= 0"),
        ({"weights": {"amalia-sft": 0, "amalia-dpo": 0}}, "at least one weight"),
        ({"weights": {"amalia-sft": 50, "amalia-xyz": 50}}, "no deployed variant named ['amalia-xyz']"),
        # A bad shadow block is refused the same way, with the weights that came with it.
        ({"weights": {"amalia-sft": 50, "amalia-dpo": 50}, "shadow": {"variant": "amalia-xyz", "percent": 5}},
         "shadow variant 'amalia-xyz' is not a variant"),
        ({"shadow": {"variant": "amalia-dpo", "percent": 250}}, "shadow.percent: Input should be less than or equal to 100"),
    ],
)
def test_bad_routing_is_refused_and_old_routing_keeps_serving(
    http: httpx.Client, changes: dict[str, Any], reason: str
) -> None:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    apps = [app["deployed_app_config"] for app in details["applications"].values()]
    apps = [with_ingress_routing(a, **changes) if a["name"] == "amalia" else a for a in apps]
    deploy_config({"applications": apps, "http_options": details["http_options"],
                   "proxy_location": details["proxy_location"]})  # fmt: skip
    try:
        routing = wait_for_routing(http, lambda r: r["error"] is not None)
        assert reason in routing["error"]
        assert (routing["weights"], routing["shadow"]) == (WEIGHTS, None)
        # The refusal happens in the replica's reconfigure; Serve reports DEPLOYING until it has seen that end.
        assert wait_for_app_status("amalia", {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"}) == "RUNNING"
        assert sum(send(http, 20).values()) == 20
    finally:  # the next case must start from good routing, whatever this one found
        set_routing("amalia", weights=WEIGHTS, shadow=None)
        wait_for_routing(http, lambda r: r["error"] is None)


def test_cli_weight_helper_refuses_bad_split_before_deploying() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        set_weights("amalia", {"amalia-sft": -1})


SCRAPED_LABELS = ("variant", "status_class", "reason", "variety")


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("ray_amalia_"):
                labels = frozenset((k, v) for k, v in sample.labels.items() if k in SCRAPED_LABELS)
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


# === shadow traffic ===

# Greedy, seeded and a fixed length (ignore_eos): a copy generates exactly what the request did.
CHAT = {"model": "amalia", "max_tokens": 8, "temperature": 0, "seed": 7, "ignore_eos": True}
SHADOW_OUTPUT_TOKENS = 8
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def chat(http: httpx.Client, index: int, stream: bool, **fields: Any) -> tuple[str, str, float]:
    """One chat; (variant that answered, the answer's text, seconds to the end of the answer)."""
    body = {**CHAT, "messages": [{"role": "user", "content": f"Pergunta {index}: como vou ao Porto?"}],
            "stream": stream, **fields}  # fmt: skip
    started = time.perf_counter()
    if not stream:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        return response.headers["x-amalia-variant"], text, time.perf_counter() - started
    parts = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            parts += [choice["delta"].get("content", "") for choice in json.loads(event[6:])["choices"]]
        return response.headers["x-amalia-variant"], "".join(parts), time.perf_counter() - started


def set_shadow(http: httpx.Client, shadow: dict[str, Any] | None, weights: dict[str, int] = WEIGHTS) -> None:
    set_routing("amalia", weights=weights, shadow=shadow)
    wait_for_routing(http, lambda r: r["shadow"] == shadow and r["weights"] == weights and r["error"] is None)


def wait_for_deltas(url: str, before: Metrics, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    """Until every (metric, labels) has grown by exactly its expected amount since `before`."""
    deadline = time.monotonic() + 30
    while True:
        after = scrape(url)
        got = {key: metric(after, key[0], **dict(key[1])) - metric(before, key[0], **dict(key[1])) for key in expected}
        if got == expected:
            return
        assert time.monotonic() < deadline, f"metric deltas {got} != {expected}"
        time.sleep(1)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(seconds, n=20, method="inclusive")
    return cuts[9], cuts[18]  # p50, p95


def test_shadow_at_100_percent_changes_no_answer_or_route_and_counts_every_copy(
    served: RunningServe, http: httpx.Client
) -> None:
    split = TrafficSplit([SFT, DPO], WEIGHTS)
    # Sticky users, 30 that the split sends to SFT (each copied) and 10 to DPO (none copied).
    wanted = {SFT: 30, DPO: 10}
    users = []
    for user in (f"sombra-{i}" for i in itertools.count()):
        variant = split.sticky_variant(user)
        if wanted[variant]:
            wanted[variant] -= 1
            users.append(user)
        if len(users) == 40:
            break
    for i in range(4):  # warm both variants' engines and the path through the ingress
        chat(http, i, stream=bool(i % 2), user=users[i])

    def run() -> list[tuple[str, str, float]]:
        return [chat(http, i, stream=bool(i % 2), user=user) for i, user in enumerate(users)]

    off = run()
    time.sleep(2.5)  # let the earlier samples reach the exporter (1 s report interval)
    before = scrape(served.metrics_url)
    set_shadow(http, {"variant": DPO, "percent": 100.0, "max_in_flight": len(users)})
    try:
        on = run()
    finally:
        set_shadow(http, None)

    # Sticky keys stay sticky and no answer changes; only the requests routed to SFT are copied.
    assert [variant for variant, _, _ in off] == [split.sticky_variant(user) for user in users]
    assert [(variant, text) for variant, text, _ in on] == [(variant, text) for variant, text, _ in off]
    shadowed = [i for i, (variant, _, _) in enumerate(on) if variant == SFT]
    assert len(shadowed) == 30
    # The copies answer what the shadow variant answers when asked by name (greedy, seeded).
    dpo_answers = [chat(http, i, stream=False, model=DPO)[1] for i in shadowed]
    dpo_markers = [count_markers(text) for text in dpo_answers]
    sft_markers = [count_markers(on[i][1]) for i in shadowed]
    n = len(shadowed)
    expected = {
        ("ray_amalia_shadow_requests_total", (("variant", DPO), ("status_class", "2xx"))): n,
        ("ray_amalia_shadow_requests_total", ()): n,
        ("ray_amalia_shadow_latency_seconds_count", (("variant", DPO),)): n,
        ("ray_amalia_shadow_output_tokens_total", (("variant", DPO),)): n * SHADOW_OUTPUT_TOKENS,
        ("ray_amalia_shadow_dropped_total", ()): 0,
        ("ray_amalia_shadow_variety_markers_total", (("variant", DPO), ("variety", "pt-PT"))): sum(
            c.pt_pt for c in dpo_markers),
        ("ray_amalia_shadow_variety_markers_total", (("variant", DPO), ("variety", "pt-BR"))): sum(
            c.pt_br for c in dpo_markers),
        ("ray_amalia_shadow_variety_markers_total", (("variant", SFT), ("variety", "pt-PT"))): sum(
            c.pt_pt for c in sft_markers),
        ("ray_amalia_shadow_variety_markers_total", (("variant", SFT), ("variety", "pt-BR"))): sum(
            c.pt_br for c in sft_markers),
    }  # fmt: skip
    wait_for_deltas(served.metrics_url, before, expected)

    # The caller's latency, shadow off vs on (printed for the record).
    (off_p50, off_p95), (on_p50, on_p95) = (percentiles([s for _, _, s in run_]) for run_ in (off, on))
    print(f"caller latency over {len(users)} chats, shadow off: p50 {off_p50 * 1000:.1f} ms, "
          f"p95 {off_p95 * 1000:.1f} ms; shadow 100%: p50 {on_p50 * 1000:.1f} ms, p95 {on_p95 * 1000:.1f} ms")


def test_shadow_copies_past_max_in_flight_are_dropped_while_callers_get_their_answers_when_the_shadow_stalls(
    served: RunningServe, http: httpx.Client
) -> None:
    time.sleep(2.5)
    before = scrape(served.metrics_url)
    all_to_sft = {SFT: 100, DPO: 0}
    set_shadow(http, {"variant": DPO, "percent": 100.0, "max_in_flight": 1}, weights=all_to_sft)
    try:
        # DPO's engine is stopped: the first copy hangs there, in flight, and every later one finds the
        # replica's one slot taken. The callers, answered by SFT, must not wait for any copy.
        with engine_paused(DPO), ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda i: chat(http, i, stream=bool(i % 2)), range(16)))
        assert {variant for variant, _, _ in answers} == {SFT}
    finally:
        set_shadow(http, None)
    # The hung copy finishes once the engine runs again.
    wait_for_deltas(served.metrics_url, before, {
        ("ray_amalia_shadow_dropped_total", (("variant", DPO), ("reason", "in_flight_limit"))): 15,
        ("ray_amalia_shadow_dropped_total", ()): 15,
        ("ray_amalia_shadow_requests_total", (("variant", DPO), ("status_class", "2xx"))): 1,
        ("ray_amalia_shadow_requests_total", ()): 1,
    })  # fmt: skip
