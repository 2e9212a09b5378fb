"""Per-variant Prometheus metrics, emitted through ``ray.serve.metrics``.

Ray exports them on every node's metrics port (``ray start --metrics-export-port``); inside a
replica Serve adds the ``deployment``, ``replica`` and ``application`` labels. Every metric here
carries ``variant``, so dashboards and the rollout analysis compare canary and stable with
``sum by (variant)``.

The record methods sit on the request and decode hot paths: tags are bound once
(``set_default_tags`` for the fixed variant of a replica, cached dicts for the ingress's few label
combinations), and nothing here allocates per call beyond what Ray itself does.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

# Ray's exporter prefixes every application metric with `ray_`; counters gain `_total`, histograms
# `_bucket`/`_count`/`_sum`. Ray 2.60 ships histograms to its agent pre-bucketed, so `_sum` counts
# each observation at its bucket's midpoint (twice the top bound above it): use the buckets, not
# sum/count.
# tests/integration/test_ray_metrics_export.py proves all of this on a live Ray.
EXPORT_PREFIX = "ray_"

# Ingress: what a caller sees.
REQUESTS = "amalia_requests"
REQUEST_LATENCY = "amalia_request_latency_seconds"
TIME_TO_FIRST_TOKEN = "amalia_time_to_first_token_seconds"
# Engine: what vLLM reports after each of its steps (serve/vllm_engine.py feeds these).
ENGINE_TIME_TO_FIRST_TOKEN = "amalia_engine_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "amalia_inter_token_latency_seconds"
QUEUE_WAIT = "amalia_queue_wait_seconds"
PROMPT_TOKENS = "amalia_prompt_tokens"
OUTPUT_TOKENS = "amalia_output_tokens"
RUNNING_REQUESTS = "amalia_running_requests"
WAITING_REQUESTS = "amalia_waiting_requests"
KV_CACHE_USAGE = "amalia_kv_cache_usage_ratio"
PREFIX_CACHE_QUERIES = "amalia_prefix_cache_queries"
PREFIX_CACHE_HITS = "amalia_prefix_cache_hits"
PREEMPTIONS = "amalia_preemptions"

# Bucket bounds in seconds. TTFT spans a warm short prompt (~10 ms) to a long prefill behind a
# queue; 2.0 is a bound because the default rollout analysis gates on p95 TTFT <= 2 s, and
# histogram_quantile is exact only at bucket bounds.
TTFT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
)  # fmt: skip
# Decode steps of a 9B model on one GPU take ~10-60 ms; the tail catches preemption and swapping.
INTER_TOKEN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
)  # fmt: skip
QUEUE_WAIT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# Every histogram's bucket bounds, by metric name: the constructors and the export test read them.
HISTOGRAM_BOUNDARIES: dict[str, tuple[float, ...]] = {
    REQUEST_LATENCY: REQUEST_LATENCY_BUCKETS_S,
    TIME_TO_FIRST_TOKEN: TTFT_BUCKETS_S,
    ENGINE_TIME_TO_FIRST_TOKEN: TTFT_BUCKETS_S,
    INTER_TOKEN_LATENCY: INTER_TOKEN_BUCKETS_S,
    QUEUE_WAIT: QUEUE_WAIT_BUCKETS_S,
}

VARIANT_TAG = "variant"
STATUS_CLASS_TAG = "status_class"
ROUTE_REASON_TAG = "route_reason"


def _exported(name: str, *suffixes: str) -> frozenset[str]:
    return frozenset(f"{EXPORT_PREFIX}{name}{suffix}" for suffix in suffixes)


_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
EXPORTED_METRIC_NAMES: frozenset[str] = frozenset().union(
    _exported(REQUESTS, "_total"),
    _exported(PROMPT_TOKENS, "_total"),
    _exported(OUTPUT_TOKENS, "_total"),
    _exported(PREFIX_CACHE_QUERIES, "_total"),
    _exported(PREFIX_CACHE_HITS, "_total"),
    _exported(PREEMPTIONS, "_total"),
    _exported(RUNNING_REQUESTS, ""),
    _exported(WAITING_REQUESTS, ""),
    _exported(KV_CACHE_USAGE, ""),
    *(_exported(name, *_HISTOGRAM_SUFFIXES) for name in HISTOGRAM_BOUNDARIES),
)

# Ray Serve's own metrics that the canary dashboard reads (replica counts per deployment, and a
# deployment is named after its variant); the export test proves they are on the endpoint too.
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"


def status_class(status_code: int) -> str:
    """``503`` -> ``"5xx"``: the label keeps one series per class, not per code."""
    return f"{status_code // 100}xx"


class IngressMetrics:
    """What the ingress sees per request, labelled by the variant it routed to; one per replica."""

    def __init__(self) -> None:
        self._requests = Counter(
            REQUESTS,
            description="Requests answered by the ingress by variant, status class, route reason.",
            # Ray annotates tag_keys as Tuple[str] but means a tuple of any length.
            tag_keys=(VARIANT_TAG, STATUS_CLASS_TAG, ROUTE_REASON_TAG),  # type: ignore[arg-type]
        )
        self._latency = Histogram(
            REQUEST_LATENCY,
            description="Seconds from request arrival at the ingress to the response's last byte.",
            boundaries=list(HISTOGRAM_BOUNDARIES[REQUEST_LATENCY]),
            tag_keys=(VARIANT_TAG,),
        )
        self._ttft = Histogram(
            TIME_TO_FIRST_TOKEN,
            description="Seconds from request arrival at the ingress to the first generated token.",
            boundaries=list(HISTOGRAM_BOUNDARIES[TIME_TO_FIRST_TOKEN]),
            tag_keys=(VARIANT_TAG,),
        )
        # A few variants x 3 status classes x 4 reasons: cache the tag dicts, built once each.
        self._request_tags: dict[tuple[str, int, str], dict[str, str]] = {}
        self._variant_tags: dict[str, dict[str, str]] = {}

    def record_request(
        self, variant: str, status_code: int, latency_s: float, route_reason: str
    ) -> None:
        key = (variant, status_code // 100, route_reason)
        tags = self._request_tags.get(key)
        if tags is None:
            tags = self._request_tags[key] = {
                VARIANT_TAG: variant,
                STATUS_CLASS_TAG: status_class(status_code),
                ROUTE_REASON_TAG: str(route_reason),
            }
        self._requests.inc(1, tags)
        self._latency.observe(latency_s, self._tags_of(variant))

    def record_first_token(self, variant: str, ttft_s: float) -> None:
        """User-visible TTFT: measured at the ingress, so it includes routing and queueing."""
        self._ttft.observe(ttft_s, self._tags_of(variant))

    def _tags_of(self, variant: str) -> dict[str, str]:
        tags = self._variant_tags.get(variant)
        if tags is None:
            tags = self._variant_tags[variant] = {VARIANT_TAG: variant}
        return tags


class VariantMetrics:
    """Engine-side metrics of one variant replica; the variant label is bound at construction.

    vLLM reports once per engine step, from the replica's event loop (its output handler): `record_step` takes
    that report already unpacked, so this module stays free of vLLM's types.
    """

    def __init__(self, variant: str) -> None:
        keys = (VARIANT_TAG,)
        self._engine_ttft = Histogram(
            ENGINE_TIME_TO_FIRST_TOKEN,
            description="Seconds from a request's arrival at the engine to its first token (no routing, no "
            "network: compare with amalia_time_to_first_token_seconds for the overhead in front).",
            boundaries=list(HISTOGRAM_BOUNDARIES[ENGINE_TIME_TO_FIRST_TOKEN]),
            tag_keys=keys,
        )
        self._inter_token = Histogram(
            INTER_TOKEN_LATENCY,
            description="Seconds between consecutive output tokens of a request, as the engine produced them.",
            boundaries=list(HISTOGRAM_BOUNDARIES[INTER_TOKEN_LATENCY]),
            tag_keys=keys,
        )
        self._queue_wait = Histogram(
            QUEUE_WAIT,
            description="Seconds a finished request waited in the engine's queue before it was first scheduled.",
            boundaries=list(HISTOGRAM_BOUNDARIES[QUEUE_WAIT]),
            tag_keys=keys,
        )
        self._prompt_tokens = Counter(
            PROMPT_TOKENS, description="Prompt tokens prefilled (prefix-cache hits included).", tag_keys=keys
        )
        self._output_tokens = Counter(OUTPUT_TOKENS, description="Tokens generated.", tag_keys=keys)
        self._prefix_queries = Counter(
            PREFIX_CACHE_QUERIES, description="Prompt tokens looked up in the prefix cache.", tag_keys=keys
        )
        self._prefix_hits = Counter(
            PREFIX_CACHE_HITS, description="Prompt tokens found in the prefix cache (not recomputed).",
            tag_keys=keys,
        )  # fmt: skip
        self._preemptions = Counter(
            PREEMPTIONS, description="Requests preempted because the KV cache ran out (recomputed later).",
            tag_keys=keys,
        )  # fmt: skip
        self._running = Gauge(
            RUNNING_REQUESTS, description="Requests in the engine's running batch.", tag_keys=keys
        )
        self._waiting = Gauge(
            WAITING_REQUESTS, description="Requests queued in the engine for a batch slot.", tag_keys=keys
        )
        self._kv_cache_usage = Gauge(
            KV_CACHE_USAGE, description="Fraction of the engine's KV-cache blocks in use (0..1).", tag_keys=keys
        )
        for metric in (
            self._engine_ttft, self._inter_token, self._queue_wait, self._prompt_tokens, self._output_tokens,
            self._prefix_queries, self._prefix_hits, self._preemptions, self._running, self._waiting,
            self._kv_cache_usage,
        ):  # fmt: skip
            # Serve adds its deployment/replica tags into the dict it is given: one dict each.
            metric.set_default_tags({VARIANT_TAG: variant})

    def set_load(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_cache_usage.set(kv_cache_usage)

    def record_prefix_cache(self, queries: int, hits: int) -> None:
        # Ray counters refuse increments <= 0.
        if queries > 0:
            self._prefix_queries.inc(queries)
        if hits > 0:
            self._prefix_hits.inc(hits)

    def record_step(
        self,
        prompt_tokens: int,
        output_tokens: int,
        preemptions: int,
        ttfts_s: list[float],
        inter_token_s: list[float],
        queue_waits_s: list[float],
    ) -> None:
        """One engine step's tokens, preemptions and per-request latencies."""
        if prompt_tokens > 0:
            self._prompt_tokens.inc(prompt_tokens)
        if output_tokens > 0:
            self._output_tokens.inc(output_tokens)
        if preemptions > 0:
            self._preemptions.inc(preemptions)
        for seconds in ttfts_s:
            self._engine_ttft.observe(seconds)
        for seconds in inter_token_s:
            self._inter_token.observe(seconds)
        for seconds in queue_waits_s:
            self._queue_wait.observe(seconds)
