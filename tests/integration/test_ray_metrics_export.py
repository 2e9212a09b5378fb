"""The per-variant metrics reach Ray's Prometheus endpoint under the names serve/metrics.py exports.

A real local Ray (metrics agent on a free port) runs a tiny Serve app shaped like amalia-serve: an
ingress deployment and one deployment per variant, each recording through IngressMetrics (and the
ingress's ShadowMetrics) and VariantMetrics. The test scrapes ``/metrics`` until every series carries exactly what was recorded.
"""

from __future__ import annotations

import bisect
import json
import socket
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from amalia_serve import metrics as m
from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME
from amalia_variety import count_markers

pytestmark = pytest.mark.integration

SFT, DPO = "amalia-sft", "amalia-dpo"
SCRAPE_DEADLINE_S = 60.0

# What each deployment records; values sit inside buckets, never on a bound, so placement is exact.
INGRESS_PLAN: dict[str, list[Any]] = {
    "requests": [
        [SFT, 200, 0.30, "weighted"],
        [SFT, 200, 1.20, "weighted"],
        [SFT, 503, 0.04, "sticky"],
        [DPO, 200, 0.70, "pinned"],
        [DPO, 429, 0.02, "header"],
    ],
    "first_token": [[SFT, 0.12], [SFT, 2.4], [DPO, 0.06]],
    "api_key_requests": ["team-a", "team-a", "unauthorized"],
    # The second request was cut short before any output: that token kind must not count.
    "api_key_tokens": [["team-a", 11, 7], ["team-a", 5, 0]],
    # Mesh callers; the last one was refused before routing, so it has no variant.
    "callers": [
        ["team-a/chat", SFT, 200],
        ["team-a/chat", SFT, 200],
        ["team-b/batch", DPO, 429],
        ["unidentified", "", 403],
    ],
    # Shadow copies: [variant, status, latency, output tokens]; a failed one generated nothing.
    "shadow_copies": [[DPO, 200, 0.9, 12], [DPO, 503, 3.5, 0], [DPO, 200, 0.4, 7]],
    "shadow_dropped": [[DPO, "in_flight_limit"], [DPO, "in_flight_limit"], [DPO, "overloaded"], [DPO, "unavailable"]],
    # Both answers of a copied request, scored with the lexicon as the ingress does.
    "shadow_answers": [[DPO, "Apanhe o comboio e depois o autocarro."], [SFT, "Pegue o trem, de fato é rápido."]],
}
VARIANT_PLANS: dict[str, dict[str, list[Any]]] = {
    SFT: {
        # One engine step each: prompt and output tokens, preemptions, then per-request latencies.
        # The second step's tokens are all zero (an aborted request): it must not raise or count.
        "steps": [
            [11, 7, 1, [0.12], [0.02, 0.035], [0.02, 0.3]],
            [0, 0, 0, [], [], []],
        ],
        "prefix_cache": [[40, 32], [9, 0]],
        "load": [[4, 9, 0.62], [3, 2, 0.41]],
    },
    DPO: {
        "steps": [[13, 21, 0, [2.4], [0.045], [0.007]]],
        "prefix_cache": [[13, 0]],
        "load": [[1, 0, 0.07]],
    },
}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VariantRecorder:
    def __init__(self, variant: str) -> None:
        self._metrics = m.VariantMetrics(variant)

    def record(self, plan: dict[str, list[Any]]) -> None:
        for prompt, output, preemptions, ttfts, gaps, waits in plan["steps"]:
            self._metrics.record_step(prompt, output, preemptions, ttfts, gaps, waits)
        for queries, hits in plan["prefix_cache"]:
            self._metrics.record_prefix_cache(queries, hits)
        for running, waiting, kv_usage in plan["load"]:
            self._metrics.set_load(running, waiting, kv_usage)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class IngressRecorder:
    def __init__(self, sft: DeploymentHandle[Any], dpo: DeploymentHandle[Any]) -> None:
        self._metrics = m.IngressMetrics()
        self._shadow = m.ShadowMetrics()
        self._variants = {SFT: sft, DPO: dpo}

    async def __call__(self, request: Request) -> str:
        body = await request.json()
        for variant, status, latency, reason in body["ingress"]["requests"]:
            self._metrics.record_request(variant, status, latency, reason)
        for variant, ttft in body["ingress"]["first_token"]:
            self._metrics.record_first_token(variant, ttft)
        for key_name in body["ingress"]["api_key_requests"]:
            self._metrics.record_api_key_request(key_name)
        for key_name, prompt, output in body["ingress"]["api_key_tokens"]:
            self._metrics.record_api_key_tokens(key_name, prompt, output)
        for caller, variant, status in body["ingress"]["callers"]:
            self._metrics.record_caller(caller, variant, status)
        for variant, status, latency, tokens in body["ingress"]["shadow_copies"]:
            self._shadow.record_copy(variant, status, latency, tokens)
        for variant, reason in body["ingress"]["shadow_dropped"]:
            self._shadow.record_dropped(variant, reason)
        for variant, answer in body["ingress"]["shadow_answers"]:
            counts = count_markers(answer)
            self._shadow.record_variety(variant, counts.pt_pt, counts.pt_br)
        for variant, handle in self._variants.items():
            await handle.record.remote(body["variants"][variant])
        return "recorded"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    """Runs the recorder app on a fresh local Ray and returns its Prometheus endpoint."""
    metrics_port, http_port = _free_port(), _free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        # Emitters flush once a second at the fastest; the default is every 10 s.
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            app = IngressRecorder.options(name=INGRESS_DEPLOYMENT_NAME).bind(
                VariantRecorder.options(name=SFT).bind(SFT),
                VariantRecorder.options(name=DPO).bind(DPO),
            )
            serve.run(app, name="amalia", route_prefix="/")
            body = json.dumps({"ingress": INGRESS_PLAN, "variants": VARIANT_PLANS}).encode()
            post = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/", data=body, method="POST"
            )
            with urllib.request.urlopen(post, timeout=30) as response:
                assert response.read() == b"recorded"
            yield f"http://127.0.0.1:{metrics_port}/metrics"
        finally:
            serve.shutdown()
            ray.shutdown()


_KEPT_LABELS = (
    "variant", "status_class", "route_reason", "le", "deployment", "caller", "api_key", "kind", "reason", "variety",
)  # fmt: skip
Series = tuple[str, tuple[tuple[str, str], ...]]


def _series(name: str, **labels: object) -> Series:
    return name, tuple(sorted((k, str(v)) for k, v in labels.items()))


def _scrape(url: str) -> dict[Series, float]:
    """Sums samples over the labels a dashboard would aggregate away (worker, replica, node...)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    summed: dict[Series, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("ray_amalia_", "ray_serve_")):
                labels = {k: v for k, v in sample.labels.items() if k in _KEPT_LABELS}
                if "le" in labels:
                    labels["le"] = repr(float(labels["le"]))
                summed[_series(sample.name, **labels)] += sample.value
    return summed


def _ray_midpoint(bounds: tuple[float, ...], value: float) -> float:
    """Where Ray 2.60 counts an observation in ``_sum`` (open_telemetry_metric_recorder.py)."""
    index = bisect.bisect_left(bounds, value)
    if index == len(bounds):
        return 2 * bounds[-1]
    return (bounds[index] + (bounds[index - 1] if index else 0.0)) / 2


def _expect_histogram(
    out: dict[Series, float], name: str, deployment: str, variant: str, values: list[float]
) -> None:
    bounds = m.HISTOGRAM_BOUNDARIES[name]
    exported = m.EXPORT_PREFIX + name
    labels = {"deployment": deployment, "variant": variant}
    for le in (*bounds, float("inf")):
        count = sum(v <= le for v in values)
        out[_series(f"{exported}_bucket", le=repr(le), **labels)] = count
    out[_series(f"{exported}_count", **labels)] = len(values)
    out[_series(f"{exported}_sum", **labels)] = sum(_ray_midpoint(bounds, v) for v in values)


def _expected() -> dict[Series, float]:
    out: dict[Series, float] = defaultdict(float)
    ingress = INGRESS_DEPLOYMENT_NAME
    for variant, status, _, reason in INGRESS_PLAN["requests"]:
        key = _series(
            m.EXPORT_PREFIX + m.REQUESTS + "_total",
            deployment=ingress,
            variant=variant,
            status_class=f"{status // 100}xx",
            route_reason=reason,
        )
        out[key] += 1
    for key_name in INGRESS_PLAN["api_key_requests"]:
        out[_series(m.EXPORT_PREFIX + m.API_KEY_REQUESTS + "_total", deployment=ingress, api_key=key_name)] += 1
    for key_name, prompt, output in INGRESS_PLAN["api_key_tokens"]:
        for kind, tokens in (("prompt", prompt), ("output", output)):
            if tokens:
                key = _series(m.EXPORT_PREFIX + m.API_KEY_TOKENS + "_total", deployment=ingress,
                              api_key=key_name, kind=kind)  # fmt: skip
                out[key] += tokens
    for caller, variant, status in INGRESS_PLAN["callers"]:
        # Ray exports an empty tag as variant="" (a Prometheus server then drops the label).
        labels = {"deployment": ingress, "caller": caller, "status_class": f"{status // 100}xx"}
        key = _series(m.EXPORT_PREFIX + m.CALLER_REQUESTS + "_total", variant=variant, **labels)
        out[key] += 1
    for variant, status, _, tokens in INGRESS_PLAN["shadow_copies"]:
        labels = {"deployment": ingress, "variant": variant}
        out[_series(m.EXPORT_PREFIX + m.SHADOW_REQUESTS + "_total", status_class=f"{status // 100}xx", **labels)] += 1
        if tokens:
            out[_series(m.EXPORT_PREFIX + m.SHADOW_OUTPUT_TOKENS + "_total", **labels)] += tokens
    for variant, reason in INGRESS_PLAN["shadow_dropped"]:
        out[_series(m.EXPORT_PREFIX + m.SHADOW_DROPPED + "_total", deployment=ingress, variant=variant,
                    reason=reason)] += 1  # fmt: skip
    for variant, answer in INGRESS_PLAN["shadow_answers"]:
        counts = count_markers(answer)
        for variety, markers in (("pt-PT", counts.pt_pt), ("pt-BR", counts.pt_br)):
            if markers:
                key = _series(m.EXPORT_PREFIX + m.SHADOW_VARIETY_MARKERS + "_total", deployment=ingress,
                              variant=variant, variety=variety)  # fmt: skip
                out[key] += markers
    copies = INGRESS_PLAN["shadow_copies"]
    _expect_histogram(out, m.SHADOW_LATENCY, ingress, DPO, [c[2] for c in copies if c[0] == DPO])
    for variant in (SFT, DPO):
        requests = [r for r in INGRESS_PLAN["requests"] if r[0] == variant]
        ttfts = [t for v, t in INGRESS_PLAN["first_token"] if v == variant]
        _expect_histogram(out, m.REQUEST_LATENCY, ingress, variant, [r[2] for r in requests])
        _expect_histogram(out, m.TIME_TO_FIRST_TOKEN, ingress, variant, ttfts)

        plan, labels = VARIANT_PLANS[variant], {"deployment": variant, "variant": variant}
        steps = plan["steps"]
        _expect_histogram(out, m.ENGINE_TIME_TO_FIRST_TOKEN, variant, variant, [t for s in steps for t in s[3]])
        _expect_histogram(out, m.INTER_TOKEN_LATENCY, variant, variant, [g for s in steps for g in s[4]])
        _expect_histogram(out, m.QUEUE_WAIT, variant, variant, [w for s in steps for w in s[5]])
        for name, total in (
            (m.PROMPT_TOKENS, sum(s[0] for s in steps)),
            (m.OUTPUT_TOKENS, sum(s[1] for s in steps)),
            (m.PREEMPTIONS, sum(s[2] for s in steps)),
            (m.PREFIX_CACHE_QUERIES, sum(q for q, _ in plan["prefix_cache"])),
            (m.PREFIX_CACHE_HITS, sum(h for _, h in plan["prefix_cache"])),
        ):
            if total:  # Ray exports a counter only once something was added to it
                out[_series(m.EXPORT_PREFIX + name + "_total", **labels)] = total
        running, waiting, kv_usage = plan["load"][-1]
        out[_series(m.EXPORT_PREFIX + m.RUNNING_REQUESTS, **labels)] = running
        out[_series(m.EXPORT_PREFIX + m.WAITING_REQUESTS, **labels)] = waiting
        out[_series(m.EXPORT_PREFIX + m.KV_CACHE_USAGE, **labels)] = kv_usage
    return dict(out)


def _mismatches(expected: dict[Series, float], scraped: dict[Series, float]) -> dict[Series, Any]:
    return {
        key: (want, scraped.get(key))
        for key, want in expected.items()
        if scraped.get(key) is None or abs(scraped[key] - want) > 1e-9 * max(1.0, abs(want))
    }


def _scrape_until_exported(url: str, expected: dict[Series, float]) -> dict[Series, float]:
    # Emitters flush on their own clocks: one scrape may hold some deployments' values, not others.
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        scraped = _scrape(url)
        if not _mismatches(expected, scraped) or time.monotonic() > deadline:
            return scraped
        time.sleep(0.5)


def test_exported_metrics_carry_recorded_values_when_scraped_from_ray(metrics_url: str) -> None:
    expected = _expected()
    scraped = _scrape_until_exported(metrics_url, expected)
    assert _mismatches(expected, scraped) == {}
    amalia_names = {name for name, _ in scraped if name.startswith("ray_amalia_")}
    assert amalia_names == m.EXPORTED_METRIC_NAMES
    per_key = {m.EXPORT_PREFIX + m.API_KEY_REQUESTS + "_total", m.EXPORT_PREFIX + m.API_KEY_TOKENS + "_total"}
    for name, labels in scraped:
        if name in per_key:
            assert dict(labels)["api_key"] in ("team-a", "unauthorized"), (name, labels)
        elif name.startswith("ray_amalia_"):
            refused = dict(labels).get("caller") == "unidentified"
            assert dict(labels)["variant"] in (("",) if refused else (SFT, DPO)), (name, labels)


def test_serve_replica_metrics_exist_per_variant_when_the_dashboard_reads_them(
    metrics_url: str,
) -> None:
    expected = {
        _series(name, deployment=deployment): 1.0
        for name in (m.SERVE_REPLICA_HEALTHY, m.SERVE_TARGET_REPLICAS)
        for deployment in (SFT, DPO, INGRESS_DEPLOYMENT_NAME)
    }
    scraped = _scrape_until_exported(metrics_url, expected)
    assert _mismatches(expected, scraped) == {}
