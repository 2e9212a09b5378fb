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
CALLER_REQUESTS = "amalia_caller_requests"
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
# Per API key (label api_key = the key's name, never the key; see amalia_serve.api_keys).
API_KEY_REQUESTS = "amalia_api_key_requests"
API_KEY_TOKENS = "amalia_api_key_tokens"
# Shadow traffic (amalia_serve.shadow): copies of answered requests sent to a shadow variant, recorded
# by the ingress, labelled with the variant that answered the copy.
SHADOW_REQUESTS = "amalia_shadow_requests"
SHADOW_DROPPED = "amalia_shadow_dropped"
SHADOW_LATENCY = "amalia_shadow_latency_seconds"
SHADOW_OUTPUT_TOKENS = "amalia_shadow_output_tokens"
SHADOW_VARIETY_MARKERS = "amalia_shadow_variety_markers"

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
    SHADOW_LATENCY: REQUEST_LATENCY_BUCKETS_S,
}

VARIANT_TAG = "variant"
STATUS_CLASS_TAG = "status_class"
ROUTE_REASON_TAG = "route_reason"
API_KEY_TAG = "api_key"
TOKEN_KIND_TAG = "kind"
# The calling workload's mesh identity, `namespace/serviceaccount` (amalia_serve.caller_identity).
CALLER_TAG = "caller"
# Why a shadow copy was not sent or not answered: DROP_REASONS.
REASON_TAG = "reason"
# `pt-PT` or `pt-BR`: which variety's markers (amalia_variety) an answer held.
VARIETY_TAG = "variety"
DROP_REASONS = ("in_flight_limit", "overloaded", "unavailable")


def _exported(name: str, *suffixes: str) -> frozenset[str]:
    return frozenset(f"{EXPORT_PREFIX}{name}{suffix}" for suffix in suffixes)


_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
EXPORTED_METRIC_NAMES: frozenset[str] = frozenset().union(
    _exported(REQUESTS, "_total"),
    _exported(CALLER_REQUESTS, "_total"),
    _exported(PROMPT_TOKENS, "_total"),
    _exported(OUTPUT_TOKENS, "_total"),
    _exported(API_KEY_REQUESTS, "_total"),
    _exported(API_KEY_TOKENS, "_total"),
    _exported(SHADOW_REQUESTS, "_total"),
    _exported(SHADOW_DROPPED, "_total"),
    _exported(SHADOW_OUTPUT_TOKENS, "_total"),
    _exported(SHADOW_VARIETY_MARKERS, "_total"),
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
        self._caller_requests = Counter(
            CALLER_REQUESTS,
            description="Requests answered by the ingress by calling workload (mesh identity), "
            "variant (empty when refused before routing) and status class; only with a mesh.",
            tag_keys=(CALLER_TAG, VARIANT_TAG, STATUS_CLASS_TAG),  # type: ignore[arg-type]
        )
        # A few variants x 3 status classes x 4 reasons: cache the tag dicts, built once each.
        self._request_tags: dict[tuple[str, int, str], dict[str, str]] = {}
        # Callers are as few as the ServiceAccounts the mesh lets in: cached the same way.
        self._caller_tags: dict[tuple[str, str, int], dict[str, str]] = {}
        self._variant_tags: dict[str, dict[str, str]] = {}
        self._key_requests = Counter(
            API_KEY_REQUESTS,
            description="Requests by API key name (`anonymous`: no key and none required; "
            "`unauthorized`: refused with 401).",
            tag_keys=(API_KEY_TAG,),
        )
        self._key_tokens = Counter(
            API_KEY_TOKENS,
            description="Tokens by API key name and kind (prompt, output).",
            tag_keys=(API_KEY_TAG, TOKEN_KIND_TAG),  # type: ignore[arg-type]
        )
        self._key_tags: dict[tuple[str, str], dict[str, str]] = {}

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

    def record_caller(self, caller: str, variant: str, status_code: int) -> None:
        """One answered request of ``caller``; ``variant`` is empty when it was refused unrouted."""
        key = (caller, variant, status_code // 100)
        tags = self._caller_tags.get(key)
        if tags is None:
            tags = self._caller_tags[key] = {
                CALLER_TAG: caller,
                VARIANT_TAG: variant,
                STATUS_CLASS_TAG: status_class(status_code),
            }
        self._caller_requests.inc(1, tags)

    def record_first_token(self, variant: str, ttft_s: float) -> None:
        """User-visible TTFT: measured at the ingress, so it includes routing and queueing."""
        self._ttft.observe(ttft_s, self._tags_of(variant))

    def record_api_key_request(self, key_name: str) -> None:
        self._key_requests.inc(1, self._key_tags_of(key_name, ""))

    def record_api_key_tokens(self, key_name: str, prompt_tokens: int, output_tokens: int) -> None:
        # Ray counters refuse increments <= 0 (a request cut short may have generated nothing).
        if prompt_tokens > 0:
            self._key_tokens.inc(prompt_tokens, self._key_tags_of(key_name, "prompt"))
        if output_tokens > 0:
            self._key_tokens.inc(output_tokens, self._key_tags_of(key_name, "output"))

    def _key_tags_of(self, key_name: str, kind: str) -> dict[str, str]:
        """Tags per (key name, token kind); kind "" is the request counter's, which has no kind."""
        tags = self._key_tags.get((key_name, kind))
        if tags is None:
            tags = {API_KEY_TAG: key_name, **({TOKEN_KIND_TAG: kind} if kind else {})}
            self._key_tags[(key_name, kind)] = tags
        return tags

    def _tags_of(self, variant: str) -> dict[str, str]:
        tags = self._variant_tags.get(variant)
        if tags is None:
            tags = self._variant_tags[variant] = {VARIANT_TAG: variant}
        return tags


class ShadowMetrics:
    """What the ingress sees of its shadow copies; one per ingress replica (amalia_serve.shadow records)."""

    def __init__(self) -> None:
        self._requests = Counter(
            SHADOW_REQUESTS,
            description="Shadow copies answered, by the variant that answered them and status class.",
            tag_keys=(VARIANT_TAG, STATUS_CLASS_TAG),  # type: ignore[arg-type]
        )
        self._dropped = Counter(
            SHADOW_DROPPED,
            description="Shadow copies not sent or not taken, by variant and reason: in_flight_limit (the "
            "ingress replica already runs max_in_flight copies), overloaded (the variant's queue was full), "
            "unavailable (the call failed before the variant produced anything).",
            tag_keys=(VARIANT_TAG, REASON_TAG),  # type: ignore[arg-type]
        )
        self._latency = Histogram(
            SHADOW_LATENCY,
            description="Seconds from sending a shadow copy to its last token (or its error).",
            boundaries=list(HISTOGRAM_BOUNDARIES[SHADOW_LATENCY]),
            tag_keys=(VARIANT_TAG,),
        )
        self._output_tokens = Counter(
            SHADOW_OUTPUT_TOKENS, description="Tokens generated for shadow copies.", tag_keys=(VARIANT_TAG,)
        )
        self._variety = Counter(
            SHADOW_VARIETY_MARKERS,
            description="pt-PT and pt-BR markers found in the answers of shadowed requests, by the variant "
            "that gave the answer: the shadow variant's copies and the answering variant's originals.",
            tag_keys=(VARIANT_TAG, VARIETY_TAG),  # type: ignore[arg-type]
        )
        # A few variants x a few classes, reasons or varieties: one tag dict each, built once.
        self._tags: dict[tuple[str, str, str], dict[str, str]] = {}

    def record_copy(self, variant: str, status_code: int, latency_s: float, output_tokens: int) -> None:
        """One copy the variant answered (any status)."""
        self._requests.inc(1, self._tags_of(variant, STATUS_CLASS_TAG, status_class(status_code)))
        self._latency.observe(latency_s, self._tags_of(variant))
        if output_tokens > 0:  # Ray counters refuse increments <= 0
            self._output_tokens.inc(output_tokens, self._tags_of(variant))

    def record_dropped(self, variant: str, reason: str) -> None:
        self._dropped.inc(1, self._tags_of(variant, REASON_TAG, reason))

    def record_variety(self, variant: str, pt_pt: int, pt_br: int) -> None:
        for variety, markers in (("pt-PT", pt_pt), ("pt-BR", pt_br)):
            if markers > 0:
                self._variety.inc(markers, self._tags_of(variant, VARIETY_TAG, variety))

    def _tags_of(self, variant: str, key: str = "", value: str = "") -> dict[str, str]:
        tags = self._tags.get((variant, key, value))
        if tags is None:
            tags = self._tags[(variant, key, value)] = {VARIANT_TAG: variant, **({key: value} if key else {})}
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
